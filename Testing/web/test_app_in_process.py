"""The web app's page logic in this process (no browser), on small synthetic CTs and a stand-in server client:

- a box pressed, dragged and released in the red view lands on the voxels under the mouse, on the slice shown,
  for CTs stored with flipped axes (LPS / RAS / k down), transposed in-plane axes, anisotropic voxels, a tilted
  (oblique) CT; the voxel probe says the same; the exports lie on the CT in physical space (SimpleITK);
- a CT stored in sagittal slices is named as such; a session the server lost is opened again with no work lost;
  a prompt of the segment being propagated is refused (its result would replace it); a failed live update takes
  back its own prompt only; a tumour box on a slice without liver says why it gives nothing; a server that goes
  away during a propagation leaves the work as it was and says what to do; several files uploaded together that
  are not DICOM are named as such (not "N DICOM files"), those of a mixture left out and named; a CD-ROM
  export's folder opens its largest CT series whole, reading that one alone, names and lists the others (why a
  localiser, a report are not opened first), and another opens from the list after the unexported-work guard; an
  upload of too many files, or larger than the free space, is refused before anything is written; the CT shown's
  series list stays beside the list of an upload whose series failed to open; an open that fails unexpectedly
  leaves the scene, the views, the page (its series lists too) and the server as before it, even when a view
  cannot be turned back or a part of the new case cannot be taken away; an open cancelled while the server opens
  its CT leaves no session and a free page.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import threading
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")  # as `python -m liversam_web` sets it

from liversam_web.server_client import ServerError, ServerRequestError, ServerUnavailable  # noqa: E402
from liversam_web.volume_geometry import ijk_to_ras  # noqa: E402

SHAPE = (12, 48, 40)  # k, j, i
SPACING = (0.8, 1.1, 3.0)  # i, j, k mm: anisotropic
ORIGIN_LPS = (10.0, -20.0, 30.0)
_TILT = np.deg2rad(15.0)
_TURN = np.deg2rad(20.0)
# direction matrices in LPS, columns = the i, j, k axes
DIRECTIONS = {
    "lps": np.eye(3),
    "ras": np.diag([-1.0, -1.0, 1.0]),
    "k-down": np.diag([1.0, 1.0, -1.0]),
    "transposed": np.array([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]),
    "gantry-tilt": np.array([[1.0, 0.0, 0.0], [0.0, np.cos(_TILT), -np.sin(_TILT)], [0.0, np.sin(_TILT), np.cos(_TILT)]]),
    "turned-in-plane": np.array([[np.cos(_TURN), -np.sin(_TURN), 0.0], [np.sin(_TURN), np.cos(_TURN), 0.0],
                                 [0.0, 0.0, 1.0]]),
}
SAGITTAL = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # slices k run left-right
_NAMES = itertools.count()


def synthetic_ct() -> np.ndarray:
    ct = np.full(SHAPE, -1000, dtype=np.int16)
    ct[2:10, 8:40, 6:34] = 40
    ct[5, 20:24, 10:13] = 300  # a marker
    return ct


def write_nrrd(path: Path, array: np.ndarray, direction: np.ndarray, spacing=SPACING, origin=ORIGIN_LPS) -> Path:
    """A raw NRRD in LPS with this direction (columns: i, j, k axes), spacing (i, j, k) and origin."""
    axes = [np.asarray(direction, dtype=float)[:, c] * spacing[c] for c in range(3)]
    nk, nj, ni = array.shape
    header = ("NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\n"
              f"sizes: {ni} {nj} {nk}\n"
              "space directions: " + " ".join("(" + ",".join(f"{v:.10g}" for v in a) + ")" for a in axes) + "\n"
              "kinds: domain domain domain\nendian: little\nencoding: raw\n"
              "space origin: (" + ",".join(f"{v:.10g}" for v in origin) + ")\n\n")
    path.write_bytes(header.encode("ascii") + np.ascontiguousarray(array, dtype="<i2").tobytes())
    return path


class FakeServer:
    """Answers like LiverSAMClient: a slice mask that fills each box; jobs that run until ``finish`` is set."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []
        self.sessions: dict[str, tuple] = {}
        self.lost: set[str] = set()  # sessions the server forgot (evicted, or a restart)
        self.predict_gate: threading.Event | None = None  # the next prediction waits for it, then fails
        self.finish = threading.Event()
        self.unreachable = False
        self.job_masks: dict[str, np.ndarray] = {}
        self._ids = itertools.count(1)

    def _session(self, session: str, path: str) -> tuple:
        if self.unreachable:
            raise ServerUnavailable("LiverSAM server at http://127.0.0.1:1 is not reachable: connection refused")
        if session in self.lost or session not in self.sessions:
            raise ServerRequestError(404, f"unknown session '{session}': it does not exist, was closed or evicted "
                                          "(...); open the CT again", "POST", f"/sessions/{session}{path}")
        return self.sessions[session]

    def open_volume(self, array, spacing, origin_lps, direction_lps=None, **_kwargs):
        session = f"s{next(self._ids)}"
        self.sessions[session] = (np.array(array), tuple(spacing), tuple(origin_lps), tuple(direction_lps))
        self.calls.append(("open", session))
        return {"session_id": session, "shape_kji": list(array.shape)}

    def predict_slice(self, session, k, boxes_ij=(), points_ij=(), negative_points_ij=()):
        array = self._session(session, "/predict")[0]
        self.calls.append(("predict", session, k, [tuple(b) for b in boxes_ij], list(points_ij)))
        if self.predict_gate is not None:
            gate, self.predict_gate = self.predict_gate, None
            gate.wait(30)
            raise ServerError(500, "the model failed", "POST", f"/sessions/{session}/predict")
        mask = np.zeros(array.shape[1:], dtype=bool)
        for i0, j0, i1, j1 in boxes_ij:
            mask[int(round(j0)):int(round(j1)) + 1, int(round(i0)):int(round(i1)) + 1] = True
        return mask, 0.9

    def prefetch(self, session, k, radius=3):
        return []

    def close_session(self, session):
        self.sessions.pop(session, None)

    def upload_mask(self, session, name, mask):
        self._session(session, f"/masks/{name}")

    def start_propagation(self, session, segments, **_kwargs):
        array = self._session(session, "/propagate")[0]
        job = f"job{next(self._ids)}"
        mask = np.zeros(array.shape, dtype=bool)
        for (i0, j0, k), (i1, j1, _) in segments[0]["boxes"]:  # each box's slice, and one each way
            mask[int(k) - 1:int(k) + 2, int(j0):int(j1) + 1, int(i0):int(i1) + 1] = True
        self.job_masks[job] = mask
        return job

    def job_status(self, job):
        if self.unreachable:
            raise ServerUnavailable("LiverSAM server at http://127.0.0.1:1 is not reachable: connection refused")
        state = "done" if self.finish.is_set() else "running"
        return {"state": state, "done": 1, "total": 2, "stage": "propagating"}

    def cancel_job(self, job):
        return {"state": "cancelled"}

    def job_result(self, job, masks=True):
        return {"review": {"segments": []}, "lesions": []}

    def job_mask(self, job, segment):
        return self.job_masks[job]


def new_app(client: FakeServer):
    from trame.app import get_server

    from liversam_web.app import LiverSAMWebApp

    return LiverSAMWebApp(client, server=get_server(f"liversam-test-{next(_NAMES)}", client_type="vue3"))


async def settle(app, seconds: float = 0.05) -> None:
    """Let the app's tasks (live updates, jobs) run until none of them is busy."""
    for _ in range(400):
        await asyncio.sleep(seconds)
        if not app.state.busy and not app._predict_lock.locked():
            return


async def open_ct(app, path: Path) -> None:
    await app._open_files([str(path)], f"'{path.name}'", path.name)
    assert app.content is not None, app.state.error


def screen_xy(app, ijk) -> tuple[float, float, float]:
    """Where voxel (i, j, k) is in the red view: display x, y and the distance off its plane (in slices)."""
    from vtkmodules.vtkCommonMath import vtkMatrix4x4

    ras_to_xy = vtkMatrix4x4()
    ras_to_xy.DeepCopy(app._axial_view().get_view_node().GetXYToRAS())
    ras_to_xy.Invert()
    x, y, z, _ = ras_to_xy.MultiplyPoint((*ijk_to_ras(app.content.ijk_to_ras, ijk), 1.0))
    return x, y, z


def mouse(app, event: str, xy) -> None:
    from vtkmodules.vtkCommonCore import vtkCommand

    interactor = app._axial_view().interactor()
    interactor.SetEventPosition(int(round(xy[0])), int(round(xy[1])))
    interactor.InvokeEvent(getattr(vtkCommand, event))


def drag_box(app, corner_a, corner_b) -> None:
    a, b = screen_xy(app, corner_a), screen_xy(app, corner_b)
    mouse(app, "LeftButtonPressEvent", a)
    mouse(app, "MouseMoveEvent", ((a[0] + b[0]) / 2, (a[1] + b[1]) / 2))
    mouse(app, "MouseMoveEvent", b)
    mouse(app, "LeftButtonReleaseEvent", b)


def click(app, ijk) -> None:
    xy = screen_xy(app, ijk)
    mouse(app, "LeftButtonPressEvent", xy)
    mouse(app, "LeftButtonReleaseEvent", xy)


def labelled_points(path: str) -> dict:
    """Physical (LPS) points of the nonzero voxels of each file, read with SimpleITK in the server's Python."""
    from web_page import server_side

    return server_side(
        "import SimpleITK as sitk, numpy as np\n"
        "out = {}\n"
        "for name, path in inputs['files'].items():\n"
        "    image = sitk.ReadImage(path)\n"
        "    array = sitk.GetArrayFromImage(image)\n"
        "    if array.ndim == 4: array = array.max(axis=-1)\n"
        "    pts = [image.TransformIndexToPhysicalPoint((int(i), int(j), int(k))) for k, j, i in zip(*np.nonzero(array))]\n"
        "    out[name] = sorted([[round(v, 3) for v in p] for p in pts])\n",
        files={"points": path})["points"]


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_a_box_lands_on_the_voxels_under_the_mouse_and_exports_overlay_the_ct(name, tmp_path):
    """Drag from voxel (10, 20) to (30, 36) on slice 5 of the red view: the server gets that box on slice 5; the probe
    under the mouse names the voxel; the labelmap and .seg.nrrd hold the mask where the CT has those voxels."""
    ct_path = write_nrrd(tmp_path / f"{name}.nrrd", synthetic_ct(), DIRECTIONS[name])
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        assert "Drag a box" in app.state.status, app.state.status
        content = app.content
        marker = np.argwhere(content.array == 300)  # [k, j, i]
        k = int(marker[0][0])
        app._jump(k)
        assert app._current_k() == k and app.state.axial_k == k
        j0, i0 = int(marker[:, 1].min()) - 2, int(marker[:, 2].min()) - 3
        box_ijk = ((i0, j0, k), (i0 + 12, j0 + 9, k))
        for corner in box_ijk:
            assert abs(screen_xy(app, corner)[2]) < 1e-3, "the red view does not show slice k as a whole"
        drag_box(app, *box_ijk)
        await settle(app)
        assert not app.state.error, app.state.error
        predict = [c for c in client.calls if c[0] == "predict"][-1]
        assert predict[2] == k
        assert np.allclose(predict[3][0], (i0, j0, i0 + 12, j0 + 9), atol=0.25), predict
        mouse(app, "MouseMoveEvent", screen_xy(app, (i0 + 4, j0 + 3, k)))
        assert app.state.probe.startswith(f"i {i0 + 4}  j {j0 + 3}  k {k}  "), app.state.probe
        # the mask shown is the mask sent back (the segment holds it on the CT's grid), and the exports lie on the CT
        mask = app.workflow.masks["liver"]
        assert mask[k].sum() == 13 * 10 and (content.segment_mask("liver") == mask).all()
        content.write_labelmap(app.workflow.labelmap(), tmp_path / "labels.nii.gz")
        content.write_segmentation(tmp_path / "case.seg.nrrd")
        return mask

    mask = asyncio.run(scenario())
    # the voxels of the box in the CT file's own grid, through physical space
    expected = np.zeros(SHAPE, dtype=bool)
    truth = synthetic_ct() == 300
    kk = int(np.argwhere(truth)[0][0])
    js, is_ = np.nonzero(truth[kk])
    expected[kk, js.min() - 2:js.min() + 8, is_.min() - 3:is_.min() + 10] = True
    file_points = labelled_points(str(write_nrrd(tmp_path / "expected.nrrd", expected.astype(np.int16),
                                                 DIRECTIONS[name])))
    assert len(file_points) == mask.sum() == 130
    assert np.allclose(labelled_points(str(tmp_path / "labels.nii.gz")), file_points, atol=1e-2)
    assert np.allclose(labelled_points(str(tmp_path / "case.seg.nrrd")), file_points, atol=1e-2)


