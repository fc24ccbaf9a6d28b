"""The Slicer module recovers from a session the LiverSAM server lost, without the user repeating the step.

A server evicts the least recently used idle CT at ``--max-sessions``, closes CTs idle past ``--idle-timeout`` and
loses every CT when it restarts; it then answers 404 "unknown session". The module's request is repeated once on the
CT sent again, on the I/O thread (``CTSession.call``), and a propagation job the server lost is started again once
(``PropagationPlan.poll``). Driven with the module's own code (``ServerSegmentation``, ``SegmentationLogic``,
``CallQueue``) on slicer-core's MRML against real ``liversam serve`` processes; the masks are checked against the
expert label of lits117.
"""

from __future__ import annotations

import socket
import sys
import threading
import time

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

from liversam.ct_io import read_ct  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, PromptPlacement, ServerRequests  # noqa: E402
from LiverSAMLib.BackgroundCalls import CallQueue  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerClient import (  # noqa: E402
    JobLost,
    LiverSAMClient,
    LocalServerProcess,
    ServerRequestError,
    job_lost,
    session_lost,
)
from LiverSAMLib.ServerSegmentation import ServerSegmentation  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.model]
WINDOW = (40.0, 400.0)
TOKEN = "session-recovery-test-token"
MIN_SLICE_DICE = 0.9  # a box around lits117's liver on a slice: 0.95-0.98 (test_slicer_server_path)
# Two slices each way (5 in all): a short job on a shared CPU.
JOB_SETTINGS = {**ServerRequests.PROPAGATION_DEFAULTS, "max_slices": 2}


class RestartableServer:
    """``liversam serve`` on a fixed port and token with ``--max-sessions 1``: restarted, it answers at the same
    URL to the same token, as a remote server restarted by its administrator does."""

    def __init__(self) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: LocalServerProcess | None = None

    def start(self) -> None:
        arguments = ["--port", str(self.port), "--token", TOKEN, "--max-sessions", "1", "--model", "litemedsam",
                     "--device", "cpu"]  # fmt: skip
        self.process = LocalServerProcess(sys.executable, extra_args=arguments, startup_timeout=180)
        self.process.start()

    def restart(self) -> None:
        self.stop()
        self.start()

    def stop(self) -> None:
        if self.process is not None:
            self.process.stop()
            self.process = None


class GatedClient(LiverSAMClient):
    """Counts the CTs sent; while ``hold`` is set an upload waits until the test lets it go (a click arrives
    meanwhile)."""

    def __init__(self, url: str) -> None:
        super().__init__(url, TOKEN)
        self.uploads = 0
        self.opened: list[str] = []
        self.hold = False
        self.uploading = threading.Event()
        self.go = threading.Event()

    def open_volume(self, *args, **kwargs):
        self.uploads += 1
        if self.hold:
            self.uploading.set()
            assert self.go.wait(120), "the test never let the upload go"
        info = super().open_volume(*args, **kwargs)
        self.opened.append(info["session_id"])
        return info


@pytest.fixture(scope="module")
def server():
    server = RestartableServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def modules():
    """``modules(ct)``: the module's logic on a CT in a fresh scene; its I/O thread ends with the test."""
    made: list[Module] = []

    def make(ct: CTVolume) -> Module:
        made.append(Module(ct))
        return made[-1]

    yield make
    for module in made:
        module.calls.close()


@pytest.fixture(scope="module")
def lits117():
    folder = shared_data_dir() / "lits117"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    return read_ct(folder / "ct.nii.gz"), labels >= 1


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def slab(ct: CTVolume, liver: np.ndarray, k0: int, nk: int) -> tuple[CTVolume, np.ndarray]:
    g = ct.geometry
    geometry = ImageGeometry((g.size_ijk[0], g.size_ijk[1], nk), g.spacing_mm, tuple(g.ijk_to_lps([0, 0, k0])),
                             g.direction_lps)  # fmt: skip
    return CTVolume(np.array(ct.array_kji[k0 : k0 + nk]), geometry), liver[k0 : k0 + nk]


