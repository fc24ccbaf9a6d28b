"""A lesion's track reaches no further from its prompted slice than about the lesion's width (``LesionExtent``;
scripted predictor).

A loose box around a small lesion gives the model room to follow a vessel, or to run into a larger lesion, for
dozens of slices; a lesion is roughly as deep as it is wide. The limit is measured on the largest cross-section the
track has had so far, so a box drawn on a small end slice of a lesion still lets the track take the whole lesion.
"""

from __future__ import annotations

import numpy as np

from liversam.prompts import SegmentPrompts, SlicePrompts
from liversam.propagation import LesionExtent, PropagationSettings, for_lesions, propagate_segment
from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

NJ, NI = 96, 96
LIVER_HU, LESION_HU = 110.0, 50.0


def _disc(radius: float) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - 48.0) ** 2 + (ii - 48.0) ** 2 <= radius**2


def _scan(truth: np.ndarray, spacing: tuple[float, float, float], lesion_hu: float = LESION_HU):
    """(tumour prompts boxing ``truth`` on ``k0``, a model that returns ``truth``'s slice wherever it holds something)
    on a CT of liver with the truth dark in it (``lesion_hu``): call with ``k0``."""
    rng = np.random.default_rng(0)
    hu = LIVER_HU + rng.normal(0.0, 3.0, size=truth.shape)
    hu[truth] = lesion_hu + rng.normal(0.0, 3.0, size=int(truth.sum()))
    volume = synthetic_volume(np.round(hu), spacing)

    def prompts_and_model(k0: int):
        seg = SegmentPrompts("tumor", 2, slices={k0: SlicePrompts(boxes_ij=[box_around(truth[k0])])}, propagate=True,
                             inside="liver")
        return seg, ScriptedPredictor(volume, lambda k, prompts: (truth[k].copy(), 0.95))

    return volume, prompts_and_model


def _run(truth: np.ndarray, k0: int, spacing: tuple[float, float, float], lesion_hu: float = LESION_HU, **limit):
    """``propagate_segment`` on :func:`_scan`'s scene; ``limit``: ``lesion_extent=...`` (none: its default)."""
    _, prompts_and_model = _scan(truth, spacing, lesion_hu)
    seg, predictor = prompts_and_model(k0)
    liver = np.ones(truth.shape, dtype=bool)
    return propagate_segment(seg, predictor, for_lesions(PropagationSettings()), container_kji=liver, **limit)


def _vessel_through_a_lesion(nk: int = 31, k0: int = 15) -> np.ndarray:
    """A dark vessel (49 px = 31 mm^2) through the whole volume and a lesion (113 px = 72 mm^2, 9.6 mm across) on
    slices ``k0`` +- 1, as dark as the vessel it passes through."""
    truth = np.zeros((nk, NJ, NI), dtype=bool)
    truth[:] = _disc(4)
    truth[k0 - 1 : k0 + 2] = _disc(6)
    return truth


def _slices(mask: np.ndarray) -> list[int]:
    return [int(k) for k in np.flatnonzero(mask.any(axis=(1, 2)))]


def test_a_track_that_runs_on_along_a_vessel_stops_about_a_lesion_width_from_its_box():
    nk, k0 = 31, 15
    truth = _vessel_through_a_lesion(nk, k0)
    spacing = (0.8, 0.8, 2.5)

    unlimited = _run(truth, k0, spacing, lesion_extent=None)
    assert _slices(unlimited.mask_kji) == list(range(nk))  # every other rule lets it follow the vessel

    limited = _run(truth, k0, spacing, lesion_extent=LesionExtent(max_diameters=1.5, min_extent_mm=5.0))
    # 1.5 x 9.6 = 14.4 mm either way: 5 slices of 2.5 mm (12.5 mm) are within it, the 6th (15 mm) is not
    assert _slices(limited.mask_kji) == list(range(k0 - 5, k0 + 6))
    assert limited.tracks[0].stop_reasons == {"up": "reached the lesion's extent", "down": "reached the lesion's extent"}
    # the default is the same limit
    np.testing.assert_array_equal(_run(truth, k0, spacing).mask_kji, limited.mask_kji)


