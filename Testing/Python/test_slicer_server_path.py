"""The Slicer module's segmentation path through a real ``liversam serve`` process, on slicer-core's MRML.

The server is started the way the module starts it (``ServerConnection``, local mode, this test's Python
as the LiverSAM environment, the checkout's core on its PYTHONPATH). Through it, with the module's own
code (``ServerSegmentation``, ``SegmentationLogic``, ``CallQueue``): a box on lits117's largest liver slice
(a live update delivered by the call queue), a liver propagation job with progress written as one undo
step, a cancelled job that writes nothing, a tumour whose container is the liver read from the
segmentation node (issue 17 item 6), and a fix that re-propagates only between the neighbouring prompts.
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk

from slicer_harness import MODULE_DIR, ensure_module_on_path, fresh_scene, shared_data_dir

ensure_module_on_path()

from liversam.ct_io import read_ct  # noqa: E402
from liversam.geometry import ImageGeometry  # noqa: E402
from liversam.volume import CTVolume  # noqa: E402
from LiverSAMLib import MRMLBridge, PromptPlacement, ServerRequests  # noqa: E402
from LiverSAMLib.BackgroundCalls import CallQueue  # noqa: E402
from LiverSAMLib.Phantom import liver_phantom  # noqa: E402
from LiverSAMLib.SegmentationLogic import LIVER, TUMOR, SegmentationLogic  # noqa: E402
from LiverSAMLib.ServerClient import ServerRequestError  # noqa: E402
from LiverSAMLib.ServerConnection import LOCAL, READY, ServerConnection, ServerSettings  # noqa: E402
from LiverSAMLib.ServerSegmentation import ServerSegmentation  # noqa: E402

pytestmark = [pytest.mark.slicer, pytest.mark.model]
WINDOW = (40.0, 400.0)


@pytest.fixture(scope="module")
def connection():
    """A local server started by the module's ServerConnection (stopped at the end, as on Slicer exit)."""
    os.environ.setdefault("LIVERSAM_SERVER_PYTHONPATH", str(MODULE_DIR))
    settings = ServerSettings(mode=LOCAL, python=sys.executable, model="litemedsam", device="cpu")
    connection = ServerConnection(settings, startup_timeout_s=180)
    connection.connect()
    assert connection.state == READY and connection.started_here
    # The status line names the server's model and device (info's nested "model" object).
    assert "model litemedsam on " in connection.message and "?" not in connection.message, connection.message
    yield connection
    process = connection._process.process
    connection.stop()
    assert process.poll() is not None  # the server it started is gone


@pytest.fixture(scope="module")
def lits117():
    folder = shared_data_dir() / "lits117"
    labels = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "label.nii.gz")))
    return read_ct(folder / "ct.nii.gz"), labels


def dice(a, b) -> float:
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def slab(ct, labels, k0: int, nk: int):
    g = ct.geometry
    geometry = ImageGeometry((g.size_ijk[0], g.size_ijk[1], nk), g.spacing_mm, tuple(g.ijk_to_lps([0, 0, k0])),
                             g.direction_lps)  # fmt: skip
    return CTVolume(np.array(ct.array_kji[k0 : k0 + nk]), geometry), labels[k0 : k0 + nk]


def scene_with(ct):
    scene = fresh_scene()
    volume = MRMLBridge.volume_node_from_ct(ct, "ct", scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "LiverSAM")
    logic = SegmentationLogic(scene=scene)
    logic.prepare_segmentation(segmentation, volume)
    return scene, volume, segmentation, logic, ServerSegmentation(logic)


def box_roi(scene, volume, mask_ji, k, pad=0):
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    js, is_ = np.nonzero(mask_ji)
    corners = geometry.ijk_to_ras(np.array([[is_.min() - pad, js.min() - pad, k], [is_.max() + pad, js.max() + pad, k]],
                                           dtype=float))  # fmt: skip
    roi = PromptPlacement.new_box_node(scene)
    roi.SetCenterWorld(*corners.mean(axis=0))
    roi.SetSizeWorld(*(np.abs(corners[1] - corners[0]) + [0.0, 0.0, 0.5]))
    return roi


def run_job(connection, plan, cancel_after_progress: bool = False):
    client = connection.ensure()
    job = plan.start(client)
    seen = []
    deadline = time.monotonic() + 1200
    while time.monotonic() < deadline:
        status = client.job_status(job)
        seen.append(status)
        if cancel_after_progress and status["state"] == "running" and int(status.get("done") or 0) >= 1:
            client.cancel_job(job)
            cancel_after_progress = False
        if status["state"] in ("done", "failed", "cancelled"):
            return job, status, seen
        time.sleep(0.1)
    raise AssertionError(f"job {job} did not finish: {seen[-1]}")