def mirrored(ct: CTVolume) -> CTVolume:
    """Another CT (left and right swapped): a click answered on it instead of the module's CT misses the liver."""
    return CTVolume(np.ascontiguousarray(ct.array_kji[:, :, ::-1]), ct.geometry)


def open_elsewhere(server: RestartableServer, ct: CTVolume) -> str:
    """Another client opens a CT: with ``--max-sessions 1`` the server evicts the module's CT."""
    g = ct.geometry
    other = LiverSAMClient(server.url, TOKEN)
    return other.open_volume(ct.array_kji, g.spacing_mm, g.origin_lps, g.direction_lps.ravel())["session_id"]


class Module:
    """The module's logic on one CT in a fresh scene: prompts from markups, requests through a CallQueue."""

    def __init__(self, ct: CTVolume) -> None:
        self.scene = fresh_scene()
        self.volume = MRMLBridge.volume_node_from_ct(ct, "ct", self.scene)
        self.segmentation = self.scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
        self.logic = SegmentationLogic(scene=self.scene)
        self.logic.prepare_segmentation(self.segmentation, self.volume)
        self.liver_id = self.logic.ensure_segment(self.segmentation, LIVER)
        self.server = ServerSegmentation(self.logic)
        self.calls = CallQueue()

    def prompts(self, liver_ji: np.ndarray, k: int):
        PromptPlacement.remove_box_nodes(self.scene)
        geometry = MRMLBridge.geometry_from_volume_node(self.volume)
        js, is_ = np.nonzero(liver_ji)
        corners = geometry.ijk_to_ras(
            np.array([[is_.min(), js.min(), k], [is_.max(), js.max(), k]], dtype=float)
        )
        roi = PromptPlacement.new_box_node(self.scene)
        roi.SetCenterWorld(*corners.mean(axis=0))
        roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
        return MRMLBridge.prompts_from_markups(geometry, roi_nodes=[roi])

    def submit_click(self, client: LiverSAMClient, liver_ji: np.ndarray, k: int, answers: list) -> None:
        """A live update as the widget sends it: planned here (the main thread), run on the I/O thread."""
        requests = ServerRequests.slice_requests(self.prompts(liver_ji, k))
        work = self.server.predict_slices_work(self.volume, requests, WINDOW)
        self.calls.submit(lambda: work(client), answers.append, answers.append, key="live")

    def poll_until(self, event: threading.Event, failure: str) -> None:
        """Deliver answers (as the widget's QTimer does) until the I/O thread sets ``event``."""
        deadline = time.monotonic() + 120
        while not event.is_set():
            assert time.monotonic() < deadline, failure
            self.calls.poll(0.03)

    def deliver(self, answers: list, count: int = 1) -> None:
        deadline = time.monotonic() + 600
        while len(answers) < count and time.monotonic() < deadline:
            self.calls.poll(0.03)  # what the widget's QTimer tick does
        assert len(answers) == count, "the server's answers did not arrive"
        failures = [a for a in answers if isinstance(a, BaseException)]
        assert not failures, f"a request failed: {failures}"

    def write(self, masks: dict) -> np.ndarray:
        self.logic.apply_slice_masks(masks, self.segmentation, self.liver_id, self.volume)
        return MRMLBridge.segment_mask(self.segmentation, self.liver_id, self.volume)

    def click(self, client: LiverSAMClient, liver_ji: np.ndarray, k: int) -> np.ndarray:
        """One click delivered and written; returns the segment's mask on slice ``k``."""
        answers: list = []
        self.submit_click(client, liver_ji, k, answers)
        self.deliver(answers)
        return self.write(answers[0][0])[k]