def test_a_box_on_a_small_end_slice_still_gets_the_whole_lesion():
    """A spheroid lesion 22.4 mm across and 19 slices (1 mm) deep, boxed on its lowest slice (9.9 mm across): the
    track walks onto larger slices, and the limit grows with them."""
    nk, centre, half = 25, 12, 10.0
    truth = np.zeros((nk, NJ, NI), dtype=bool)
    for k in range(nk):
        t = (k - centre) / half
        if abs(t) < 1.0:
            truth[k] = _disc(14.0 * np.sqrt(1.0 - t * t))
    k0 = _slices(truth)[0]
    outcome = _run(truth, k0, (0.8, 0.8, 1.0), lesion_extent=LesionExtent(max_diameters=1.5, min_extent_mm=5.0))
    mask = outcome.mask_kji
    assert _slices(mask) == _slices(truth)  # 18 mm from the box to the lesion's top slice: all of it
    assert 2.0 * (mask & truth).sum() / (mask.sum() + truth.sum()) > 0.95
    # measured on the prompted slice alone (1.5 x 9.9 = 14.8 mm), the limit would have stopped the track 4 slices short
    assert 1.5 * 0.8 * 2.0 * np.sqrt(truth[k0].sum() / np.pi) < (_slices(truth)[-1] - k0 - 2) * 1.0


def test_the_pipeline_applies_the_limit_and_can_turn_it_off():
    from liversam.pipeline import PipelineSettings, segment_volume

    nk, k0 = 31, 15
    truth = _vessel_through_a_lesion(nk, k0)
    volume, prompts_and_model = _scan(truth, (0.8, 0.8, 2.5))

    def tumour_slices(settings: PipelineSettings) -> list[int]:
        seg, predictor = prompts_and_model(k0)
        result = segment_volume(volume, [seg], predictor, settings,
                                containers={"liver": np.ones(truth.shape, dtype=bool)})
        return _slices(result.segments[0].mask_kji)

    assert tumour_slices(PipelineSettings()) == list(range(k0 - 5, k0 + 6))
    assert tumour_slices(PipelineSettings(lesion_extent=None)) == list(range(nk))


def test_a_track_whose_box_shows_no_contrast_reaches_half_a_diameter():
    """The same vessel and lesion, now as dense as the liver: the refinement finds no contrast in the box, the model's
    mask is all there is to follow, and the track reaches half the lesion's width (a sphere's reach from its largest
    slice) instead of 1.5 x."""
    nk, k0 = 31, 15
    truth = _vessel_through_a_lesion(nk, k0)
    spacing = (0.8, 0.8, 2.5)
    isodense = _run(truth, k0, spacing, lesion_hu=LIVER_HU)
    # 0.5 x 9.6 = 4.8 mm either way: the slices 2.5 mm away are within it, those 5 mm away are not
    assert _slices(isodense.mask_kji) == [k0 - 1, k0, k0 + 1]
    assert isodense.tracks[0].stop_reasons == {"up": "reached the lesion's extent", "down": "reached the lesion's extent"}

    as_before = _run(truth, k0, spacing, lesion_hu=LIVER_HU,
                     lesion_extent=LesionExtent(max_diameters=1.5, max_diameters_without_contrast=None))
    assert _slices(as_before.mask_kji) == list(range(k0 - 5, k0 + 6))
    # a dark lesion (contrast found) keeps the 1.5 x reach with the default settings
    assert _slices(_run(truth, k0, spacing).mask_kji) == list(range(k0 - 5, k0 + 6))


def test_without_the_intensity_refinement_no_track_counts_as_without_contrast():
    """``--no-intensity-refinement`` looks for no contrast, so it has found none: the 1.5 x reach applies."""
    nk, k0 = 31, 15
    truth = _vessel_through_a_lesion(nk, k0)
    _, prompts_and_model = _scan(truth, (0.8, 0.8, 2.5), LIVER_HU)
    seg, predictor = prompts_and_model(k0)
    settings = for_lesions(PropagationSettings(intensity_refinement=False))
    outcome = propagate_segment(seg, predictor, settings, container_kji=np.ones(truth.shape, dtype=bool))
    assert _slices(outcome.mask_kji) == list(range(k0 - 5, k0 + 6))
