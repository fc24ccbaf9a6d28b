"""A CT stored in sagittal or coronal slices is segmented in the Slicer module on its axial slices.

The module sends the server the CT's axial copy (``liversam.axial_orientation``: voxels permuted and flipped, none
resampled), reads boxes drawn in the axial (Red) view on that axial grid, and writes every mask (live slices,
propagation) onto the voxels of the user's own volume. Checked with the module's own code (``MRMLBridge``,
``ServerSegmentation``, ``SegmentationLogic``) on slicer-core's MRML against a real ``liversam serve``: a sagittal and
a coronal copy of a lits117 slab, loaded as volume nodes, must give the same segment -- compared in physical space --
as the same box (in RAS) on the axial slab.
"""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
import test_slicer_session_recovery

from slicer_harness import ensure_module_on_path, shared_data_dir

ensure_module_on_path()

from liversam.axial_orientation import axial_reorientation  # noqa: E402
from liversam.ct_io import read_ct  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, PromptPlacement, ServerRequests  # noqa: E402
from LiverSAMLib.ServerClient import LiverSAMClient, LocalServerProcess  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.model]
WINDOW = (40.0, 400.0)
MIN_DICE = 0.99
HALF = 3  # the slab: the liver's largest slice and HALF slices each way
JOB_SETTINGS = {**ServerRequests.PROPAGATION_DEFAULTS, "max_slices": 2}


@pytest.fixture(scope="module")
def client():
    process = LocalServerProcess(sys.executable, extra_args=["--model", "litemedsam", "--device", "cpu"],
                                 startup_timeout=180)  # fmt: skip
    yield process.start()
    process.stop()


@pytest.fixture(scope="module")
def axial_slab():
    return lits117_slab()


def lits117_slab() -> tuple[CTVolume, np.ndarray]:
    """A slab of lits117 (axial, i to L, j to P, k to S) around the liver's largest slice, and its liver label."""
    folder = shared_data_dir() / "lits117"
    ct = read_ct(folder / "ct.nii.gz")
    liver = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz"))) >= 1
    assert np.allclose(ct.geometry.direction_lps, np.eye(3)), (
        "lits117 is expected on an LPS-aligned axial grid"
    )
    k_mid = int(np.argmax(liver.sum(axis=(1, 2))))
    g = ct.geometry
    k0 = k_mid - HALF
    geometry = ImageGeometry((g.size_ijk[0], g.size_ijk[1], 2 * HALF + 1), g.spacing_mm, tuple(g.ijk_to_lps([0, 0, k0])),
                             g.direction_lps)  # fmt: skip
    return CTVolume(np.array(ct.array_kji[k0 : k0 + 2 * HALF + 1]), geometry), liver[k_mid]


def stored_as(axial: CTVolume, plane: str) -> CTVolume:
    """The same voxels stored in sagittal or coronal slices, as a reformatted DICOM series stores them: rows run
    from superior to inferior, slices along L (sagittal) or P (coronal). Every voxel keeps its LPS position."""
    g = axial.geometry
    ni, nj, nk = g.size_ijk
    d = np.asarray(g.direction_lps, dtype=float)
    si, sj, sk = g.spacing_mm
    origin = tuple(g.ijk_to_lps([0, 0, nk - 1]))  # the top slice's first voxel: rows start superior
    if plane == "sagittal":  # i along P (axial j), j along -S (axial k reversed), k along L (axial i)
        array = np.transpose(axial.array_kji, (2, 0, 1))[:, ::-1, :]
        geometry = ImageGeometry(
            (nj, nk, ni), (sj, sk, si), origin, np.stack([d[:, 1], -d[:, 2], d[:, 0]], axis=1)
        )
    else:  # coronal: i along L (axial i), j along -S, k along P (axial j)
        array = np.transpose(axial.array_kji, (1, 0, 2))[:, ::-1, :]
        geometry = ImageGeometry(
            (ni, nk, nj), (si, sk, sj), origin, np.stack([d[:, 0], -d[:, 2], d[:, 1]], axis=1)
        )
    return CTVolume(np.ascontiguousarray(array), geometry)