def test_only_the_servers_unknown_session_and_unknown_job_answers_count_as_lost():
    unknown = "unknown session 'abc': it does not exist, was closed or evicted (idle for 3600 s or least recently used)"
    assert session_lost(ServerRequestError(404, unknown, "POST", "/sessions/abc/predict"))
    closed = "session 'abc' was closed while this job was being started; open the CT again"
    assert session_lost(ServerRequestError(404, closed, "POST", "/sessions/abc/jobs/propagate"))
    older_server = ServerRequestError(404, "Not Found", "POST", "/sessions/abc/prefetch")  # a path it lacks
    assert not session_lost(older_server)
    assert not session_lost(ServerRequestError(409, unknown, "POST", "/sessions/abc/predict"))
    assert not session_lost(ServerRequestError(404, unknown, "GET", "/jobs/j1"))
    assert job_lost(
        ServerRequestError(404, "unknown job 'j1': it does not exist, was forgotten", "GET", "/jobs/j")
    )
    no_segment = "job 'j1' has no segment 'tumor' (segments: liver)"
    assert not job_lost(ServerRequestError(404, no_segment, "GET", "/jobs/j1/masks/tumor"))
    assert not session_lost(ServerRequestError(404, no_segment, "GET", "/jobs/j1/masks/tumor"))


def test_a_session_opened_while_the_scene_closes_is_not_kept(modules):
    """The I/O thread opens a CT's session while the main thread forgets the sessions (scene closed, another server):
    the session opened for the old scene is not remembered, so the next request opens the CT again."""

    class Client:
        def __init__(self) -> None:
            self.opened: list[str] = []
            self.uploading, self.go = threading.Event(), threading.Event()

        def open_volume(self, *args, **kwargs):
            self.uploading.set()
            assert self.go.wait(30)
            self.opened.append(f"s{len(self.opened) + 1}")
            return {"session_id": self.opened[-1]}

    geometry = ImageGeometry((8, 8, 2), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3))
    ct = CTVolume(np.zeros((2, 8, 8), np.int16), geometry)
    module, client, answers = modules(ct), Client(), []
    session_of = module.server.session_work(module.volume, WINDOW)
    module.calls.submit(lambda: session_of(client), answers.append, answers.append)
    module.poll_until(client.uploading, "the session's CT was never sent")
    module.server.forget()  # main thread, while the I/O thread waits for the server's answer
    client.go.set()
    module.deliver(answers)
    assert module.server.session_work(module.volume, WINDOW)(client) == "s2"  # opened again, not the stale s1
    assert client.opened == ["s1", "s2"]


def test_a_click_after_the_server_evicted_the_ct_reopens_it_and_is_answered(server, lits117, modules):
    ct, liver = lits117
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    module, client = modules(ct), GatedClient(server.url)
    first = module.click(client, liver[k], k)
    assert dice(first, liver[k]) > MIN_SLICE_DICE
    (lost,) = client.opened

    other = open_elsewhere(server, mirrored(ct))  # --max-sessions 1: the module's CT is evicted
    with pytest.raises(ServerRequestError) as raised:
        client.session_info(lost)
    assert session_lost(raised.value)

    # another slice: encoded on the reopened session, whose CT must be the module's, not the mirrored one
    k2 = k - 3
    second = module.click(client, liver[k2], k2)
    print(f"lits117 slice {k2} after the eviction: Dice {dice(second, liver[k2]):.3f}")
    assert dice(second, liver[k2]) > MIN_SLICE_DICE
    assert client.uploads == 2  # the CT was sent again once
    reopened = client.opened[-1]
    assert reopened not in (lost, other) and module.server.sessions.ids() == [reopened]
    assert client.session_info(reopened)["shape_kji"] == list(ct.array_kji.shape)


def test_a_click_during_the_reopen_waits_for_it_and_sends_the_ct_once_more_only(server, lits117, modules):
    """Click, the server loses the CT, click again: while the second click's CT is on its way, a third click comes.
    Both are answered, on the one session the second click opened."""
    ct, liver = lits117
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    module, client = modules(ct), GatedClient(server.url)
    module.click(client, liver[k], k)
    open_elsewhere(server, mirrored(ct))

    client.hold, answers = True, []
    module.submit_click(client, liver[k - 2], k - 2, answers)
    module.poll_until(
        client.uploading, "the second click did not send the CT again"
    )  # it found the session lost
    module.submit_click(client, liver[k + 2], k + 2, answers)  # the third click, during that upload
    client.go.set()
    module.deliver(answers, count=2)
    # the first click's upload and one reopen: the third click used the reopened session
    assert client.uploads == 2
    (second_masks, _), (third_masks, _) = answers
    assert list(second_masks) == [k - 2] and list(third_masks) == [k + 2]
    module.write(second_masks)
    written = module.write(third_masks)
    for slice_k in (k - 2, k + 2):
        assert dice(written[slice_k], liver[slice_k]) > MIN_SLICE_DICE