def test_a_point_lands_on_the_clicked_voxel_of_a_tilted_ct(tmp_path):
    ct_path = write_nrrd(tmp_path / "tilt.nrrd", synthetic_ct(), DIRECTIONS["gantry-tilt"])
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        app._jump(6)
        app._prompting.set_mode("point+")
        click(app, (30, 42, 6))  # far from the slice's centre, where a tilted plane leaves slice 6
        await settle(app)
        assert not app.state.error, app.state.error
        assert sorted(app.workflow.prompts["liver"]) == [6]
        assert app.workflow.prompts["liver"][6].points == [pytest.approx((30, 42), abs=0.25)]

    asyncio.run(scenario())


def test_a_ct_in_sagittal_slices_is_named_and_its_prompts_refused(tmp_path):
    # oblique sagittal slices (turned 35 deg about L-R): no reordering of its voxels gives axial slices
    # (test_reoriented_ct.py: a sagittal CT whose axes follow the patient's is opened on its axial slices)
    turn = np.deg2rad(35.0)
    oblique = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(turn), -np.sin(turn)], [0.0, np.sin(turn), np.cos(turn)]])
    ct_path = write_nrrd(tmp_path / "sagittal.nrrd", synthetic_ct(), oblique @ SAGITTAL)
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, ct_path)
        assert "sagittal, not axial" in app.state.status
        view = app._axial_view()
        size = view.render_window().GetSize()
        a, b = (size[0] * 0.3, size[1] * 0.3), (size[0] * 0.7, size[1] * 0.7)
        mouse(app, "LeftButtonPressEvent", a)
        mouse(app, "MouseMoveEvent", b)
        mouse(app, "LeftButtonReleaseEvent", b)
        await settle(app)
        assert "sagittal.nrrd are sagittal, not axial" in app.state.error and "Resample" in app.state.error
        assert not [c for c in client.calls if c[0] == "predict"]

    asyncio.run(scenario())


def test_a_session_the_server_lost_is_opened_again_and_nothing_is_lost(tmp_path):
    """The server evicts idle sessions (and forgets them all when restarted): the next box opens the CT again on the
    server, with the same voxels and geometry, and is segmented; a propagation then runs on the new session."""
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        first = app.workflow.masks["liver"].copy()
        client.lost.add("s1")
        app._jump(6)
        drag_box(app, (9, 17, 6), (21, 31, 6))
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.workflow.session_id == "s2" and sorted(app.workflow.prompts["liver"]) == [5, 6]
        assert app.workflow.masks["liver"][6].sum() == 13 * 15 and (app.workflow.masks["liver"][5] == first[5]).all()
        reopened, original = client.sessions["s2"], client.sessions.get("s1")
        assert original is not None and (reopened[0] == original[0]).all() and reopened[1:] == original[1:]
        client.lost.add("s2")
        client.finish.set()
        app.propagate()
        await settle(app, 0.1)
        while app.state.job_running:
            await asyncio.sleep(0.1)
        assert not app.state.error, app.state.error
        assert app.workflow.session_id == "s3" and "liver" in app.workflow.propagated

    asyncio.run(scenario())


def test_a_prompt_of_the_segment_being_propagated_is_refused_and_a_lost_server_keeps_the_work(tmp_path):
    """A liver box drawn while the liver propagates would be replaced by the job's result (its slice mask gone, its
    box left): it is refused with a message. A server that goes away mid-job: the page says what to do and keeps
    every prompt and mask."""
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        app.propagate()
        await asyncio.sleep(0.3)
        assert app.state.job_running
        app._jump(9)
        drag_box(app, (8, 16, 9), (20, 30, 9))  # during the liver's propagation
        await settle(app)
        assert "being propagated" in app.state.error
        app.clear_slice()
        assert "being propagated" in app.state.error and app.workflow.masks["liver"][5].any()
        client.finish.set()
        while app.state.job_running:
            await asyncio.sleep(0.1)
        masks = app.workflow.masks["liver"]
        for k in app.workflow.prompts["liver"]:  # no prompt without its mask
            assert masks[k].any(), f"slice {k} has a liver prompt and no liver mask"
        # the server goes away during the next propagation
        client.finish.clear()
        before = masks.copy()
        app.propagate()
        await asyncio.sleep(0.3)
        client.unreachable = True
        while app.state.job_running:
            await asyncio.sleep(0.1)
        assert "not reachable" in app.state.error and "keeps your prompts and masks" in app.state.error
        assert (app.workflow.masks["liver"] == before).all() and 5 in app.workflow.prompts["liver"]

    asyncio.run(scenario())


def test_a_failed_live_update_takes_back_its_own_prompt_only(tmp_path):
    """Box A's live update fails while box B (drawn meanwhile) waits: A is taken back, B stays and is segmented."""
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        errors, show_error = [], app._error
        app._error = lambda message: (errors.append(message), show_error(message))  # B's status follows at once
        gate = threading.Event()
        client.predict_gate = gate
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await asyncio.sleep(0.2)
        app._jump(7)
        drag_box(app, (9, 17, 7), (21, 31, 7))
        await asyncio.sleep(0.2)
        gate.set()
        await settle(app)
        while app._predict_lock.locked():
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)
        assert sorted(app.workflow.prompts["liver"]) == [7]
        assert app.workflow.masks["liver"][7].sum() == 13 * 15 and not app.workflow.masks["liver"][5].any()
        assert app.workflow.undo_label() == "liver box on slice 7"
        assert len(errors) == 1 and "could not segment slice 5, so the prompt was taken back" in errors[0]

    asyncio.run(scenario())


def test_a_tumour_box_on_a_slice_without_liver_says_why_it_is_empty(tmp_path):
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        app.state.segment = "tumor"
        app._jump(8)
        drag_box(app, (10, 18, 8), (16, 24, 8))
        await settle(app)
        assert "liver has no mask on slice 8" in app.state.error

    asyncio.run(scenario())


def test_a_tumour_without_a_liver_or_outside_it_says_why(tmp_path):
    """A tumour box outside the liver gave "0 voxels" and nothing more; a tumour boxed or propagated with no liver
    yet (not kept inside one: on lits117 it ran over 96 slices) gave no hint."""
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app.state.segment = "tumor"
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))  # no liver yet
        await settle(app)
        assert app.workflow.masks["tumor"][5].any() and not app.state.error
        assert "No liver is segmented yet, so this tumour is not kept inside one: segment and propagate the liver " \
               "first" in app.state.status, app.state.status
        client.finish.set()
        app.propagate("tumor")
        await settle(app, 0.1)
        while app.state.job_running:
            await asyncio.sleep(0.1)
        assert app.state.status.startswith("Tumour:") and "No liver is segmented yet" in app.state.status, \
            app.state.status
        app.undo()
        app.undo()

        app.state.segment = "liver"
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        app.state.segment = "tumor"
        drag_box(app, (25, 35, 5), (32, 42, 5))  # beside the liver's box on the same slice
        await settle(app)
        assert ("Tumour on slice 5: 0 voxels. The model's mask for this box (64 voxels) lies outside the liver mask, "
                "and tumours are kept inside the liver") in app.state.error, app.state.error
        assert "No liver" not in app.state.status

    asyncio.run(scenario())


def test_an_export_with_nothing_segmented_says_so_instead_of_downloading_an_empty_file(tmp_path):
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        for kind in ("segnrrd", "labelmap"):
            app.state.error = ""
            assert await app.export(kind) is None  # nothing to download
            assert "Nothing to export yet" in app.state.error and "box around the liver" in app.state.error
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        assert app.workflow.masks["liver"][5].any()
        attached = []  # what trame's protocol would send to the page (no page is connected here)
        app.server._root_protocol = SimpleNamespace(addAttachment=lambda data: attached.append(data) or "attachment")
        assert await app.export("segnrrd") == "attachment" and attached[0]  # once something is segmented, it downloads

    asyncio.run(scenario())


def test_a_bad_input_gets_its_own_error_at_once_while_the_work_is_unexported(tmp_path):
    """With unexported work open, a file that is not a CT (or a 2D image, or a folder with no series) was held back
    first ("this drops your unexported work ... press Open again") and showed its real error only on the second
    press; a good CT is still held back once, and nothing of the held-back CT is left in the scene."""
    client = FakeServer()
    app = new_app(client)
    not_ct = tmp_path / "notes.nii.gz"
    not_ct.write_text("this is not a CT")
    text = tmp_path / "notes.txt"
    text.write_text("this is not a CT either")
    flat = write_nrrd(tmp_path / "flat.nrrd", np.full((1, 48, 40), -1000, np.int16), DIRECTIONS["lps"])
    no_series = tmp_path / "no-series"
    no_series.mkdir()
    (no_series / "readme.txt").write_text("no images here")
    (no_series / "list.csv").write_text("a,b\n1,2\n")

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        assert app._unexported_work()
        scene = app.slicer_app.scene
        nodes = scene.GetNumberOfNodes()
        for bad, message in ((tmp_path / "missing.nrrd", "missing.nrrd' does not exist on the server"),
                             (not_ct, "notes.nii.gz' is named .nii.gz but is not gzip-compressed"),
                             (text, "notes.txt' is not an image LiverSAM can read"),
                             (flat, "flat.nrrd' is a single 2D image"),
                             (no_series, "no-series' has no DICOM image series")):
            app.state.error = ""
            await app._open_path(str(bad))
            assert message in app.state.error, app.state.error
            assert "drops it" not in app.state.error
            assert app.workflow.masks["liver"][5].any() and app.state.ct_name == "ct.nrrd"
        assert scene.GetNumberOfNodes() == nodes
        other = write_nrrd(tmp_path / "other.nrrd", synthetic_ct(), DIRECTIONS["ras"])
        await app._open_path(str(other))  # a CT: held back once for the work
        assert "drops it: export it first" in app.state.error, app.state.error
        assert app.state.ct_name == "ct.nrrd" and scene.GetNumberOfNodes() == nodes
        await app._open_path(str(other))  # pressed again: opened
        assert app.state.ct_name == "other.nrrd" and not app.state.error, app.state.error
        assert not app.workflow.masks["liver"].any()

    asyncio.run(scenario())