def test_box_live_update_through_the_call_queue_then_liver_propagation(connection, lits117):
    """On a 9-slice slab of lits117 around its largest liver slice (a whole-volume propagation costs minutes
    on a shared 2-core CPU): a box, a live update, then a propagation job through the slab."""
    ct, labels = lits117
    k_mid = int(np.argmax((labels >= 1).sum(axis=(1, 2))))
    k0, nk = k_mid - 4, 9
    slab_ct, slab_labels = slab(ct, labels, k0, nk)
    scene, volume, segmentation, logic, server = scene_with(slab_ct)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    liver = slab_labels >= 1
    k = k_mid - k0
    roi = box_roi(scene, volume, liver[k], k)
    prompts = MRMLBridge.prompts_from_markups(MRMLBridge.geometry_from_volume_node(volume), roi_nodes=[roi])
    requests = ServerRequests.slice_requests(prompts)
    # A live update as the widget does it: the request on the I/O thread, the write on this ("main") thread.
    calls, answers = CallQueue(), []
    work = server.predict_slices_work(volume, requests, WINDOW, focus_k=k, prefetch_radius=1)
    calls.submit(lambda: work(connection.ensure()), answers.append, answers.append, key="live")
    deadline = time.monotonic() + 600
    while not answers and time.monotonic() < deadline:
        calls.poll(0.03)  # what the QTimer tick does
    calls.close()
    masks, scores = answers[0]
    logic.apply_slice_masks(masks, segmentation, liver_id, volume, undo_key=("live", k))
    written = MRMLBridge.segment_mask(segmentation, liver_id, volume)
    slice_dice = dice(written[k], liver[k])
    print(f"lits117 slice {k_mid}: Dice {slice_dice:.3f}, model score {scores[k]:.3f}")
    assert not written[np.arange(nk) != k].any()
    assert slice_dice > 0.95, slice_dice  # measured 0.975 (slice 33, model score 0.958)
    # Propagation through the server: one job, progress reported, one undo step.
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts,
                                   dict(ServerRequests.PROPAGATION_DEFAULTS), WINDOW)  # fmt: skip
    assert plan.fix_slices is None
    job, status, seen = run_job(connection, plan)
    assert status["state"] == "done" and any(int(s.get("total") or 0) > 0 for s in seen)
    server.apply_propagation(plan, connection.ensure().job_result(job))
    propagated = MRMLBridge.segment_mask(segmentation, liver_id, volume)
    slab_dice = dice(propagated, liver)
    print(f"lits117 liver on the slab after propagation from one box: Dice {slab_dice:.3f}")
    assert propagated[[0, nk - 1]].any()  # propagated to both ends of the slab
    assert slab_dice > 0.95, slab_dice  # measured 0.979
    logic.undo()
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, liver_id, volume), written)


def test_a_cancelled_job_writes_nothing(connection, lits117):
    ct, labels = lits117
    scene, volume, segmentation, logic, server = scene_with(ct)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    liver = labels >= 1
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    prompts = MRMLBridge.prompts_from_markups(MRMLBridge.geometry_from_volume_node(volume),
                                              roi_nodes=[box_roi(scene, volume, liver[k], k)])  # fmt: skip
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts, dict(ServerRequests.PROPAGATION_DEFAULTS),
                                   (60.0, 400.0))  # fmt: skip  (another window: a new session, nothing cached)
    job, status, _seen = run_job(connection, plan, cancel_after_progress=True)
    assert status["state"] == "cancelled", status
    with pytest.raises(ServerRequestError):
        connection.ensure().job_result(job)  # no result to write (the widget never asks: it dropped the job)
    assert logic.segment_is_empty(segmentation, liver_id)