def on_grid(mask_kji: np.ndarray, geometry: ImageGeometry, target: ImageGeometry) -> np.ndarray:
    """``mask_kji`` (on ``geometry``) sampled at the physical (LPS) centre of every voxel of ``target``."""
    nk, nj, ni = target.shape_kji
    kk, jj, ii = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ijk = np.stack([ii.ravel(), jj.ravel(), kk.ravel()], axis=1).astype(float)
    source = np.rint(geometry.lps_to_ijk(target.ijk_to_lps(ijk))).astype(int)
    assert np.allclose(geometry.lps_to_ijk(target.ijk_to_lps(ijk)), source, atol=1e-3), (
        "the grids' voxels differ"
    )
    return np.asarray(mask_kji)[source[:, 2], source[:, 1], source[:, 0]].reshape(nk, nj, ni)


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


class Module(test_slicer_session_recovery.Module):
    """The module's logic on one volume node in a fresh scene (requests run here, not on its I/O thread)."""

    def __init__(self, ct: CTVolume) -> None:
        super().__init__(ct)
        self.calls.close()

    def box(self, *boxes_ras: np.ndarray):
        """The module's prompts from boxes drawn in the axial view: each two corners (RAS) on one axial plane."""
        PromptPlacement.remove_box_nodes(self.scene)
        rois = []
        for corners_ras in boxes_ras:
            roi = PromptPlacement.new_box_node(self.scene)
            roi.SetAttribute(MRMLBridge.FIRST_CORNER_ATTRIBUTE, ",".join(f"{v:.6f}" for v in corners_ras[0]))
            roi.SetCenterWorld(*corners_ras.mean(axis=0))
            roi.SetSizeWorld(
                *(np.abs(corners_ras[1] - corners_ras[0]) + [0.0, 0.0, 0.5])
            )  # a thin box, as in Red
            rois.append(roi)
        return MRMLBridge.prompts_from_markups(
            MRMLBridge.geometry_from_volume_node(self.volume), roi_nodes=rois
        )

    def live(self, client: LiverSAMClient, prompts) -> np.ndarray:
        """A live slice prediction as the widget runs it (planned here, run, written), then the segment as written
        on the volume node's own voxels."""
        work = self.server.predict_slices_work(self.volume, ServerRequests.slice_requests(prompts), WINDOW)
        masks, _scores = work(client)
        self.logic.apply_slice_masks(masks, self.segmentation, self.liver_id, self.volume)
        return self.written()

    def propagate(self, client: LiverSAMClient, prompts, fix: bool = False) -> np.ndarray:
        plan = self.server.plan_propagation(self.segmentation, self.volume, self.liver_id, None, prompts, JOB_SETTINGS,
                                            WINDOW)  # fmt: skip
        plan.start(client)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            status = plan.poll(client)
            if "result" in status or status["state"] in ("failed", "cancelled"):
                break
            time.sleep(0.3)
        assert "result" in status, f"the propagation did not finish: {status}"
        self.server.apply_propagation(plan, status["result"])
        assert bool(plan.fix_slices) == fix, (
            f"expected a {'fix' if fix else 'full propagation'}, got {plan.fix_slices}"
        )
        return self.written()

    def written(self) -> np.ndarray:
        """The liver segment on the volume node's own grid [k, j, i] (Slicer's export, not the module's reading)."""
        import slicer

        return (
            np.asarray(
                slicer.util.arrayFromSegmentBinaryLabelmap(self.segmentation, self.liver_id, self.volume)
            )
            > 0
        )


def box_ras(axial: CTVolume, liver_ji: np.ndarray, k: int = HALF) -> np.ndarray:
    """Two corners (RAS) of a box around the liver (``liver_ji``) on axial slice ``k`` of the slab."""
    js, is_ = np.nonzero(liver_ji)
    ijk = np.array([[is_.min(), js.min(), k], [is_.max(), js.max(), k]], dtype=float)
    return axial.geometry.ijk_to_ras(ijk)