def test_a_click_after_the_server_restarted_is_answered(server, lits117, modules):
    ct, liver = lits117
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    module, client = modules(ct), GatedClient(server.url)
    module.click(client, liver[k], k)
    server.restart()  # the same URL and token; every session is gone
    second = module.click(client, liver[k + 3], k + 3)
    assert dice(second, liver[k + 3]) > MIN_SLICE_DICE
    assert client.uploads == 2


def wait_until(client: LiverSAMClient, job: str, done: int | None = None) -> dict:
    """The job's status once it has ``done`` slices (None: once it has finished)."""
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        status = client.job_status(job)
        if status["state"] in ("done", "failed", "cancelled") or (
            done is not None and (status.get("done") or 0) >= done
        ):
            return status
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not get there: {status}")


def poll_until_result(plan, client: LiverSAMClient) -> list[dict]:
    """What the widget's job timer does: ``plan.poll`` until the status carries the result."""
    statuses = []
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        statuses.append(plan.poll(client))
        if "result" in statuses[-1] or statuses[-1]["state"] in ("failed", "cancelled"):
            return statuses
        time.sleep(0.3)
    raise AssertionError(f"the propagation did not finish: {statuses[-1]}")


def liver_slab_plan(server, lits117, modules):
    """A 9-slice lits117 slab around the liver's largest slice in the module, a client of ``server`` and the plan of
    the liver's propagation from a box on the slab's middle slice: (module, client, plan, slab_ct, liver)."""
    ct, labels = lits117
    k_mid = int(np.argmax(labels.sum(axis=(1, 2))))
    slab_ct, liver = slab(ct, labels, k_mid - 4, 9)
    module, client = modules(slab_ct), GatedClient(server.url)
    plan = module.server.plan_propagation(module.segmentation, module.volume, module.liver_id, None,
                                          module.prompts(liver[4], 4), JOB_SETTINGS, WINDOW)  # fmt: skip
    return module, client, plan, slab_ct, liver


def test_a_propagation_the_server_lost_mid_job_runs_again_and_is_written(server, lits117, modules):
    module, client, plan, slab_ct, liver = liver_slab_plan(server, lits117, modules)
    first_job = plan.start(client)
    assert wait_until(client, first_job, done=1)["state"] in ("running", "done")
    server.restart()  # mid-job: the job and its CT are gone

    statuses = poll_until_result(plan, client)
    assert statuses[0].get("restarted") and plan.restarted and plan.job_id != first_job
    assert statuses[-1]["state"] == "done", statuses[-1]
    module.server.apply_propagation(plan, statuses[-1]["result"])
    written = MRMLBridge.segment_mask(module.segmentation, module.liver_id, module.volume)
    print(f"lits117 slab propagated by the restarted job: Dice {dice(written, liver):.3f}")
    assert written[[2, 6]].any() and not written[[0, 8]].any()  # two slices each way (max_slices 2)
    assert dice(written[2:7], liver[2:7]) > MIN_SLICE_DICE
    assert client.uploads == 2  # the CT was sent again for the restarted job


def test_a_propagation_lost_twice_says_to_press_propagate(server, lits117, modules):
    """The job's CT is evicted after the job finished, before the module fetched the result: it runs again; when
    that run is lost too, the error says what happened and what to do, and nothing is written."""
    module, client, plan, slab_ct, liver = liver_slab_plan(server, lits117, modules)
    job = plan.start(client)
    assert wait_until(client, job)["state"] == "done"
    open_elsewhere(server, mirrored(slab_ct))  # evicts the finished job's CT: the job goes with it

    restarted = plan.poll(client)
    assert restarted.get("restarted") and restarted["state"] in ("queued", "running", "done")
    assert wait_until(client, plan.job_id)["state"] == "done"
    open_elsewhere(server, mirrored(slab_ct))
    with pytest.raises(JobLost, match="press Propagate to run it again"):
        plan.poll(client)
    assert module.logic.segment_is_empty(module.segmentation, module.liver_id)