def test_tumour_gets_the_liver_from_the_segmentation_node_as_its_container(connection, lits117):
    """Issue 17 item 6: the liver is read from the segmentation node (written there first), not passed in."""
    from scipy import ndimage

    ct, labels = lits117
    components, _ = ndimage.label(labels == 2, structure=np.ones((3, 3, 3), dtype=bool))
    k0, nk = 33, 9  # the lesion spans slices 27..45; its largest slice is 37
    slab_ct, slab_labels = slab(ct, labels, k0, nk)
    lesion = (components == components[37, 63, 15])[k0 : k0 + nk]
    scene, volume, segmentation, logic, server = scene_with(slab_ct)
    ids = logic.ensure_standard_segments(segmentation)
    logic.write_mask(segmentation, ids[LIVER], volume, slab_labels >= 1)  # the liver as the user has it
    prompts = MRMLBridge.prompts_from_markups(MRMLBridge.geometry_from_volume_node(volume),
                                              roi_nodes=[box_roi(scene, volume, lesion[37 - k0], 37 - k0)])  # fmt: skip
    plan = server.plan_propagation(segmentation, volume, ids[TUMOR], ids[LIVER], prompts,
                                   dict(ServerRequests.PROPAGATION_DEFAULTS), WINDOW)  # fmt: skip
    np.testing.assert_array_equal(plan.container, MRMLBridge.segment_mask(segmentation, ids[LIVER], volume))
    job, status, _seen = run_job(connection, plan)
    assert status["state"] == "done", status
    server.apply_propagation(plan, connection.ensure().job_result(job))
    tumour = MRMLBridge.segment_mask(segmentation, ids[TUMOR], volume)
    liver_now = MRMLBridge.segment_mask(segmentation, ids[LIVER], volume)
    print(f"lits117 lesion slab: tumour Dice {dice(tumour, lesion):.3f}")
    assert not (tumour & ~(slab_labels >= 1)).any()  # inside the liver read from the node
    np.testing.assert_array_equal(liver_now, slab_labels >= 1)  # and the liver kept every voxel
    assert tumour[[0, nk - 1]].any()  # propagated to both ends of the slab
    # measured 0.775 through the server; without the lesion's partial-volume ring 0.849 in the same session (0.859
    # earlier), which lits117's labels leave out and the other cases' take in (docs/RESULTS.md, session 19)
    assert dice(tumour, lesion) >= 0.75, dice(tumour, lesion)



def test_a_fix_repropagates_only_between_the_neighbouring_prompts(connection):
    """Boxes on slices 4 and 8, a propagation, then leakage painted on slice 6 (as a bad result would be): a
    box on slice 6 makes the next Propagate a fix that changes slices 5..7 only, as one undo step."""
    ct, liver = liver_phantom()
    scene, volume, segmentation, logic, server = scene_with(ct)
    liver_id = logic.ensure_segment(segmentation, LIVER)
    geometry = MRMLBridge.geometry_from_volume_node(volume)
    seeds = [box_roi(scene, volume, liver[k], k, pad=2) for k in (4, 8)]
    # Both boxes live in their own nodes here (the widget keeps one; prompts_from_markups reads any number).
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=seeds)
    settings = dict(ServerRequests.PROPAGATION_DEFAULTS)
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts, settings, WINDOW)
    job, status, _ = run_job(connection, plan)
    assert status["state"] == "done"
    server.apply_propagation(plan, connection.ensure().job_result(job))
    leak = np.zeros(liver.shape[1:], bool)
    leak[40:90, 90:126] = True
    logic.write_slices(segmentation, liver_id, volume, MRMLBridge.segment_mask(segmentation, liver_id, volume)[6] | leak, 6)
    before_fix = MRMLBridge.segment_mask(segmentation, liver_id, volume)
    fix_roi = box_roi(scene, volume, liver[6], 6, pad=2)
    prompts = MRMLBridge.prompts_from_markups(geometry, roi_nodes=[*seeds, fix_roi])
    plan = server.plan_propagation(segmentation, volume, liver_id, None, prompts, settings, WINDOW)
    assert plan.fix_slices == [6]
    job, status, _ = run_job(connection, plan)
    assert status["state"] == "done", status
    changed = server.apply_propagation(plan, connection.ensure().job_result(job))
    after = MRMLBridge.segment_mask(segmentation, liver_id, volume)
    assert 6 in changed and set(changed) <= {5, 6, 7}
    outside = [k for k in range(liver.shape[0]) if not 5 <= k <= 7]
    np.testing.assert_array_equal(after[outside], before_fix[outside])  # untouched, exactly
    assert after[6][leak & ~liver[6]].sum() < 0.02 * (leak & ~liver[6]).sum()  # the leak is gone
    fixed_dice = dice(after[5:8], liver[5:8])
    print(f"phantom slices 5-7 after the fix: Dice {fixed_dice:.3f}")
    assert fixed_dice > 0.97, fixed_dice  # measured 0.991
    logic.undo()  # the fix is one undo step
    np.testing.assert_array_equal(MRMLBridge.segment_mask(segmentation, liver_id, volume), before_fix)
