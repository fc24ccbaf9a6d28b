"""A propagated lesion's partial-volume ring (liversam.lesion_rim): what is added and what never is."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from liversam.lesion_rim import LesionRimSettings, add_lesion_rim

SPACING_JI = (1.0, 1.0)


def _disk(shape_ji: tuple[int, int], centre_ji: tuple[float, float], radius: float) -> np.ndarray:
    jj, ii = np.mgrid[: shape_ji[0], : shape_ji[1]]
    return (jj - centre_ji[0]) ** 2 + (ii - centre_ji[1]) ** 2 <= radius**2


def _one_step(core_ji: np.ndarray) -> np.ndarray:
    """The voxels one 4-connected step outside a slice mask."""
    return ndimage.binary_dilation(core_ji, ndimage.generate_binary_structure(2, 1)) & ~core_ji


def _scene(lesion_hu: float, halo_hu: float, noise_sd: float = 8.0, seed: int = 7, halo_radius: float = 11.0):
    """A 5-slice liver (100 HU) filling most of the slice, a lesion core of radius 8 with a halo out to
    ``halo_radius``."""
    rng = np.random.default_rng(seed)
    shape = (5, 64, 64)
    container = np.zeros(shape, dtype=bool)
    container[:, 4:60, 4:60] = True
    core = _disk(shape[1:], (32, 32), 8)
    halo = _disk(shape[1:], (32, 32), halo_radius) & ~core
    ct = np.full(shape, -100.0, dtype=np.float32)
    ct[container] = 100.0
    ct[:, halo] = halo_hu
    ct[:, core] = lesion_hu
    ct += rng.normal(0.0, noise_sd, shape).astype(np.float32)
    lesion = np.zeros(shape, dtype=bool)
    lesion[1:4, core] = True
    return ct, container, lesion, core, halo


def test_a_hypodense_halo_gives_one_ring_and_nothing_past_it():
    ct, container, lesion, core, halo = _scene(lesion_hu=40.0, halo_hu=70.0)
    before_ct = ct.copy()
    original = lesion.copy()
    added = add_lesion_rim(lesion, ct, container, SPACING_JI)
    ring = lesion & ~original
    assert added == int(ring.sum()) > 0
    assert np.array_equal(ct, before_ct)  # the CT is only read
    assert not ring[[0, 4]].any()  # slices without the lesion get nothing
    one_step = _one_step(core)
    for k in (1, 2, 3):
        # nearly all of the step (noise may hold back a voxel or two), and nothing beyond one step
        assert ring[k].sum() >= 0.9 * (one_step & halo).sum()
        assert not (ring[k] & ~(one_step & halo)).any()  # one step, all of it in the halo


def test_parenchyma_around_the_lesion_is_added_less_than_a_halo():
    """No halo: the voxels outside the outline are parenchyma. The 3 x 3 median of a voxel beside the lesion takes
    in three lesion voxels and noise moves it further, so about half of them still lean to the lesion; a halo puts
    all of them there. Past 3 SD fewer still."""
    counts = {}
    for halo_hu in (70.0, 100.0):
        ct, container, lesion, core, _ = _scene(lesion_hu=40.0, halo_hu=halo_hu)
        original = lesion.copy()
        add_lesion_rim(lesion, ct, container, SPACING_JI)
        counts[halo_hu] = int((lesion & ~original)[2].sum())
    assert counts[70.0] >= 0.9 * _one_step(core).sum()
    assert counts[100.0] < 0.7 * counts[70.0]
    ct, container, lesion, _, _ = _scene(lesion_hu=40.0, halo_hu=100.0)
    original = lesion.copy()
    add_lesion_rim(lesion, ct, container, SPACING_JI, LesionRimSettings(sd=3.0))
    assert (lesion & ~original)[2].sum() < 0.5 * counts[100.0]


def test_a_hyperdense_lesion_grows_into_a_bright_halo_not_a_dark_one():
    ct, container, lesion, _, halo = _scene(lesion_hu=170.0, halo_hu=135.0)
    original = lesion.copy()
    assert add_lesion_rim(lesion, ct, container, SPACING_JI) > 0
    assert ((lesion & ~original) & ~halo[None]).sum() == 0
    ct, container, lesion, _, _ = _scene(lesion_hu=170.0, halo_hu=60.0)
    original = lesion.copy()
    add_lesion_rim(lesion, ct, container, SPACING_JI)
    assert (lesion & ~original).sum() <= 3  # a dark ring is not a bright lesion's


def test_only_container_voxels_are_added():
    ct, container, lesion, _, halo = _scene(lesion_hu=40.0, halo_hu=70.0)
    container[:, :, 32:] = False  # the organ ends half-way through the lesion
    lesion &= container
    original = lesion.copy()
    add_lesion_rim(lesion, ct, container, SPACING_JI)
    assert (lesion & ~original).any()
    assert not (lesion & ~original & ~container).any()


def test_grow_from_limits_the_ring_to_the_given_voxels():
    ct, container, lesion, core, _ = _scene(lesion_hu=40.0, halo_hu=70.0)
    grow_from = np.zeros_like(lesion)
    grow_from[2] = lesion[2]  # e.g. the slice a reader's fix added
    original = lesion.copy()
    add_lesion_rim(lesion, ct, container, SPACING_JI, grow_from=grow_from)
    ring = lesion & ~original
    assert ring[2].any() and not ring[[1, 3]].any()


@pytest.mark.parametrize("settings", [LesionRimSettings(ring_voxels=0), None])
def test_nothing_to_grow_or_ring_off_changes_nothing(settings):
    ct, container, lesion, _, _ = _scene(lesion_hu=40.0, halo_hu=70.0)
    empty = np.zeros_like(lesion)
    if settings is None:
        assert add_lesion_rim(empty, ct, container, SPACING_JI) == 0 and not empty.any()
    else:
        original = lesion.copy()
        assert add_lesion_rim(lesion, ct, container, SPACING_JI, settings) == 0
        assert np.array_equal(lesion, original)


def test_two_ring_steps_reach_further_than_one():
    ct, container, lesion, _, halo = _scene(lesion_hu=40.0, halo_hu=70.0)
    one = lesion.copy()
    two = lesion.copy()
    n1 = add_lesion_rim(one, ct, container, SPACING_JI, LesionRimSettings(ring_voxels=1))
    n2 = add_lesion_rim(two, ct, container, SPACING_JI, LesionRimSettings(ring_voxels=2))
    assert n2 > n1 and not (two & ~lesion & ~halo[None]).any()


def _pipeline_masks(settings) -> tuple[np.ndarray, np.ndarray]:
    """A propagated ``tumor`` inside a given liver through ``segment_volume``: the model's stand-in returns the
    lesion's core on slices 1-3; a one-voxel halo (80 HU) lies on the parenchyma's side of the lesion's
    threshold (half-way between 100 and 40 HU), so the refinement leaves it out."""
    from liversam.pipeline import segment_volume
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from scripted_predictor import ScriptedPredictor, synthetic_volume

    ct, container, _, core, halo = _scene(lesion_hu=40.0, halo_hu=80.0, halo_radius=9.5)
    volume = synthetic_volume(ct, (1.0, 1.0, 2.0))

    def predict(k: int, prompts: SlicePrompts):
        return (core if k in (1, 2, 3) else np.zeros_like(core)), 0.9

    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=True)
    tumour.slices[2] = SlicePrompts(boxes_ij=[(21.0, 21.0, 43.0, 43.0)])
    result = segment_volume(volume, [tumour], ScriptedPredictor(volume, predict), settings,
                            containers={"liver": container})
    return result.segments[0].mask_kji, halo


def test_the_pipeline_adds_the_ring_to_a_propagated_lesion_only_with_the_refinement():
    from liversam.pipeline import PipelineSettings
    from liversam.propagation import PropagationSettings

    with_ring, halo = _pipeline_masks(PipelineSettings())
    without, _ = _pipeline_masks(PipelineSettings(lesion_rim=None))
    assert (without[2] & halo).sum() <= 0.3 * halo.sum()  # the refinement leaves most of the halo out
    ring = with_ring & ~without
    for k in (1, 2, 3):
        step = _one_step(without[k])
        assert not (ring[k] & ~step).any(), f"slice {k}: more than one step added"
        assert ring[k].sum() >= 0.9 * (step & halo).sum() > 0, f"slice {k}: the halo's step not added"
        assert (ring[k] & ~halo).sum() <= 0.1 * ring[k].sum()  # the halo leans to the lesion; the parenchyma hardly
    naive, _ = _pipeline_masks(PipelineSettings(propagation_method="naive"))
    assert not (naive[2] & halo).any()  # the reference loop has no ring
    unrefined, _ = _pipeline_masks(PipelineSettings(propagation=PropagationSettings(intensity_refinement=False)))
    assert not (unrefined[2] & halo).any()  # nor the run without the intensity refinement


def test_a_fix_re_propagated_by_the_server_rings_only_the_voxels_it_adds():
    from types import SimpleNamespace

    from liversam.pipeline import PipelineSettings
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from liversam.server.jobs import Job, repropagation_work
    from scripted_predictor import ScriptedPredictor, synthetic_volume

    ct, container, _, core, halo = _scene(lesion_hu=40.0, halo_hu=80.0, halo_radius=9.5)
    volume = synthetic_volume(ct, (1.0, 1.0, 2.0))
    predictor = ScriptedPredictor(volume, lambda k, prompts: (core if k == 2 else np.zeros_like(core), 0.9))
    session = SimpleNamespace(volume=volume, predictor=lambda model: predictor, closed=False)
    existing = np.zeros(ct.shape, dtype=bool)
    existing[[1, 3]] = core  # an earlier run's lesion, already with its ring on slices 1 and 3 ...
    add_lesion_rim(existing, ct, container, SPACING_JI)
    assert (existing[1] & halo).sum() > 0.5 * (_one_step(core) & halo).sum()
    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=True)
    tumour.slices[2] = SlicePrompts(boxes_ij=[(21.0, 21.0, 43.0, 43.0)])  # ... and the reader's fix on slice 2
    outputs = {}
    for ring in (True, False):
        settings = PipelineSettings() if ring else PipelineSettings(lesion_rim=None)
        job = Job("j", session, "owner", "repropagate")
        work = repropagation_work(job, tumour, [2], existing, container, settings)
        outputs[ring] = work(predictor.model).result.segments[0].mask_kji
    added = outputs[True] & ~outputs[False]
    assert added[2].sum() >= 0.9 * (_one_step(outputs[False][2]) & halo).sum() > 0  # the new slice's ring
    for k in (1, 3):  # the slices that had their ring: at most a step around a voxel the fix added there
        new_voxels = outputs[False][k] & ~existing[k]
        assert not (added[k] & ~_one_step(new_voxels)).any(), f"slice {k}: the old ring was ringed again"


def test_a_fix_that_trims_a_leak_gives_the_fixed_slice_its_ring():
    """The reader boxes the lesion on a slice where it leaked: the fresh track replaces the old (ringed) mask,
    inside its outline, and takes a ring of its own, as segment_volume would give it."""
    from types import SimpleNamespace

    from liversam.pipeline import PipelineSettings
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from liversam.server.jobs import Job, repropagation_work
    from scripted_predictor import ScriptedPredictor, synthetic_volume

    ct, container, _, core, halo = _scene(lesion_hu=40.0, halo_hu=80.0, halo_radius=9.5)
    volume = synthetic_volume(ct, (1.0, 1.0, 2.0))
    predictor = ScriptedPredictor(volume, lambda k, prompts: (core if k == 2 else np.zeros_like(core), 0.9))
    session = SimpleNamespace(volume=volume, predictor=lambda model: predictor, closed=False)
    existing = np.zeros(ct.shape, dtype=bool)
    existing[2] = core
    existing[2, 28:36, 40:56] = True  # a leak into the liver beside the lesion
    add_lesion_rim(existing, ct, container, SPACING_JI)
    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=True)
    tumour.slices[2] = SlicePrompts(boxes_ij=[(21.0, 21.0, 43.0, 43.0)])
    out = repropagation_work(Job("j", session, "owner", "repropagate"), tumour, [2], existing, container,
                             PipelineSettings())(predictor.model).result.segments[0].mask_kji
    assert not out[2, 28:36, 46:56].any()  # the leak is gone
    step_in_halo = _one_step(core) & halo
    assert (out[2] & step_in_halo).sum() >= 0.9 * step_in_halo.sum()  # and the fixed slice has its ring


def _two_lesion_masks(separate: bool, touching: bool, settings=None):
    """Two propagated lesions inside a given liver through ``segment_volume`` (later_segment_wins off): in one
    ``tumor`` segment or one segment each; the union of the lesion segments."""
    from liversam.pipeline import PipelineSettings, segment_volume
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from scripted_predictor import ScriptedPredictor, synthetic_volume

    rng = np.random.default_rng(3)
    shape = (5, 64, 96)
    container = np.zeros(shape, dtype=bool)
    container[:, 4:60, 4:92] = True
    a = _disk(shape[1:], (32, 28), 8)
    b = _disk(shape[1:], (32, 45 if touching else 64), 8)  # 17 apart: their outlines touch
    ct = np.full(shape, -100.0, dtype=np.float32)
    ct[container] = 100.0
    for core, hu in ((a, 40.0), (b, 55.0)):
        ct[:, _disk(shape[1:], (32, 28 if core is a else (45 if touching else 64)), 9.5) & ~core & container[0]] = 80.0
        ct[:, core] = hu
    ct[:, a & b] = 40.0
    ct += rng.normal(0.0, 8.0, shape).astype(np.float32)
    volume = synthetic_volume(ct, (1.0, 1.0, 2.0))
    boxes = {"a": (19.0, 23.0, 37.0, 41.0), "b": (36.0 if touching else 55.0, 23.0, 54.0 if touching else 73.0, 41.0)}

    def predict(k: int, prompts: SlicePrompts):
        (box,) = prompts.boxes_ij
        core = a if abs(box[0] - boxes["a"][0]) < 5 else b
        return (core if k in (1, 2, 3) else np.zeros_like(core)), 0.9

    if separate:
        segments = [SegmentPrompts(f"tumor-{n}", 2 + n, inside="liver", propagate=True,
                                   slices={2: SlicePrompts(boxes_ij=[box])})
                    for n, box in enumerate(boxes.values(), start=1)]  # fmt: skip
    else:
        one = SegmentPrompts("tumor", 2, inside="liver", propagate=True)
        for box in boxes.values():
            one.add(2, SlicePrompts(boxes_ij=[box]))
        segments = [one]
    result = segment_volume(volume, segments, ScriptedPredictor(volume, predict),
                            settings or PipelineSettings(later_segment_wins=False), containers={"liver": container})
    union = np.zeros(shape, dtype=bool)
    for seg in result.segments:
        union |= seg.mask_kji
    return union, result


def test_one_segment_and_one_segment_per_lesion_get_the_same_rings():
    together, _ = _two_lesion_masks(separate=False, touching=False)
    apart, result = _two_lesion_masks(separate=True, touching=False)
    np.testing.assert_array_equal(together, apart)
    first, second = (seg.mask_kji for seg in result.segments)
    assert not (first & second).any()


def test_a_lesion_s_ring_never_takes_a_touching_lesion_s_voxels():
    from liversam.pipeline import PipelineSettings

    _, with_ring = _two_lesion_masks(separate=True, touching=True)
    _, without = _two_lesion_masks(separate=True, touching=True, settings=PipelineSettings(later_segment_wins=False,
                                                                                             lesion_rim=None))
    first, second = (seg.mask_kji for seg in without.segments)
    first_ring, second_ring = (w.mask_kji & ~o.mask_kji for w, o in zip(with_ring.segments, without.segments,
                                                                         strict=True))
    assert first_ring.any() and second_ring.any()
    assert not (first_ring & second).any() and not (second_ring & first).any()


def test_the_command_line_and_the_server_turn_the_ring_off_alone(tmp_path, monkeypatch, capsys):
    """``liversam segment --no-lesion-rim`` (and the server's ``lesion_rim: false``) writes the tumour without its
    ring and nothing else changes; without the switch the written tumour has it. The model's stand-in returns the
    liver for the liver's box and the lesion's core for the tumour's."""
    import json
    from types import SimpleNamespace

    import SimpleITK as sitk

    import liversam.models
    import liversam.predictor
    from liversam.cli import main
    from liversam.segmentation_io import read_seg_nrrd
    from liversam.server.jobs import pipeline_settings
    from liversam.server.schemas import JobSettings
    from scripted_predictor import ScriptedPredictor

    ct, container, _, core, halo = _scene(lesion_hu=40.0, halo_hu=80.0, halo_radius=9.5)
    image = sitk.GetImageFromArray(ct.astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    ct_path = tmp_path / "ct.nrrd"
    sitk.WriteImage(image, str(ct_path))
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"coordinate_system": "IJK", "segments": [
        {"name": "liver", "propagate": True, "boxes": [[[4, 4, 2], [59, 59, 2]]]},
        {"name": "tumor", "inside": "liver", "propagate": True, "boxes": [[[21, 21, 2], [43, 43, 2]]]}]}))  # fmt: skip

    def predict(k: int, prompts):
        i0, _, i1, _ = prompts.boxes_ij[0]
        if i1 - i0 > 40:
            return container[k], 0.95
        return (core if k in (1, 2, 3) else np.zeros_like(core)), 0.9

    class Predictor(ScriptedPredictor):
        encoded_slices: tuple = ()
        encode_seconds = 0.0
        cache = SimpleNamespace(clear=lambda: None)

    model = SimpleNamespace(name="scripted", device="cpu")
    monkeypatch.setattr(liversam.models, "load_model", lambda *args, **kwargs: model)
    monkeypatch.setattr(liversam.predictor, "SlicePredictor", lambda _model, volume, **kwargs: Predictor(volume, predict))
    tumours = {}
    for name, extra in (("ring", []), ("core", ["--no-lesion-rim"])):
        out = tmp_path / f"{name}.seg.nrrd"
        argv = ["segment", str(ct_path), "--prompts", str(prompts), "--output", str(out), "--crf", "none", *extra]
        assert main(argv) == 0, capsys.readouterr().err
        masks = {s.name: s.mask_kji for s in read_seg_nrrd(out).segments}
        tumours[name] = masks["tumor"]
    ring = tumours["ring"] & ~tumours["core"]
    assert not (tumours["core"] & ~tumours["ring"]).any()  # the switch only takes the ring away
    for k in (1, 2, 3):
        assert ring[k].sum() >= 0.9 * (_one_step(tumours["core"][k]) & halo).sum() > 0, f"slice {k}"
        assert not (ring[k] & ~_one_step(tumours["core"][k])).any()
    # the server's job setting builds the same pipeline settings as the two command lines
    assert pipeline_settings(JobSettings(lesion_rim=False)).lesion_rim is None
    assert pipeline_settings(JobSettings()).lesion_rim == LesionRimSettings()