def run(client: LiverSAMClient, module: Module, axial: CTVolume, liver_ji: np.ndarray) -> list[np.ndarray]:
    """The steps a user takes, each one's segment as written on the volume's voxels: a box in the Red view (live
    slice), Propagate, a second (smaller) box two slices up and Propagate again (a fix of the changed slices), Undo."""
    first = box_ras(axial, liver_ji)
    live = module.live(client, module.box(first))
    propagated = module.propagate(client, module.box(first))
    second = liver_ji.copy()
    second[: int(np.nonzero(liver_ji)[0].mean())] = False  # the lower half of the liver's box
    fixed = module.propagate(client, module.box(first, box_ras(axial, second, HALF + 2)), fix=True)
    module.logic.undo()
    return [live, propagated, fixed, module.written()]


@pytest.fixture(scope="module")
def reference(client, axial_slab):
    """What the steps give on the axial slab."""
    axial, liver_ji = axial_slab
    steps = run(client, Module(axial), axial, liver_ji)
    assert dice(steps[0][HALF], liver_ji) > 0.9, (
        "the axial slab's live slice misses the liver: the test is not meaningful"
    )
    assert np.count_nonzero(steps[1].any(axis=(1, 2))) > 1, "the axial slab's propagation stayed on one slice"
    assert not np.array_equal(steps[2], steps[1]), (
        "the axial slab's fix changed nothing: the test is not meaningful"
    )
    assert np.array_equal(steps[3], steps[1]), "undo did not bring back the propagation on the axial slab"
    return steps


@pytest.mark.parametrize("plane", ["sagittal", "coronal"])
def test_a_sagittal_or_coronal_ct_is_segmented_on_its_axial_slices_onto_its_own_voxels(
    plane, client, axial_slab, reference
):
    axial, liver_ji = axial_slab
    stored = stored_as(axial, plane)
    module = Module(stored)
    reorientation = axial_reorientation(stored.geometry)
    assert reorientation is not None and reorientation.input_plane == plane
    prompts = module.box(box_ras(axial, liver_ji))
    assert [box.k for box in prompts.boxes] == [HALF], "the box is not on the axial grid's middle slice"
    started = time.monotonic()
    steps = run(client, module, axial, liver_ji)
    scores = [
        dice(on_grid(mask, stored.geometry, axial.geometry), expected)
        for mask, expected in zip(steps, reference, strict=True)
    ]
    print(f"{plane} copy ({time.monotonic() - started:.1f} s), Dice against the axial slab: live slice {scores[0]:.4f}, "
          f"propagation {scores[1]:.4f}, fix {scores[2]:.4f}, undo {scores[3]:.4f}")  # fmt: skip
    for step, score in zip(("live slice", "propagation", "fix", "undo"), scores, strict=True):
        assert score >= MIN_DICE, (
            f"{plane}: the {step} was not written on the volume's right voxels (Dice {score:.4f})"
        )
    # the CT sent to the server is the axial copy, and the user's volume keeps its own voxels
    sent = module.server.sessions.ct_of(module.volume)
    assert sent.geometry.is_close(axial.geometry) and np.array_equal(sent.array_kji, axial.array_kji)
    import slicer

    assert np.array_equal(slicer.util.arrayFromVolume(module.volume), stored.array_kji)


def test_an_oblique_ct_keeps_its_own_grid():
    """A volume whose axes lean 40 degrees from the patient axes is not reoriented: the module works on its grid."""
    angle = np.radians(40.0)
    rotation = np.array(
        [[np.cos(angle), 0.0, np.sin(angle)], [0.0, 1.0, 0.0], [-np.sin(angle), 0.0, np.cos(angle)]]
    )
    ct = CTVolume(
        np.zeros((4, 5, 6), np.int16), ImageGeometry((6, 5, 4), (1.0, 1.0, 2.0), (0.0, 0.0, 0.0), rotation)
    )
    assert axial_reorientation(ct.geometry) is None
    assert MRMLBridge.geometry_from_volume_node(Module(ct).volume).is_close(ct.geometry)