GC_THEN_WINDOW = """
import asyncio, gc, sys
sys.path[:0] = [sys.argv[1], sys.argv[3]]  # the tests, the liversam_web package
from pathlib import Path
from test_app_in_process import DIRECTIONS, FakeServer, new_app, open_ct, synthetic_ct, write_nrrd

app = new_app(FakeServer())
asyncio.run(open_ct(app, write_nrrd(Path(sys.argv[2]) / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"])))
gc.collect()
app.content.volume.GetDisplayNode().SetWindowLevel(150.0, 60.0)  # as a Browse drag in a view sets it
print("sliders", app.state.window, app.state.level)
"""


def test_the_window_level_observer_survives_a_garbage_collection(tmp_path):
    """The sliders followed the view's window/level through a lambda that held the display node; Python's collector
    freed it (its only Python reference was the node's own observer), and the next window/level change ran freed
    memory: the app died (a segfault) on a Browse drag, in about one browser run of test_web_mouse.py in seven. In a
    process of its own: on the old code this one crashes."""
    import subprocess
    import sys

    here = Path(__file__).resolve().parent
    run = subprocess.run([sys.executable, "-c", GC_THEN_WINDOW, str(here), str(tmp_path), str(here.parents[1] / "web")],
                         capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-1500:]}"
    assert "sliders 150 60" in run.stdout, run.stdout


def test_one_dicom_file_typed_opens_its_series_as_liversam_segment_does(tmp_path):
    """`liversam segment ct/01.dcm` reads the file's series from its folder (liversam.ct_io.read_ct); the page said
    "'.../01.dcm' is a single 2D image (512 x 512), not a CT volume". A DICOM SEG typed as the CT is refused as one,
    and a DICOM file alone in its folder is still a single 2D image."""
    from web_page import DATA

    dcmqi = DATA / "dcmqi_ct3slice"
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await app._open_path(str(dcmqi / "ct" / "02.dcm"))
        assert not app.state.error, app.state.error
        assert app.state.ct_name == "dcmqi_ct3slice/ct" and app.content.shape_kji == (3, 512, 512)
        assert "The DICOM series of 02.dcm, read from its folder." in app.state.status, app.state.status
        assert app.content.dicom.folder == str(dcmqi / "ct") and app.content.dicom.num_files == 3  # the SEG's reference
        assert app.state.export_names["dicomseg"] == "dcmqi_ct3slice-ct-liversam-seg.dcm"

        await app._open_path(str(dcmqi / "liver_seg.dcm"))
        assert "liver_seg.dcm' is a DICOM SEG (a segmentation), not an image of a CT series" in app.state.error
        assert app.state.ct_name == "dcmqi_ct3slice/ct"

        alone = tmp_path / "alone"
        alone.mkdir()
        (alone / "01.dcm").write_bytes((dcmqi / "ct" / "01.dcm").read_bytes())
        app.state.error = ""
        await app._open_path(str(alone / "01.dcm"))
        assert "01.dcm' is a single 2D image (512 x 512), not a CT volume" in app.state.error, app.state.error
        assert app.state.ct_name == "dcmqi_ct3slice/ct"

    asyncio.run(scenario())


def test_a_series_with_files_without_preamble_opens_whole_or_is_refused_saying_why(tmp_path):
    """Files without the "DICM" preamble and File Meta (older archives) are now in their series (the core groups
    them): the page showed the series without them, a slice short and without a word. trame-slicer's reader (ITK)
    reads such a file as the series' first and fails on it elsewhere: then the page says which files and what to do."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from web_page import DATA

    from liversam.dicom_series import read_dicom_series

    original = read_dicom_series(DATA / "dcmqi_ct3slice" / "ct")
    folders = {0: tmp_path / "first_bare", 2: tmp_path / "last_bare"}
    for bare, folder in folders.items():
        folder.mkdir()
        for k, source in enumerate(sorted((DATA / "dcmqi_ct3slice" / "ct").iterdir())):
            ds = pydicom.dcmread(source)
            if k == bare:
                ds.preamble, ds.file_meta = None, FileMetaDataset()
            pydicom.dcmwrite(folder / source.name, ds, enforce_file_format=False, implicit_vr=True,
                             little_endian=True)
    app = new_app(FakeServer())

    async def scenario():
        await app._open_path(str(folders[0]))
        assert not app.state.error, app.state.error
        assert app.content.shape_kji == (3, 512, 512) and app.content.dicom.num_files == 3
        np.testing.assert_array_equal(app.content.array, original.array_kji)

        await app._open_path(str(folders[2]))
        assert "1 of its 3 DICOM files have no DICOM file header" in app.state.error, app.state.error
        assert "'03.dcm'" in app.state.error and "dcmconv" in app.state.error
        assert app.content.dicom.folder == str(folders[0])  # the CT shown stays

    asyncio.run(scenario())


def test_a_series_with_an_end_slice_cut_short_is_refused_naming_the_file(tmp_path):
    """A slice file cut short inside its header (an interrupted copy): the core's listing left it out as "no image"
    and the page showed the series a slice short, without a word. Now the page says which file is damaged and what
    to do, from the folder typed and from one of its files typed; the CT shown stays."""
    from web_page import DATA

    folder = tmp_path / "series"
    folder.mkdir()
    for source in sorted((DATA / "dcmqi_ct3slice" / "ct").iterdir()):
        (folder / source.name).write_bytes(source.read_bytes())
    app = new_app(FakeServer())

    async def scenario():
        await app._open_path(str(folder))
        assert not app.state.error, app.state.error
        data = (folder / "03.dcm").read_bytes()
        # before (0028,0010) Rows: "not an image"; after the File Meta (no SOP Class UID read): "not DICOM", left out
        # of the files read as DICOM with a note
        for cut in (data.index(b"\x28\x00\x10\x00"), 132 + 12 + int.from_bytes(data[140:144], "little")):
            (folder / "03.dcm").write_bytes(data[:cut])
            for typed in (folder, folder / "02.dcm"):
                app.state.error = ""
                await app._open_path(str(typed))
                assert f"'{folder / '03.dcm'}' is a damaged DICOM file" in app.state.error, app.state.error
                assert "cut short" in app.state.error and "complete copy" in app.state.error
                assert app.content.dicom.folder == str(folder) and app.content.dicom.num_files == 3  # the CT stays

    asyncio.run(scenario())


def test_a_series_with_a_damaged_file_is_refused_on_open_and_the_other_series_opens(tmp_path):
    """A folder of two series, the larger with a slice cut in its pixel data (its header whole, naming its series):
    the listing read it as whole and the page opened that series (the viewer's reader fills a cut slice with what it
    can); a cut inside its header refused the whole folder, the other series too. Now the larger is refused on open
    naming the file (not a smaller one opened in its place without a word), marked in the series list (not
    clickable), and the other series opens from the list."""
    import pydicom
    from pydicom.uid import generate_uid
    from web_page import DATA

    folder = tmp_path / "export"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for source in sorted((DATA / "dcmqi_ct3slice" / "ct").iterdir()):
        (folder / "a" / source.name).write_bytes(source.read_bytes())
    other_uid = generate_uid()
    for name in ("01.dcm", "02.dcm"):  # series 7: two whole slices of its own
        header = pydicom.dcmread(folder / "a" / name)
        header.SeriesInstanceUID, header.SOPInstanceUID, header.SeriesNumber = other_uid, generate_uid(), 7
        header.save_as(folder / "b" / name, enforce_file_format=True)
    damaged = folder / "a" / "03.dcm"  # series 2: two whole slices and one cut in its pixel data
    damaged.write_bytes(damaged.read_bytes()[:300_000])
    app = new_app(FakeServer())

    async def scenario():
        await app._open_path(str(folder))
        await settle(app)
        assert app.content is None
        assert app.state.error.startswith(f"The DICOM series 2 in the folder '{folder}' has a damaged DICOM file: "
                                          f"'{damaged}' is a damaged DICOM file"), app.state.error
        assert "choose another series in their list" in app.state.error
        rows = {r["number"]: r for r in app.state.other_series_rows}
        assert not rows["2"]["openable"] and "damaged DICOM file" in rows["2"]["why"], rows
        assert rows["7"]["openable"]

        await app._open_series(rows["7"]["key"], "other")
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.content.dicom.series_uid == other_uid and app.content.dicom.num_files == 2
        rows = {r["number"]: r for r in app.state.series_rows}
        assert rows["7"]["shown"] and not rows["2"]["openable"] and "damaged DICOM file" in rows["2"]["why"]

        await app._open_series(rows["2"]["key"], "shown")  # (not clickable on the page)
        assert "damaged DICOM file '03.dcm'" in app.state.error, app.state.error
        assert app.content.dicom.series_uid == other_uid  # the CT shown stays

    asyncio.run(scenario())


def test_an_irregular_dicom_series_is_shown_resampled_and_refused_as_a_dicom_seg_reference(tmp_path):
    """A DICOM series with a slice missing: trame-slicer's reader interpolates it onto a regular grid (Slicer's
    acquisition-geometry regularization, hardened), and the page said nothing of it; its DICOM SEG export was offered
    and failed at the server with a grid mismatch. The page now says the slices were interpolated and why, offers no
    DICOM SEG, and the full series still offers one."""
    import shutil

    import pydicom
    from web_page import DATA

    series = tmp_path / "gap" / "ct_dicom"
    shutil.copytree(DATA / "totalseg_small" / "ct_dicom", series)
    by_z = sorted(series.iterdir(), key=lambda f: float(pydicom.dcmread(f, stop_before_pixels=True)
                                                       .ImagePositionPatient[2]))
    by_z[10].unlink()  # of 20 slices 2 mm apart: 9 and 11 are 4 mm apart
    client = FakeServer()
    app = new_app(client)

    async def scenario():
        await app._open_path(str(series))
        assert not app.state.error, app.state.error
        status = app.state.status
        assert "Its DICOM slices form no regular grid" in status and "interpolated onto a regular grid" in status, status
        assert "spacing" in status or "missing" in status or "uneven" in status, status  # the core's reason, named
        assert app.state.has_dicom is False and "not for this CT" in app.state.dicom_note
        await app._export_dicom_seg(tmp_path / "seg.dcm")
        assert "form no regular grid" in app.state.error and not (tmp_path / "seg.dcm").exists(), app.state.error

        app.state.error = ""
        await app._open_path(str(DATA / "totalseg_small" / "ct_dicom"))
        assert not app.state.error, app.state.error
        assert app.state.has_dicom is True and "regular grid" not in app.state.status
        assert app.state.dicom_note.startswith("DICOM SEG: for a CT opened from a DICOM series")

    asyncio.run(scenario())


def test_a_multi_frame_dicom_ct_is_not_called_an_irregular_series(tmp_path):
    """An enhanced (multi-frame) DICOM CT holds its volume in one file: the irregular-series check (the core's
    sort_series, which reads classic one-slice-per-file series and refuses multi-frame files) called it "no regular
    grid ... interpolated" and turned DICOM SEG off, with the core's advice to convert it."""
    import pydicom
    from pydicom.uid import ExplicitVRLittleEndian
    from web_page import DATA

    slices = sorted((pydicom.dcmread(p) for p in sorted((DATA / "totalseg_small" / "ct_dicom").iterdir())[:3]),
                    key=lambda d: float(d.ImagePositionPatient[2]))
    frames = np.stack([d.pixel_array for d in slices])  # (decoded before the transfer syntax changes)
    enhanced = slices[0]
    enhanced.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    enhanced.PixelData = frames.tobytes()
    enhanced.NumberOfFrames = 3
    enhanced.SpacingBetweenSlices = abs(float(slices[1].ImagePositionPatient[2]) - float(slices[0].ImagePositionPatient[2]))
    path = tmp_path / "enhanced.dcm"
    enhanced.save_as(path, enforce_file_format=True)
    app = new_app(FakeServer())

    async def scenario():
        await app._open_files([str(path)], "The uploaded file 'enhanced.dcm'", "enhanced.dcm", "enhanced")
        assert not app.state.error, app.state.error
        assert app.state.status.startswith("Opened enhanced.dcm"), app.state.status
        assert "regular grid" not in app.state.status and "not for this CT" not in app.state.dicom_note

    asyncio.run(scenario())


def test_a_folder_holding_one_dicom_slice_is_told_to_choose_the_series_folder():
    """A folder of one DICOM slice chosen in the folder field was told that "a browser sends only the files chosen, not
    their folder", and to use the folder field, which is what the user had just done."""
    from web_page import DATA

    one = sorted((DATA / "totalseg_small" / "ct_dicom").iterdir())[0]
    app = new_app(FakeServer())

    async def scenario():
        await app._on_upload([{"name": one.name, "content": one.read_bytes()}], f"slice/{one.name}", "folder")
        assert "The uploaded folder 'slice' holds one file" in app.state.error, app.state.error
        assert "not their folder" not in app.state.error and app.content is None
        app.state.error = ""
        await app._on_upload([{"name": one.name, "content": one.read_bytes()}], "", "file")
        assert "is one slice of a DICOM series (a browser sends only the files chosen" in app.state.error

    asyncio.run(scenario())


def test_a_zip_is_not_unpacked_while_a_step_runs(tmp_path):
    """A .zip uploaded during a propagation was unpacked whole (up to 8 GiB) before the open refused it, and nothing
    showed the page busy while it unpacked (another CT could be opened meanwhile, then replaced by the zip's)."""
    import zipfile

    from web_page import DATA

    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for path in sorted((DATA / "totalseg_small" / "ct_dicom").iterdir())[:3]:
            zipped.write(path, f"series/{path.name}")
    app = new_app(FakeServer())

    async def scenario():
        app.state.job_running = True
        await app._open_zip(str(archive), "series.zip", tmp_path / "out", "file")
        assert "Wait for the current step to finish" in app.state.error and not (tmp_path / "out").exists()
        app.state.job_running, app.state.error = False, ""
        seen = []
        app._set_busy = lambda text, set_busy=app._set_busy: seen.append(text) or set_busy(text)
        await app._open_zip(str(archive), "series.zip", tmp_path / "out", "file")
        assert seen[:2] == ["Unpacking series.zip ...", ""] and (tmp_path / "out").is_dir()

    asyncio.run(scenario())


def test_uploads_are_removed_once_no_ct_shown_comes_from_them(tmp_path):
    """Every upload stayed in the app's temporary folder until the app ended, refused ones too: a shared app filled
    its disk with series. Now only the upload being opened and the one the CT shown came from (its DICOM SEG
    references it) are kept."""
    from web_page import DATA

    ct = DATA / "lits117" / "ct.nii.gz"
    one_slice = sorted((DATA / "totalseg_small" / "ct_dicom").iterdir())[0]
    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)

    def kept() -> list[Path]:
        return sorted(uploads.glob("upload-*"))

    async def scenario():
        await app._on_upload([{"name": "ct.nii.gz", "content": ct.read_bytes()}], "", "file")
        await settle(app)
        assert app.content is not None and not app.state.error, app.state.error
        (first,) = kept()
        assert (first / "ct.nii.gz").is_file()
        await app._on_upload([{"name": one_slice.name, "content": one_slice.read_bytes()}], "", "file")  # refused
        assert "one slice of a DICOM series" in app.state.error and kept() == [first]
        app.state.error = ""
        await app._on_upload([{"name": "again.nii.gz", "content": ct.read_bytes()}], "", "file")
        await settle(app)
        (second,) = kept()
        assert second != first and (second / "again.nii.gz").is_file()  # the CT shown's; the first one's gone
        await app._open_path(str(ct))  # a CT opened by path: no upload is shown any more
        await settle(app)
        assert app.state.ct_name.endswith("ct.nii.gz") and kept() == []

    asyncio.run(scenario())


def test_an_upload_that_fails_unexpectedly_is_told_emptied_and_removed(tmp_path, monkeypatch):
    """A NUL in an uploaded path raised ValueError (not InputError) out of _on_upload: no message, the field not
    emptied, and the upload's folder stayed among those being opened (never removed). Any error now says which upload
    failed and what to do, empties its field and removes its files."""
    from liversam_web import app as app_module

    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)

    def broken(path):
        raise ValueError("embedded null byte")

    monkeypatch.setattr(app_module, "is_zip", broken)

    async def scenario():
        keys = dict(app.state.upload_keys)
        await app._on_upload([{"name": "x", "content": b"1"}], "cd/x", "folder", ["cd/x"])
        assert app.state.error.startswith("The uploaded folder 'cd' could not be opened on the app's machine "
                                          "(ValueError: embedded null byte); nothing of it was kept. Upload it "
                                          "again"), app.state.error
        assert app.state.upload_keys["folder"] == keys["folder"] + 1
        assert not app._uploads_open and not list(uploads.glob("upload-*"))

    asyncio.run(scenario())


def _png(width: int = 8, height: int = 8) -> bytes:
    """A small grey PNG (what a screenshot or a photo of the screen is)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\0" + bytes(range(width)) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_several_files_that_are_not_dicom_are_not_called_dicom_files(tmp_path):
    """Several files chosen together were titled "N DICOM files" whatever they were: three PNG files were "Opening 3
    DICOM files" then "The uploaded folder (3 files) has no DICOM image series"; two CT files (NRRD) opened as
    "2 DICOM files", the larger of them; DICOM files chosen with others opened with the others counted and never
    named. Now files that are not DICOM are named as such with what to do; CT files chosen together are told to be
    opened one at a time; of a mixture the DICOM files open and the others are named on the status line; a
    MetaImage header chosen with its data file opens as that file."""
    from web_page import DATA

    def upload(*paths: Path) -> list[dict]:
        return [{"name": p.name, "content": p.read_bytes()} for p in paths]

    pictures = []
    for name in ("scan1.png", "scan2.png", "scan3.png"):
        (tmp_path / name).write_bytes(_png())
        pictures.append(tmp_path / name)
    nrrds = [write_nrrd(tmp_path / name, synthetic_ct(), np.eye(3)) for name in ("a.nrrd", "b.nrrd")]
    (tmp_path / "notes.txt").write_text("patient 12, arterial phase")
    series = sorted((DATA / "dcmqi_ct3slice" / "ct").iterdir())
    app = new_app(FakeServer())
    seen: list[str] = []
    app._set_busy = lambda text, set_busy=app._set_busy: seen.append(text) or set_busy(text)

    async def scenario():
        await app._on_upload(upload(*pictures), "", "file")
        await settle(app)
        error = app.state.error
        assert error.startswith("The 3 files chosen ('scan1.png', 'scan2.png', 'scan3.png') are not DICOM files. "
                                "To open a CT, upload a DICOM series"), error
        assert "'Upload a DICOM folder'" in error and ".zip" in error and "one CT file (.nii.gz, .nrrd, .mha)" in error
        assert "folder (3 files)" not in error and not any("DICOM files" in text for text in seen), seen
        assert app.content is None

        app.state.error = ""
        await app._on_upload(upload(*nrrds), "", "file")
        await settle(app)
        assert app.content is None, app.state.ct_name  # (the larger one opened as "2 DICOM files")
        assert ("The 2 files chosen ('a.nrrd', 'b.nrrd') are CT image files, not the files of one DICOM series: "
                "LiverSAM opens one CT at a time. Upload one of them alone.") == app.state.error, app.state.error

        app.state.error = ""
        await app._on_upload(upload(*series, tmp_path / "notes.txt", pictures[0]), "", "file")
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.state.ct_name == "3 DICOM files" and app.content.shape_kji == (3, 512, 512)
        assert "2 files that are not DICOM ('notes.txt', 'scan1.png') left out." in app.state.status, app.state.status

        header = tmp_path / "ct.mhd"  # a MetaImage header with its data file: what it reads
        header.write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 48 12\nElementType = MET_SHORT\n"
                          "ElementSpacing = 0.8 1.1 3.0\nElementDataFile = ct.raw\n")
        (tmp_path / "ct.raw").write_bytes(synthetic_ct().astype("<i2").tobytes())
        await app._on_upload(upload(header, tmp_path / "ct.raw"), "", "file")
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.state.ct_name == "ct.mhd" and app.content.shape_kji == SHAPE

    asyncio.run(scenario())


def test_a_cd_rom_export_opens_its_largest_series_and_names_the_others(tmp_path, monkeypatch):
    """A CD-ROM export's folder (DICOMDIR, files without extension, IM0001... in each series' folder) uploaded in the
    folder field: the files were written by name only, so series 2's IM0001 overwrote series 1's and the two series
    became one broken one (16 slices, "two slices at the same position"). Each file is now written at its path in
    the folder; the largest CT series opens, and it alone is read (every series was read, pixels and all, to keep
    the largest); the page names it and the series not opened, with why a localiser, a 2-image series and a dose
    report are not opened first, and lists them (so does a folder typed, which names its files that are not
    DICOM); the DICOMDIR is not named among the files left out, AUTORUN.INF is."""
    from web_page import cd_export

    from liversam_web import mrml_scene

    root = cd_export(tmp_path / "cd", extra_series=True)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    files = [{"name": p.name, "content": p.read_bytes()} for p in paths]
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    app = new_app(FakeServer())
    read: list[list[str]] = []  # the files each read of pixels was given
    load_volumes = mrml_scene._load_volumes
    monkeypatch.setattr(mrml_scene, "_load_volumes", lambda slicer_app, names: read.append(names) or
                        load_volumes(slicer_app, names))

    async def scenario():
        await app._on_upload(files, relative[0], "folder", relative)
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.content.shape_kji == (12, 512, 512) and not app.content.dicom.irregular
        assert [Path(f).parent.name for f in read[-1]] == ["S1"] * 12, read  # series 1 alone was read
        assert app.state.ct_name == "12 DICOM files of series 1 'Abdomen S1' in cd"
        status = app.state.status
        assert ("Of the 5 DICOM series found, the largest CT series was opened: series 1 'Abdomen S1' (12 files). "
                "Not opened: series 2 'Abdomen S2' (8 files, 512 x 512 x 8); series 4 'Bolus tracking' (2 files, "
                "512 x 512 x 2; only 2 images, likely a localiser or a dose screen); series 3 'Topogram' (1 file; "
                "localiser (scout) images only); series 997 'Dose Report' (1 file; SR: a report (e.g. a dose "
                "report), no image). To open another, choose it in the series list (section 1).") in status, status
        assert "1 file that is not DICOM ('AUTORUN.INF') left out." in status and "DICOMDIR" not in status, status
        assert app.content.dicom.folder.endswith("/cd/DICOM/S1") and app.content.dicom.num_files == 12
        rows = app.state.series_rows
        assert [(r["number"], r["description"], r["images"], r["modality"], r["openable"], r["shown"]) for r in rows] \
            == [("1", "Abdomen S1", 12, "CT", True, True), ("2", "Abdomen S2", 8, "CT", True, False),
                ("4", "Bolus tracking", 2, "CT", True, False), ("3", "Topogram", 1, "CT", False, False),
                ("997", "Dose Report", 1, "SR", False, False)]
        assert rows[4]["why"] == "SR: a report (e.g. a dose report), no image" and not rows[0]["why"]

        await app._open_path(str(root))  # typed: the same series, the others named, and the file that is not DICOM
        await settle(app)
        assert app.state.ct_name == "cd: series 1 'Abdomen S1'", app.state.ct_name
        assert "Not opened: series 2 'Abdomen S2' (8 files" in app.state.status
        assert "1 file that is not DICOM ('AUTORUN.INF') left out." in app.state.status, app.state.status
        assert len(app.state.series_rows) == 5

    asyncio.run(scenario())


def test_another_series_of_the_files_opens_from_the_list_after_the_unexported_work_guard(tmp_path):
    """The series not opened were named, with "upload its own folder (or type its path)" to open one: the radiologist
    who wanted the other phase uploaded again. A series of the list opens from the same files (its pixels alone
    read), named and listed as the first; unexported work is guarded as for any CT (said once, "choose it again");
    a series that holds no image cannot be opened."""
    from web_page import cd_export

    root = cd_export(tmp_path / "cd", extra_series=True)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    app = new_app(FakeServer())

    async def scenario():
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        upload = app._shown_upload
        app._jump(5)
        drag_box(app, (100, 100, 5), (300, 300, 5))
        await settle(app)
        assert app._unexported_work()
        second = next(r["key"] for r in app.state.series_rows if r["description"] == "Abdomen S2")
        await app._open_series(second)
        await settle(app)
        assert ("opening 8 DICOM files of series 2 'Abdomen S2' in cd drops it: export it first (section 6), or choose "
                "it again in the series list to discard it.") in app.state.error, app.state.error
        assert app.content.shape_kji[0] == 12

        await app._open_series(second)  # again: the work is discarded
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.content.shape_kji == (8, 512, 512) and app.content.dicom.folder.endswith("/cd/DICOM/S2")
        assert app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd"
        assert ("Of the 5 DICOM series found, series 2 'Abdomen S2' (8 files) was opened, as chosen. Not opened: "
                "series 1 'Abdomen S1' (12 files, 512 x 512 x 12);") in app.state.status, app.state.status
        assert [r["shown"] for r in app.state.series_rows] == [False, True, False, False, False]
        assert app._shown_upload == upload and upload.is_dir()  # the upload stays: the SEG references it

        report = next(r["key"] for r in app.state.series_rows if r["modality"] == "SR")
        await app._open_series(report)
        assert app.state.error == ("Series 997 'Dose Report' cannot be opened as a CT: SR: a report (e.g. a dose "
                                   "report), no image."), app.state.error
        assert app.content.shape_kji[0] == 8

    asyncio.run(scenario())


def test_a_series_that_fails_to_open_is_named_and_the_list_stays_to_choose_another(tmp_path):
    """Series 1 of a CD export not in HU (its intercept 2000): the error named the whole folder ("The folder '.../cd'
    does not look like a CT ...") and no series list was shown, so series 2 could only be opened by uploading it
    alone. Now the series tried is named, the list stays (the upload's folder with it) to choose another, and the
    folder goes as before once another CT is shown."""
    import pydicom
    from web_page import cd_export

    root = cd_export(tmp_path / "cd")
    for path in (root / "DICOM" / "S1").iterdir():
        header = pydicom.dcmread(path)
        header.RescaleIntercept = 2000
        header.save_as(path)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    nrrd = write_nrrd(tmp_path / "other.nrrd", synthetic_ct(), np.eye(3))
    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)

    async def scenario():
        await open_ct(app, nrrd)
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        assert app.state.error.startswith("The DICOM series 1 'Abdomen S1' of the uploaded folder 'cd' does not look "
                                          "like a CT in Hounsfield units"), app.state.error
        assert app.state.error.endswith("It is one of the 2 DICOM series of the uploaded folder 'cd': choose another "
                                        "series in their list (section 1) to open it instead."), app.state.error
        assert app.state.ct_name == "other.nrrd"  # the CT shown stays
        assert app.state.series_rows == []  # (the CT shown has no series list)
        assert [(r["number"], r["shown"]) for r in app.state.other_series_rows] == [("1", False), ("2", False)]
        (upload,) = uploads.glob("upload-*")  # kept while its series are listed
        assert not app._uploads_open and app._shown_upload is None

        await app._open_series(app.state.other_series_rows[1]["key"], "other")
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd"
        assert app.content.dicom.folder.startswith(str(upload))
        assert [r["shown"] for r in app.state.series_rows] == [False, True] and app.state.other_series_rows == []
        assert app._shown_upload == upload and list(uploads.glob("upload-*")) == [upload]

        await app._open_path(str(root))  # the folder typed: its series 1 fails, named as the folder's
        await settle(app)
        assert app.state.error.startswith(f"The DICOM series 1 'Abdomen S1' in the folder '{root}' does not look "
                                          "like a CT"), app.state.error
        assert "choose another series in their list" in app.state.error
        assert app._other_series.files[0].startswith(str(root)) and len(app.state.other_series_rows) == 2
        assert app._shown_series.files[0].startswith(str(upload)) and len(app.state.series_rows) == 2
        assert list(uploads.glob("upload-*")) == [upload]  # the CT shown's (its DICOM SEG references it)

        await open_ct(app, nrrd)  # another CT shown: the lists and the upload go
        await settle(app)
        assert app.state.series_rows == app.state.other_series_rows == []
        assert app._shown_series is None and app._other_series is None
        assert not list(uploads.glob("upload-*"))

    asyncio.run(scenario())


def test_a_list_kept_after_a_failed_series_says_whose_it_is_and_marks_the_series_that_failed(tmp_path):
    """After series 1 of an upload failed to open, its list replaced the CT shown's with nothing saying so: series 1
    stayed clickable and failed again; the upload field was emptied and the status line did not say the list was of
    that upload (kept: no need to upload it again); the list's series 2 (key "1") was taken for the CT shown's series
    2 ("is the series shown") and not opened; and the busy line counted every series' files ("Opening 24 DICOM files
    in cd", a report's too) when one series of 12 was opened."""
    import pydicom
    from web_page import cd_export

    root = cd_export(tmp_path / "cd", extra_series=True)
    second = cd_export(tmp_path / "cd2")
    for path in (second / "DICOM" / "S1").iterdir():  # cd2's series 1 is not in HU
        header = pydicom.dcmread(path)
        header.RescaleIntercept = 2000
        header.save_as(path)
    app = new_app(FakeServer())
    busy: list[str] = []
    set_busy = app._set_busy
    app._set_busy = lambda text: busy.append(text) or set_busy(text)

    async def upload(folder: Path, name: str) -> None:
        paths = sorted(p for p in folder.rglob("*") if p.is_file())
        relative = [f"{name}/{p.relative_to(folder).as_posix()}" for p in paths]
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)

    async def scenario():
        await upload(root, "cd")
        assert not app.state.error, app.state.error
        assert "Opening 12 DICOM files of series 1 'Abdomen S1' in cd ..." in busy, busy
        assert not any(text.startswith("Opening 24 DICOM files") for text in busy), busy
        assert app.state.series_caption == ("DICOM series of the uploaded folder 'cd', the files of the CT shown "
                                            "(click another to open it instead)")
        await app._open_series(app.state.series_rows[1]["key"])  # the CT shown: cd's series 2 (key "1")
        await settle(app)
        assert app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd"
        keys = app.state.upload_keys["folder"]

        await upload(second, "cd2")
        assert app.state.error.startswith("The DICOM series 1 'Abdomen S1' of the uploaded folder 'cd2' does not "
                                          "look like a CT"), app.state.error
        assert app.state.upload_keys["folder"] == keys + 1  # the field emptied: the status line says why no matter
        assert app.state.status.startswith(
            "The 2 DICOM series of the uploaded folder 'cd2' are listed in section 1 under the series of the CT shown: "
            "their files are kept, click a series there to open it (no need to upload them again). Opened 8 DICOM "
            "files of series 2 'Abdomen S2' in cd"), app.state.status
        assert app.state.other_series_caption == (
            "DICOM series of the uploaded folder 'cd2', chosen after the CT shown (8 DICOM files of series 2 'Abdomen "
            "S2' in cd), which is not one of them: click one to open it instead"), app.state.other_series_caption
        rows = app.state.other_series_rows
        assert [(r["number"], r["openable"], r["failed"], r["shown"]) for r in rows] == [
            ("1", False, True, False), ("2", True, False, False)]
        assert rows[0]["why"] == "could not be opened: does not look like a CT in Hounsfield units", rows[0]["why"]
        assert app.state.series_caption.startswith("DICOM series of the uploaded folder 'cd', the files of the CT "
                                                   "shown")  # the CT shown's list stays, beside it

        busy.clear()
        await app._open_series(rows[0]["key"], "other")  # not read again: said why
        assert app.state.error == ("Series 1 'Abdomen S1' could not be opened: does not look like a CT in Hounsfield "
                                   "units. Choose another series in the list of the DICOM series of the uploaded "
                                   "folder 'cd2'."), app.state.error
        assert not busy and app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd"

        await app._open_series(rows[1]["key"], "other")  # cd2's series 2, not "the series shown" (cd's, key "1")
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd2", app.state.ct_name
        assert app.state.status.startswith("Opened 8 DICOM files of series 2 'Abdomen S2' in cd2"), app.state.status
        assert [(r["failed"], r["shown"]) for r in app.state.series_rows] == [(True, False), (False, True)]
        assert app.state.series_caption.startswith("DICOM series of the uploaded folder 'cd2', the files of the CT "
                                                   "shown")
        assert app.state.other_series_rows == [] and app._other_series is None

    asyncio.run(scenario())


def test_a_failed_series_reason_is_short_for_its_row():
    from liversam_web.app import short_reason

    what = "The DICOM series 1 'X' in cd"
    assert short_reason(f"{what} could not be read as an image (RuntimeError: boom).", what) == \
        "could not be read as an image"
    assert short_reason(f"{what} is a single 2D image (512 x 512), not a CT volume. Open a 3D CT.", what) == \
        "is a single 2D image"
    assert short_reason("session refused: " + "x" * 200, "") == "session refused"
    assert len(short_reason("y" * 200, "")) == 90


def test_each_series_of_the_files_has_its_own_export_names_and_its_own_unexported_work_guard(tmp_path):
    """Series 2 opened from the list was exported under the names of series 1 ("cd-liversam.seg.nrrd" for both),
    and the unexported-work guard was keyed on the message: a second series of the same label (number and
    description) opened at once, discarding the work without asking."""
    import pydicom
    from pydicom.uid import generate_uid
    from web_page import cd_export

    root = cd_export(tmp_path / "cd")
    twin = root / "DICOM" / "S3"
    twin.mkdir()
    uid = generate_uid()
    for path in sorted((root / "DICOM" / "S2").iterdir()):  # series 2 'Abdomen S2' again, another series UID
        header = pydicom.dcmread(path)
        header.SeriesInstanceUID = uid
        header.SOPInstanceUID = header.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        header.save_as(twin / path.name)
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    app = new_app(FakeServer())

    async def scenario():
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        assert app.state.export_names["segnrrd"] == "cd-s1-liversam.seg.nrrd", app.state.export_names
        app._jump(5)
        drag_box(app, (100, 100, 5), (300, 300, 5))
        await settle(app)
        first, second = (r["key"] for r in app.state.series_rows if r["description"] == "Abdomen S2")
        await app._open_series(first)
        await settle(app)
        assert "drops it: export it first" in app.state.error and app.content.shape_kji[0] == 12
        app.state.error = ""
        await app._open_series(second)  # another series of the same label: asked again, not discarded
        await settle(app)
        assert "drops it: export it first" in app.state.error and app.content.shape_kji[0] == 12, app.state.error
        await app._open_series(second)
        await settle(app)
        assert not app.state.error and app.content.shape_kji[0] == 8, app.state.error
        assert app.state.export_names["segnrrd"] == "cd-series3-liversam.seg.nrrd", app.state.export_names
        await app._open_series(first)
        await settle(app)
        assert app.state.export_names["segnrrd"] == "cd-series2-liversam.seg.nrrd", app.state.export_names

    asyncio.run(scenario())


def test_a_series_without_number_is_named_and_exported_by_its_place_in_the_list():
    from liversam_web.app import series_stem, series_what
    from liversam_web.mrml_scene import SeriesChoice

    def choice(key: str, number: int | None, description: str = "") -> SeriesChoice:
        return SeriesChoice(key, number, description, "CT", ("f",), 10, 512, 512, True)

    choices = (choice("a", 1), choice("b", None, "Venous"), choice("c", None))
    assert series_stem("cd", choices, choices[0]) == "cd-s1"
    assert series_stem("cd", choices, choices[1]) == "cd-series2"
    assert series_what(choices[0]) == "The DICOM series 1"
    assert series_what(choices[1]) == "The DICOM series with no number 'Venous'"
    assert series_what(choices[2]) == "The DICOM series with no number"


def test_a_ct_series_is_opened_first_before_a_larger_series_of_another_modality(tmp_path):
    """Of an MR series of 12 images and a CT series of 8, the larger (the MR) was opened and refused as no CT in
    Hounsfield units; the CT series opens first now, the MR one is listed as not CT."""
    import pydicom
    from web_page import cd_export

    root = cd_export(tmp_path / "cd")
    for path in (root / "DICOM" / "S1").iterdir():
        header = pydicom.dcmread(path)
        header.Modality = "MR"
        header.save_as(path)
    app = new_app(FakeServer())

    async def scenario():
        await app._open_path(str(root))
        await settle(app)
        assert not app.state.error, app.state.error
        assert app.content.shape_kji == (8, 512, 512) and app.state.ct_name == "cd: series 2 'Abdomen S2'"
        assert "series 1 'Abdomen S1' (12 files, 512 x 512 x 12; modality MR, not CT)" in app.state.status

    asyncio.run(scenario())


def test_an_upload_of_too_many_files_or_larger_than_the_free_space_is_refused_and_nothing_is_kept(tmp_path,
                                                                                                 monkeypatch):
    """The uploaded files were written whole with no look at the free space (only a .zip's unpacking had one) and with
    no limit on their number (only a folder typed had 20,000): now both are refused before a file is written, saying
    why and what to do, and the upload's folder goes; a page choosing more files than that sends none."""
    import shutil

    from liversam_web import uploads

    app = new_app(FakeServer())
    tmp = Path(app._tmp.name)
    usage = shutil.disk_usage(tmp)
    files = [{"name": f"IM{n}", "content": b"x" * 1024} for n in range(4)]
    relative = [f"cd/IM{n}" for n in range(4)]

    async def scenario():
        monkeypatch.setattr(uploads, "MAX_FOLDER_FILES", 3)
        await app._on_upload(files, relative[0], "folder", relative)
        assert app.state.error.startswith("The uploaded folder 'cd': 4 files, more than the 3 an upload may hold. "
                                          "Nothing was written."), app.state.error
        assert not list(tmp.glob("upload-*")) and app.content is None
        app._on_too_many_files(25_000, "cd/IM1", "folder")
        assert app.state.error.startswith("The uploaded folder 'cd': 25,000 files, more than the 3 an upload may "
                                          "hold. Nothing was uploaded."), app.state.error
        monkeypatch.setattr(uploads, "MAX_FOLDER_FILES", 20_000)

        app.state.error = ""
        monkeypatch.setattr(uploads.shutil, "disk_usage", lambda path: usage._replace(
            free=uploads.UNPACK_FREE_MARGIN + 2048))
        await app._on_upload(files, "", "file")
        error = app.state.error
        assert error.startswith("The 4 files chosen: 4 KiB to write, but the app's machine has only 512 MiB free "
                                "in "), error
        assert "Nothing was written. Free some space there" in error, error
        assert not list(tmp.glob("upload-*")) and app.content is None

    asyncio.run(scenario())


def test_a_ct_in_a_zip_held_back_for_unexported_work_is_told_to_be_uploaded_again(tmp_path):
    """The CT file in an uploaded .zip, held back once for the unexported work, was told to "press Open again" (its
    description did not start with "The uploaded"): there is no Open to press for an upload."""
    import zipfile

    app = new_app(FakeServer())
    archive = tmp_path / "one.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.write(write_nrrd(tmp_path / "other.nrrd", synthetic_ct(), DIRECTIONS["ras"]), "other.nrrd")

    async def scenario():
        await open_ct(app, write_nrrd(tmp_path / "ct.nrrd", synthetic_ct(), DIRECTIONS["lps"]))
        app._jump(5)
        drag_box(app, (8, 16, 5), (20, 30, 5))
        await settle(app)
        assert app._unexported_work()
        await app._open_zip(str(archive), "one.zip", tmp_path / "out", "file")
        await settle(app)
        assert "drops it: export it first (section 6), or upload it again to discard it" in app.state.error, \
            app.state.error
        assert app.state.ct_name == "ct.nrrd"

    asyncio.run(scenario())


def test_an_open_that_fails_unexpectedly_is_told_and_frees_the_page(tmp_path, monkeypatch):
    """A RuntimeError (or MemoryError) while a CT was read in the background open left the page busy for good with
    nothing said, and the upload's folder among those being opened: every later open was refused "Wait for the
    current step". Now it is told, the page is free, the upload's files go, and the next open works."""
    from web_page import cd_export

    from liversam_web import app as app_module

    root = cd_export(tmp_path / "cd")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    nrrd = write_nrrd(tmp_path / "other.nrrd", synthetic_ct(), np.eye(3))
    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)
    real = app_module.load_ct_with_source
    broken = {"on": True}

    def reader(*args, **kwargs):
        if broken["on"]:
            raise RuntimeError("reader crashed")
        return real(*args, **kwargs)

    monkeypatch.setattr(app_module, "load_ct_with_source", reader)

    async def scenario():
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        assert app.state.error.startswith("The 20 DICOM files of the uploaded folder 'cd' could not be opened on the "
                                          "app's machine (RuntimeError: reader crashed). Try again"), app.state.error
        assert not app.state.busy and not app._uploads_open and not list(uploads.glob("upload-*"))

        broken["on"] = False
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        assert not app.state.error and app.state.ct_name.startswith("12 DICOM files of series 1"), app.state.error
        broken["on"] = True  # a series of the list: the same
        await app._open_series(app.state.series_rows[1]["key"])
        await settle(app)
        assert app.state.error.startswith("The DICOM series 2 'Abdomen S2' of the uploaded folder 'cd' could not be "
                                          "opened on the app's machine (RuntimeError"), app.state.error
        assert not app.state.busy and app.state.ct_name.startswith("12 DICOM files of series 1")
        broken["on"] = False
        await open_ct(app, nrrd)
        assert app.state.ct_name == "other.nrrd" and not app.state.error, app.state.error

    asyncio.run(scenario())


def test_a_series_the_server_could_not_take_for_a_moment_stays_clickable(tmp_path):
    """A series whose CT the server could not take because it was briefly unreachable (or answered 5xx: its session
    limit) was marked failed for good, its row not clickable, and its message ran together ("...connection refused It
    is one of ..."). Now only a refusal about the volume (a 4xx) marks it; the others leave it to be clicked again."""
    from web_page import cd_export

    root = cd_export(tmp_path / "cd")
    paths = sorted(p for p in root.rglob("*") if p.is_file())
    relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
    client = FakeServer()
    app = new_app(client)
    real = client.open_volume
    errors = [ServerUnavailable("LiverSAM server at http://x is not reachable: connection refused"),
              ServerError(503, "the server cannot open another CT", "POST", "/v1/sessions"),
              ServerRequestError(422, "spacing (i,j,k mm) must be positive", "POST", "/v1/sessions")]

    def flaky(*args, **kwargs):
        if errors:
            raise errors.pop(0)
        return real(*args, **kwargs)

    client.open_volume = flaky

    async def scenario():
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)
        assert app.state.error.startswith("The DICOM series 1 'Abdomen S1' of the uploaded folder 'cd' was read, but "
                                          "the LiverSAM server could not open it: LiverSAM server at http://x is not "
                                          "reachable: connection refused. It is one of the 2 DICOM series"), \
            app.state.error
        rows = app.state.other_series_rows  # (no CT is shown)
        assert [(r["openable"], r["failed"]) for r in rows] == [(True, False), (True, False)]
        await app._open_series(rows[0]["key"], "other")  # a 5xx: still clickable
        await settle(app)
        assert "could not open it: " in app.state.error and "Choose another" not in app.state.error, app.state.error
        assert [r["failed"] for r in app.state.other_series_rows] == [False, False]
        await app._open_series(rows[0]["key"], "other")  # a 422 about the volume: marked
        await settle(app)
        assert "the LiverSAM server refused it: spacing (i,j,k mm) must be positive." in app.state.error
        assert [(r["openable"], r["failed"]) for r in app.state.other_series_rows] == [(False, True), (True, False)]
        await app._open_series(rows[1]["key"], "other")  # the server answers: series 2 opens
        await settle(app)
        assert not app.state.error and app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd", \
            app.state.error

    asyncio.run(scenario())


def test_another_upload_of_the_same_folder_name_and_series_is_asked_about_the_unexported_work(tmp_path):
    """The unexported-work guard said once per (what, list position, work): another upload of a folder of the same name
    holding another series of the same label opened without asking and dropped the work. Now the content (the series'
    UID, the files' names and sizes) counts too; the same files uploaded again still discard it, as said."""
    from web_page import cd_export

    first, second = cd_export(tmp_path / "x1"), cd_export(tmp_path / "x2")  # (each export's series UIDs are new)
    nrrd = write_nrrd(tmp_path / "other.nrrd", synthetic_ct(), np.eye(3))
    app = new_app(FakeServer())

    async def upload(root: Path) -> None:
        paths = sorted(p for p in root.rglob("*") if p.is_file())
        relative = [f"cd/{p.relative_to(root).as_posix()}" for p in paths]
        await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder",
                             relative)
        await settle(app)

    async def scenario():
        await open_ct(app, nrrd)
        app._jump(5)
        drag_box(app, (10, 10, 5), (30, 30, 5))
        await settle(app)
        assert app._unexported_work()
        await upload(first)
        assert "upload it again to discard it" in app.state.error and app.state.ct_name == "other.nrrd"
        await upload(second)  # another series of the same folder name and label: asked again
        assert "upload it again to discard it" in app.state.error, app.state.error
        assert app.state.ct_name == "other.nrrd" and app._unexported_work()
        await upload(second)  # the same files again: the work is discarded
        assert not app.state.error and app.state.ct_name.startswith("12 DICOM files of series 1"), app.state.error

    asyncio.run(scenario())


def test_an_upload_that_fails_unexpectedly_frees_only_the_busy_it_set(tmp_path, monkeypatch):
    """An upload that failed unexpectedly cleared `busy` whenever no propagation ran, even when another open owned it
    (its "Opening ..." gone while it still read the CT, and a third open let in). Now only the busy the upload set
    (unpacking a .zip) is cleared."""
    import zipfile

    from liversam_web import app as app_module

    app = new_app(FakeServer())

    def broken(*args, **kwargs):
        raise RuntimeError("unpacking crashed")

    async def scenario():
        app._set_busy("Opening another.nii.gz ...")  # another open owns the page
        monkeypatch.setattr(app_module, "is_zip", lambda path: (_ for _ in ()).throw(ValueError("embedded null byte")))
        await app._on_upload([{"name": "x", "content": b"1"}], "cd/x", "folder", ["cd/x"])
        assert "(ValueError: embedded null byte)" in app.state.error, app.state.error
        assert app.state.busy and app.state.busy_text == "Opening another.nii.gz ..."
        app._set_busy("")
        monkeypatch.undo()
        monkeypatch.setattr(app_module, "unpack_zip", broken)
        archive = tmp_path / "series.zip"
        with zipfile.ZipFile(archive, "w") as zipped:
            zipped.writestr("a.dcm", b"1")
        await app._on_upload([{"name": "series.zip", "content": archive.read_bytes()}], "", "file")
        assert "(RuntimeError: unpacking crashed)" in app.state.error, app.state.error
        assert not app.state.busy and not app._uploads_open

    asyncio.run(scenario())


def _scene_ids(app) -> set[str]:
    scene = app.slicer_app.scene
    return {scene.GetNthNode(n).GetID() for n in range(scene.GetNumberOfNodes())}


def _fail_in_rollback(app, patch) -> None:
    """The 3D views' reset fails from now on (as the rollback of a failed open turns the views back)."""

    def reset_view(*_args):
        raise RuntimeError("the 3D view cannot be reset")

    for view in app.slicer_app.view_manager.get_threed_views():
        patch.setattr(view, "reset_view", reset_view)


def _remove_all_but_the_ct(patch) -> None:
    """``SceneContent.remove`` takes the segmentation and markups away, then fails before the CT."""
    from liversam_web import mrml_scene

    def remove(content):
        for node in [*content._markups, content.segmentation]:
            mrml_scene._remove_with_display(content.scene, node)
        raise RuntimeError("the scene could not take the CT away")

    patch.setattr(mrml_scene.SceneContent, "remove", remove)


# where the open fails: reading, reordering, the segmentation, the session, the views; with the page turned to the
# new CT (its undo state, its series lists); then also the rollback's view reset, or the removal of its scene content
FAILURES = ["reader", "reorientation", "segmentation", "session", "views", "undo", "series lists",
            "undo, and the views' rollback", "undo, and removing its content"]


@pytest.mark.parametrize("where", FAILURES)
@pytest.mark.parametrize("before", ["a CT with work", "nothing"])
def test_an_open_that_fails_unexpectedly_leaves_the_scene_as_it_was(where, before, tmp_path, monkeypatch):
    """A RuntimeError or MemoryError after the new CT was read (checking it, reordering its slices, building its
    segmentation, after the server opened its session, while the views were turned to it) freed the page but left a
    half-opened case: the new volume (and its segmentation) in the scene, the server's session open, or the new CT in
    the views with the old one's work (or the views showing a volume that was removed). The open is now all or
    nothing: the scene, the views, the page and the server are as before the open, and the error is told.

    Also when the page had been turned to the new CT (its name, slice count, export names) and a view then could not
    be turned back: the page kept the new CT's name and export names over the case before's work; and when taking the
    new CT's segmentation away failed: its CT stayed in the scene."""
    from liversam_web import app as app_module
    from liversam_web import mrml_scene

    client = FakeServer()
    app = new_app(client)
    first = write_nrrd(tmp_path / "a.nrrd", synthetic_ct(), DIRECTIONS["lps"])
    second = write_nrrd(tmp_path / "b.nrrd", synthetic_ct()[1:11], DIRECTIONS["ras"])
    patch_of: list = []

    def boom(*_args, **_kwargs):
        if where == "undo, and the views' rollback":
            _fail_in_rollback(app, patch_of[0])
        raise (MemoryError if where in ("reader", "session") else RuntimeError)("boom")

    async def scenario():
        if before != "nothing":
            await open_ct(app, first)
            app._jump(5)
            drag_box(app, (8, 16, 5), (20, 30, 5))
            await settle(app)
            app._exported_at = app.workflow.change_marker()  # exported: no guard in the way
        content, workflow, ids = app.content, app.workflow, _scene_ids(app)
        state = {key: app.state[key] for key in ("ct_name", "ct_source", "n_slices", "has_ct", "export_names",
                                                 "axial_k", "status", "can_undo", "undo_label", "window",
                                                 "series_rows", "series_caption", "other_series_rows",
                                                 "other_series_caption", "has_dicom", "dicom_note")}
        sessions = set(client.sessions)
        shown = content.volume.GetID() if content is not None else None
        with monkeypatch.context() as patch:
            patch_of.append(patch)
            if where == "reader":
                patch.setattr(mrml_scene, "check_ct", boom)
            elif where == "reorientation":
                patch.setattr(app_module, "reorient_volume_to_axial", boom)
            elif where == "segmentation":
                patch.setattr(mrml_scene, "_add_segment", boom)
            elif where == "session":
                patch.setattr(app_module, "Workflow", boom)
            elif where == "views":  # (before the page is turned to the new CT)
                patch.setattr(app, "_attach_prompting", boom)
            elif where == "series lists":
                patch.setattr(app, "_show_series_lists", boom)
            else:  # the page turned to the new CT (b.nrrd, 10 slices, its export names), its undo state not
                patch.setattr(app, "_sync_undo", boom)
                if where == "undo, and removing its content":
                    _remove_all_but_the_ct(patch)
            await app._open_path(str(second))
            await settle(app)
        error = "MemoryError: boom" if where in ("reader", "session") else "RuntimeError: boom"
        assert app.state.error.startswith(f"'{second}' could not be opened on the app's machine ({error})"), \
            app.state.error
        assert not app.state.busy
        assert _scene_ids(app) == ids  # nothing of b.nrrd is left in the scene, nothing of a.nrrd removed
        assert app.content is content and app.workflow is workflow
        assert {key: app.state[key] for key in state} == state
        for _ in range(100):  # (closed in a worker thread)
            if set(client.sessions) == sessions:
                break
            await asyncio.sleep(0.05)
        assert set(client.sessions) == sessions  # the session opened for b.nrrd is closed again
        assert [view.get_background_volume_id() for view in app.slicer_app.view_manager.get_slice_views()] == \
            [shown] * 3
        if workflow is not None:
            assert workflow.masks["liver"][5].any() and app._current_k() == 5

        await app._open_path(str(second))  # nothing failing: it opens
        await settle(app)
        assert not app.state.error and app.state.ct_name == "b.nrrd" and app.content.shape_kji[0] == 10, \
            app.state.error
        assert [view.get_background_volume_id() for view in app.slicer_app.view_manager.get_slice_views()] == \
            [app.content.volume.GetID()] * 3

    asyncio.run(scenario())


def test_an_open_cancelled_while_the_server_opens_its_ct_leaves_no_session_and_frees_the_page(tmp_path):
    """An open cancelled (its task) while the server opened the CT's session: the worker thread went on and opened
    the session, never closed (its id came after the cancellation), and the page stayed busy for good (the
    cancellation is no Exception): every later open was refused "Wait for the current step". Now the session is closed
    once it comes, the page is free and shows the case before, and the next open works."""
    client = FakeServer()
    app = new_app(client)
    first = write_nrrd(tmp_path / "a.nrrd", synthetic_ct(), DIRECTIONS["lps"])
    second = write_nrrd(tmp_path / "b.nrrd", synthetic_ct()[1:11], DIRECTIONS["ras"])
    real = client.open_volume
    called, answer = threading.Event(), threading.Event()

    def slow_open(*args, **kwargs):
        called.set()
        answer.wait(30)
        return real(*args, **kwargs)

    async def scenario():
        await open_ct(app, first)
        content, ids, sessions = app.content, _scene_ids(app), set(client.sessions)
        state = {key: app.state[key] for key in ("ct_name", "n_slices", "export_names", "status")}
        client.open_volume = slow_open
        opening = asyncio.ensure_future(app._open_path(str(second)))
        for _ in range(600):
            if called.is_set():
                break
            await asyncio.sleep(0.05)
        assert called.is_set() and app.state.busy
        opening.cancel()
        with pytest.raises(asyncio.CancelledError):
            await opening
        answer.set()  # the server opens b.nrrd's session after all
        for _ in range(100):
            if len(client.calls) > 1 and set(client.sessions) == sessions:
                break
            await asyncio.sleep(0.05)
        assert [c[0] for c in client.calls] == ["open", "open"]  # b.nrrd's session was opened ...
        assert set(client.sessions) == sessions  # ... and closed again
        assert not app.state.busy and app.state.busy_text == ""
        assert app.content is content and _scene_ids(app) == ids
        assert {key: app.state[key] for key in state} == state
        assert "was not opened: opening it was cancelled" in app.state.error, app.state.error

        client.open_volume = real
        await app._open_path(str(second))
        await settle(app)
        assert not app.state.error and app.state.ct_name == "b.nrrd", app.state.error

    asyncio.run(scenario())


def _not_in_hu(root: Path) -> Path:
    """``root``'s series 1 out of Hounsfield units (its intercept 2000): it fails to open, series 2 opens."""
    import pydicom

    for path in (root / "DICOM" / "S1").iterdir():
        header = pydicom.dcmread(path)
        header.RescaleIntercept = 2000
        header.save_as(path)
    return root


async def _upload_folder(app, folder: Path, name: str) -> None:
    paths = sorted(p for p in folder.rglob("*") if p.is_file())
    relative = [f"{name}/{p.relative_to(folder).as_posix()}" for p in paths]
    await app._on_upload([{"name": p.name, "content": p.read_bytes()} for p in paths], relative[0], "folder", relative)
    await settle(app)


def test_the_ct_shown_keeps_its_series_list_beside_the_list_of_an_upload_that_opened_nothing(tmp_path):
    """After an upload whose series tried failed to open (cd2), its list replaced the CT shown's (cd): the CT shown's
    other series could no longer be chosen (its list came back only when its files were opened again). Now the CT
    shown's list stays, cd2's is listed under it; a series of the CT shown's list opens after the unexported-work
    guard ("choose it again in the series list"), with its own export names (cd-s2-...), and cd2's list and files go
    once it is open."""
    from web_page import cd_export

    first, second = cd_export(tmp_path / "cd"), _not_in_hu(cd_export(tmp_path / "cd2"))
    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)

    async def scenario():
        await _upload_folder(app, first, "cd")
        assert app.state.export_names["segnrrd"] == "cd-s1-liversam.seg.nrrd" and not app.state.error
        (cd,) = uploads.glob("upload-*")
        app._jump(5)
        drag_box(app, (100, 100, 5), (300, 300, 5))
        await settle(app)
        assert app._unexported_work()

        await _upload_folder(app, second, "cd2")
        assert app.state.error.startswith("The DICOM series 1 'Abdomen S1' of the uploaded folder 'cd2' does not "
                                          "look like a CT"), app.state.error
        assert app.state.series_caption.startswith("DICOM series of the uploaded folder 'cd', the files of the CT "
                                                   "shown"), app.state.series_caption
        assert [(r["number"], r["shown"]) for r in app.state.series_rows] == [("1", True), ("2", False)]
        assert app.state.other_series_caption.startswith("DICOM series of the uploaded folder 'cd2', chosen after the "
                                                         "CT shown"), app.state.other_series_caption
        assert [(r["number"], r["failed"]) for r in app.state.other_series_rows] == [("1", True), ("2", False)]
        assert app.state.status.startswith("The 2 DICOM series of the uploaded folder 'cd2' are listed in section 1 "
                                           "under the series of the CT shown"), app.state.status
        (cd2,) = set(uploads.glob("upload-*")) - {cd}

        key = app.state.series_rows[1]["key"]
        await app._open_series(key, "shown")  # the CT shown's series 2: the work is asked about first
        await settle(app)
        assert ("opening 8 DICOM files of series 2 'Abdomen S2' in cd drops it: export it first (section 6), or choose "
                "it again in the series list to discard it.") in app.state.error, app.state.error
        assert app.content.shape_kji[0] == 12 and len(app.state.other_series_rows) == 2
        await app._open_series(key, "shown")
        await settle(app)
        assert not app.state.error and app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd", \
            app.state.error
        assert app.content.dicom.folder.startswith(str(cd))
        assert app.state.export_names["segnrrd"] == "cd-s2-liversam.seg.nrrd", app.state.export_names
        assert [r["shown"] for r in app.state.series_rows] == [False, True]
        assert app.state.other_series_rows == [] and app.state.other_series_caption == ""
        assert list(uploads.glob("upload-*")) == [cd] and not cd2.exists()

    asyncio.run(scenario())


def test_a_series_of_the_list_of_an_upload_that_opened_nothing_opens_and_its_list_can_be_closed(tmp_path):
    """The list of an upload whose series tried failed (cd2), beside the CT shown's (cd): its series 2 opens after the
    unexported-work guard (which names that list), exported under cd2's names, and its list becomes the CT shown's
    with series 1 still marked failed; the CT shown's list before and its upload go. A list of such files can be closed
    (its upload's files removed), the CT shown's list staying."""
    from web_page import cd_export

    first, second = cd_export(tmp_path / "cd"), _not_in_hu(cd_export(tmp_path / "cd2"))
    app = new_app(FakeServer())
    uploads = Path(app._tmp.name)

    async def scenario():
        await _upload_folder(app, first, "cd")
        (cd,) = uploads.glob("upload-*")
        app._jump(5)
        drag_box(app, (100, 100, 5), (300, 300, 5))
        await settle(app)
        await _upload_folder(app, second, "cd2")
        (cd2,) = set(uploads.glob("upload-*")) - {cd}
        key = app.state.other_series_rows[1]["key"]
        await app._open_series(key, "other")
        await settle(app)
        assert ("opening 8 DICOM files of series 2 'Abdomen S2' in cd2 drops it: export it first (section 6), or "
                "choose it again in the list of the DICOM series of the uploaded folder 'cd2' to discard it.") \
            in app.state.error, app.state.error
        await app._open_series(key, "other")
        await settle(app)
        assert not app.state.error and app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd2", \
            app.state.error
        assert app.state.export_names["segnrrd"] == "cd2-s2-liversam.seg.nrrd", app.state.export_names
        assert [(r["failed"], r["shown"]) for r in app.state.series_rows] == [(True, False), (False, True)]
        assert app.state.series_caption.startswith("DICOM series of the uploaded folder 'cd2', the files of the CT "
                                                   "shown") and app.state.other_series_rows == []
        assert list(uploads.glob("upload-*")) == [cd2] and not cd.exists()

        await _upload_folder(app, _not_in_hu(cd_export(tmp_path / "cd3")), "cd3")  # (nothing to guard: no work)
        assert len(app.state.other_series_rows) == 2 and len(list(uploads.glob("upload-*"))) == 2
        status = app.state.status
        app.forget_other_series()
        assert app.state.other_series_rows == [] and app._other_series is None
        assert [r["shown"] for r in app.state.series_rows] == [False, True]
        assert list(uploads.glob("upload-*")) == [cd2]
        assert status.startswith("The 2 DICOM series of the uploaded folder 'cd3'") and \
            app.state.status == status[status.index("Opened"):], app.state.status

    asyncio.run(scenario())


@pytest.mark.parametrize("also", ["", "the views' rollback"])
def test_an_open_that_fails_unexpectedly_leaves_both_series_lists_as_they_were(also, tmp_path, monkeypatch):
    """The CT shown's series list (cd) and the list of an upload whose series tried failed (cd2): an open failing
    unexpectedly after the page was turned to the new CT (here cd2's series 2, its undo state not set; also with the
    3D views failing to be turned back) leaves both lists, their captions, the CT shown's name and export names and
    both uploads' files as they were; cd2's series 2 then opens from its list. (The page kept the new CT's name,
    export names and series list when a view could not be turned back.)"""
    from web_page import cd_export

    first, second = cd_export(tmp_path / "cd"), _not_in_hu(cd_export(tmp_path / "cd2"))
    client = FakeServer()
    app = new_app(client)
    uploads = Path(app._tmp.name)
    keys = ("ct_name", "n_slices", "export_names", "series_rows", "series_caption", "other_series_rows",
            "other_series_caption", "status")

    async def scenario():
        await _upload_folder(app, first, "cd")
        await _upload_folder(app, second, "cd2")
        assert len(app.state.series_rows) == 2 and len(app.state.other_series_rows) == 2, app.state.error
        page = {key: app.state[key] for key in keys}
        folders, content, sessions = set(uploads.glob("upload-*")), app.content, set(client.sessions)
        with monkeypatch.context() as patch:
            def boom(*_args):
                if also:
                    _fail_in_rollback(app, patch)
                raise RuntimeError("boom")

            patch.setattr(app, "_sync_undo", boom)
            await app._open_series(app.state.other_series_rows[1]["key"], "other")
            await settle(app)
        assert app.state.error.startswith("The DICOM series 2 'Abdomen S2' of the uploaded folder 'cd2' could not be "
                                          "opened on the app's machine (RuntimeError: boom)"), app.state.error
        assert {key: app.state[key] for key in keys} == page
        assert page["export_names"]["segnrrd"] == "cd-s1-liversam.seg.nrrd"
        assert app.content is content and set(uploads.glob("upload-*")) == folders and not app.state.busy
        for _ in range(100):
            if set(client.sessions) == sessions:
                break
            await asyncio.sleep(0.05)
        assert set(client.sessions) == sessions

        await app._open_series(app.state.other_series_rows[1]["key"], "other")
        await settle(app)
        assert not app.state.error and app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd2", \
            app.state.error
        assert app.state.export_names["segnrrd"] == "cd2-s2-liversam.seg.nrrd"

    asyncio.run(scenario())


def test_a_series_of_the_other_list_that_opens_empties_the_field_of_the_upload_before(tmp_path):
    """cd's files chosen in the file field (the CT shown), then cd2's folder whose series 1 fails: opening cd2's
    series 2 from its list removed cd's upload, but the file field still showed cd's files. Now every upload field is
    emptied then. A series of a list that failed says which list to choose another in (it said "the list")."""
    from web_page import cd_export

    first, second = cd_export(tmp_path / "cd"), _not_in_hu(cd_export(tmp_path / "cd2"))
    app = new_app(FakeServer())

    async def scenario():
        paths = sorted(p for p in (first / "DICOM").rglob("*") if p.is_file())
        await app._on_upload([{"name": f"{p.parent.name}-{p.name}", "content": p.read_bytes()} for p in paths], "",
                             "file")
        await settle(app)
        assert app.state.ct_name.startswith("12 DICOM files of series 1") and not app.state.error, app.state.error
        await _upload_folder(app, second, "cd2")
        assert len(app.state.other_series_rows) == 2, app.state.error
        await app._open_series(app.state.other_series_rows[0]["key"], "other")  # (not clickable: marked failed)
        assert app.state.error.endswith("Choose another series in the list of the DICOM series of the uploaded "
                                        "folder 'cd2'."), app.state.error
        keys = dict(app.state.upload_keys)
        await app._open_series(app.state.other_series_rows[1]["key"], "other")
        await settle(app)
        assert app.state.ct_name == "8 DICOM files of series 2 'Abdomen S2' in cd2", app.state.error
        assert all(app.state.upload_keys[field] > keys[field] for field in keys), (keys, app.state.upload_keys)
        await app._open_series(app.state.series_rows[0]["key"], "shown")
        assert app.state.error.endswith("Choose another series in the series list of the CT shown."), app.state.error

    asyncio.run(scenario())
