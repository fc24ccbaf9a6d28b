"""Slice-to-slice propagation of a segment through the volume, and re-propagation after a fix.

Each box (or each slice's loose points) the user gives starts a *track*: the track's mask on the next
slice is predicted from a box around the previous slice's mask (plus a margin) and, optionally, the
previous mask as a dense prompt. A track stops where the structure ends:

- the mask is empty or smaller than ``min_area_mm2``;
- the mask collapses (area below ``collapse_ratio`` x the previous slice's area);
- the model's own score falls below ``min_score``;
- the mask barely overlaps the previous slice's mask (the track jumped to another structure);
- the next slice carries the user's own prompts for the same object (the user's prompts rule their slice);
- the volume ends, or the slice lies outside the container segment (``inside``);
- a lesion's track reaches its extent (:class:`LesionExtent`: about as deep as the lesion is wide; half as deep when
  its box showed no contrast);
- with the intensity refinement, a lesion's model mask holds under a tenth of the slice's refined lesion
  (:func:`liversam.intensity_refinement.model_holds_lesion`).

With ``intensity_refinement`` (on by default) each propagated slice's mask is also checked against the CT
(:mod:`liversam.intensity_refinement`): an organ drops tissue far brighter or darker than its parenchyma on
the prompted slice; a lesion inside a container keeps only the lesion-like parts of its box that the model
touches or that continue the previous slice's lesion.

Tracks of one segment are combined by union; every slice records its area, score, box and origin for the
review report.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from scipy import ndimage

from .errors import Cancelled
from .intensity_refinement import (
    LesionContrast,
    LesionContrastSettings,
    box_region,
    estimate_noise_hu,
    fit_lesion_contrast,
    median_window_for_noise,
    model_holds_lesion,
    parenchyma_statistics,
    prune_foreign_tissue,
    refine_slice_mask,
    smooth_slice_in_volume,
)
from .postprocess import PostprocessSettings, clean_slice
from .predictor import SlicePrediction, SlicePredictor
from .prompts import SegmentPrompts, SlicePrompts

PROPAGATION_METHODS = ("liversam", "naive")
NAIVE_MARGIN_PX = 3
NAIVE_MIN_PIXELS = 10


@dataclass(frozen=True)
class PropagationSettings:
    # An organ's box margin on thin slices (thick ones: OrganTrackSettings); lesions take two thirds of it.
    # 3 mm instead of 4: the liver track stops where the organ ends instead of holding its box over the heart
    # (one-box liver Dice ircadb17 0.942 -> 0.969, lits117 0.948 -> 0.952; 2 mm: 0.969 / 0.946, 3.5 mm:
    # 0.964 / 0.952, 1 mm: lits117 0.864). Thick slices are unchanged (1.4 x the thickness wins).
    box_margin_mm: float = 3.0
    use_mask_prompt: bool = False
    min_area_mm2: float = 15.0
    collapse_ratio: float = 0.2
    min_score: float = 0.45
    min_overlap: float = 0.2  # fraction of the new mask lying inside the previous slice's mask (dilated)
    max_slices: int | None = None  # safety cap per track and direction (None: whole volume)
    # Leak guards: a mask that suddenly grows, or whose mean HU moves away from the seed's, has run into
    # a neighbouring tissue (a tumour track into the liver, the liver into the heart or the kidney).
    max_growth_ratio: float | None = 1.5
    growth_allowance_mm2: float = 40.0
    # Loose for organs (80 HU: catches a run into fat, air or bone, tolerates the organ's own lesions; at
    # 60 HU the lits117 liver stopped 12 slices early where a large hypodense tumour fills its tip);
    # halved by :func:`for_lesions` for segments inside another.
    max_mean_hu_shift: float | None = 80.0
    # Intensity refinement (see liversam.intensity_refinement). A segment with no container (an organ):
    # tissue far brighter or darker than the organ on the prompted slice is cut from propagated slices
    # (lits117 one-box liver Dice 0.912 -> 0.948). A segment inside a container (a tumour in the liver):
    # only the parts of each slice's mask that differ from the container's parenchyma the way the seed box
    # does are kept (tumour Dice 0.48 -> 0.79). Steps and rejected variants: docs/RESULTS.md.
    intensity_refinement: bool = True


@dataclass(frozen=True)
class OrganTrackSettings:
    """How an organ's track (a segment with no container) copes with thick slices. Kept apart from
    :class:`PropagationSettings`, whose fields the Slicer module exposes one by one."""

    # Organs on thick slices: the box margin is at least ``organ_margin_per_mm_slice`` x the slice thickness
    # (an organ's outline moves further between 5 mm slices than between 1 mm ones; lobes appear). 5 mm
    # slices: 7 mm instead of 4 (one-box liver Dice hcc2144 0.772 -> 0.864; with the tip rule below 0.905).
    organ_margin_per_mm_slice: float = 1.4
    # Organs on slices at least ``tip_min_thickness_mm`` thick: once the area is below ``tip_fraction`` of the
    # seed slice's, the track is at the organ's tip, and a tip keeps shrinking; a mask no smaller than
    # ``tip_min_shrink`` x the one ``tip_window_mm`` back has run on into a neighbour (kidney, bowel): the
    # track stops there ("tip stopped tapering"). hcc0697 / hcc2144 liver Dice 0.884 / 0.864 -> 0.934 / 0.905.
    # Off on thinner slices, where a liver tip tapers over many slices: on ircadb17 (1.6 mm) and lits117 it
    # cut 33 and 22 slices of real liver (ircadb17 0.911 with it). None: off everywhere.
    # ``tip_min_shrink`` 0.93 (was 0.85): ircadb17 averaged to 3.2 / 4.8 mm slices has a long inferior tip that
    # shrinks by only 8-10 % per 4.8 mm; at 0.85 the rule cut its last 11 slices there (liver Dice 0.907 / 0.908
    # -> 0.937 / 0.936 at 0.93; at 0.90, 0.937 / 0.904). hcc0697's run-on into bowel shrinks by 4.5 % (0.955) and
    # into the heart it grows: still stopped, and the four cases' figures do not change (docs/RESULTS.md, session 10).
    tip_fraction: float | None = 0.25
    tip_window_mm: float = 5.0
    tip_min_shrink: float = 0.93
    tip_min_thickness_mm: float = 3.0
    # A mask reaching its box's edge is predicted again from a box moved out by ``box_regrow_mm`` there, up
    # to ``box_regrow_steps`` times (off: on hcc2144 the model's mask stops short of the box, 0.772 -> 0.773).
    box_regrow_steps: int = 0
    box_regrow_mm: float = 10.0
    regrow_min_gain: float = 0.05
    # Opt-in speed: organs on slices at most ``skip_max_thickness_mm`` thick are predicted on every other
    # slice, the slice between interpolated from its two neighbours (half the encodes; the walk's rules hold
    # for the longer step, or it takes single steps). Not the default: one-box liver Dice lits117 (1 mm)
    # 0.952 -> 0.951, ircadb17 (1.6 mm) 0.969 -> 0.963 (its dome track ran on into the heart); skipping only
    # where the area is at least half the seed's kept a quarter of the saving and still lost (0.949 / 0.960),
    # the organ margin for the doubled step (x2) lost more (ircadb17 0.939). None: every slice predicted.
    skip_max_thickness_mm: float | None = None
    # An organ's mask on a propagated slice is also asked for with the box widened by ``wider_box_mm`` on every
    # side (one more decoder call, no encode): where the organ grows beyond the previous slice's box (a track
    # seeded on a small slice walks towards larger ones; a lobe appears between thick slices), the model's mask
    # stays inside the box and the box never grows. The wider mask is kept when it holds ``wider_min_keep`` of
    # the normal one, is at most ``wider_max_growth`` x its area, and what it adds is at least
    # ``wider_parenchyma_fraction`` parenchyma-like (within ``wider_parenchyma_sd`` SD of the organ's mode on the
    # prompted slice). One box seeded away from the largest slice (`liversam evaluate --organ-seed-at`,
    # docs/RESULTS.md, session 10): liver Dice hcc2144 seeded 1 slice off its largest 0.705 -> 0.930, lits117
    # seeded at 0.5 / 0.65 of its extent 0.706 / 0.370 -> 0.937 / 0.940, ircadb17 at 0.2 0.698 -> 0.967. With the
    # box on the largest slice only hcc2144 changes (liver 0.9290 -> 0.9316, tumour 0.667 -> 0.684). A fraction of
    # 0.7 kept hcc2144's gain with the bf16 encoder only (fp32: 0.709; 0.69 of one slice's added area was
    # parenchyma-like); 0.5 cost lits117's lesions (jittered boxes 0.814 -> 0.799). With 0.7, 15 mm instead of 10
    # cost hcc0697 boxed on slice 17 (0.654 -> 0.251) and up to three widenings a slice cost hcc2144 boxed on
    # slice 36 (0.843 -> 0.639). A wider mask the leak guard would stop is never taken. Re-propagation after a
    # fix does not widen. None: off (needs the intensity refinement, which gives the organ's mode).
    wider_box_mm: float | None = 10.0
    wider_min_keep: float = 0.9
    wider_max_growth: float = 1.5
    wider_parenchyma_fraction: float = 0.6
    wider_parenchyma_sd: float = 1.5
    # The dome: above its largest cross-section the liver reaches no further to the patient's left than on the
    # slice below, while the heart sits to the left above the left lobe. An organ's track walking superior, once
    # the previous slice's area is below ``dome_fraction`` of the track's largest so far, keeps its box (and the
    # wider box) and its mask within ``dome_left_allowance_mm`` of the previous mask's patient-left edge. Without it
    # the track ran on into the heart, its left edge creeping 3.7-5.9 mm further left a slice while the liver's
    # receded (ircadb17 averaged to 3.2 / 4.8 mm slices: liver Dice 0.937 / 0.936 -> 0.957 / 0.952, and 0.916-0.939
    # -> 0.934-0.952 with the box anywhere from a fifth to four fifths of the way through the liver; four-case mean
    # 0.9540 -> 0.9546 on full-bf16 embeddings, 0.9538 with the rule on the `bf16-rest` ones users of that machine
    # get; docs/RESULTS.md, sessions 12 and 13). Against the prompted slice's area instead of the largest, the
    # gains with the box away from the largest slice were lost. Directions come from the scan's direction matrix:
    # only where the k axis runs inferior-superior and the i axis right-left (a wrong header, as lits117's, makes
    # it act on the wrong side). Never for lesions. None: off.
    dome_fraction: float | None = 0.7
    dome_left_allowance_mm: float = 1.5
    # A piece of the organ that the slice before held apart from the rest (a lobe or segment seen apart there, at
    # least ``piece_min_mm2`` and ``piece_min_fraction`` of that slice's organ) and that the new mask misses (covers
    # less than ``piece_max_covered`` of it): asked with the whole organ's box, the model returns the main piece
    # only. It is asked again with the piece's own box (grown by the organ's margin; one more decoder call); what
    # that adds is kept when at least ``piece_min_overlap`` of it lies on the piece, it is at most
    # ``piece_max_growth`` x the piece's area and its median HU lies within ``piece_max_sd`` SD of the organ's mode
    # (a thin piece on a thick slice is partly partial volume: the wider box's parenchyma test refused hcc2144's).
    # One slice deep: a piece found that way is not followed further (followed on, hcc2144's ran on for six slices
    # where the label has none: liver 0.9333 -> 0.9304). One-box liver Dice, four cases, tight / jittered / loose:
    # 0.9553 / 0.9553 / 0.9554 -> 0.9559 / 0.9559 / 0.9559 (hcc2144 0.9333 -> 0.9356, the only case that changes;
    # tumour unchanged but hcc2144's loose 0.7458 -> 0.7739); thick copies and the box away from the largest slice
    # unchanged except hcc2144 at 0.7 (0.9336 -> 0.9359) (docs/RESULTS.md, session 20). Only where the new mask
    # holds something (a piece never carries on a track whose organ ended), with the intensity refinement (the
    # organ's mode); with the opt-in skipping "one slice" is one longer step (the slice between is interpolated).
    # Re-propagation after a fix does not ask for pieces (its reach was measured without it). None: off.
    piece_min_mm2: float | None = 100.0
    piece_min_fraction: float = 0.05
    piece_max_covered: float = 0.2
    piece_min_overlap: float = 0.3
    piece_max_growth: float = 1.5
    piece_max_sd: float = 3.0


LESION_MARGIN_FRACTION = 2.0 / 3.0  # of the organ's box margin (3 mm -> 2 mm)


def for_lesions(settings: PropagationSettings) -> PropagationSettings:
    """The settings for a segment inside another (a tumour in the liver): two thirds of the box margin
    (2 mm by default) and half the mean-HU leak tolerance, since a lesion is small and differs from its organ
    mainly by intensity.

    Measured on lits117 (one box per lesion on its largest slice, before intensity refinement): box margin
    4 mm -> tumour Dice 0.34, 2 mm -> 0.48. With intensity refinement the 2 mm margin still wins (a search
    10 mm around the box: 0.62 instead of 0.78).
    """
    shift = settings.max_mean_hu_shift
    return replace(
        settings,
        box_margin_mm=settings.box_margin_mm * LESION_MARGIN_FRACTION,
        max_mean_hu_shift=shift / 2.0 if shift else shift,
    )


@dataclass(frozen=True)
class ModelTrackUnion:
    """When a lesion's own model track joins its intensity-refined track.

    The refinement keeps the parts of a lesion that are darker (or brighter) than the liver the way its
    prompted slice is. A lesion whose attenuation changes along its length (a hypodense core on the largest
    slice, near-isodense ends) loses much of itself that way while the model, which sees its outline, keeps
    it. So each refined lesion is also followed by the model alone (the same walk, no refinement), and the
    two are united when, on the prompted slice,

    - the refined mask is smaller than ``max_seed_ratio`` x the model's (the model sees clearly more lesion
      than the intensity does), and
    - less than ``max_parenchyma_fraction`` of the model's mask is parenchyma-like (within
      ``parenchyma_sd`` SDs of the liver's mode): the model's mask is not the liver around the lesion, and
    - less than ``max_added_parenchyma_fraction`` of what the model's mask adds to the refined one is
      parenchyma-like: not a band of the liver beside the lesion (see the field).

    The model's track is taken only while its area stays within ``max_growth`` x its prompted slice's (the
    box sits on the lesion's largest slice; a track that outgrows it has run into something else).

    One-box tumour Dice (lesions in one segment, four cases), tight boxes: ircadb17 0.702 -> 0.858 (its two
    large lesions: hypodense cores, near-isodense ends), lits117 0.791, hcc0697 0.694, hcc2144 0.661
    unchanged; loose boxes ircadb17 0.703 -> 0.868; jittered 0.702 -> 0.858; the other cases unchanged
    (within 0.001). Without the seed-ratio condition hcc0697 fell to 0.614 (its small lesion: the model's mask
    is larger than the lesion on every slice).
    """

    max_seed_ratio: float = 0.75
    max_parenchyma_fraction: float = 0.4
    parenchyma_sd: float = 1.5
    max_growth: float = 1.1
    # What the model's mask adds to the refined one on the prompted slice must not be mostly parenchyma
    # (``max_added_parenchyma_fraction`` of those voxels within ``parenchyma_sd`` SDs of the mode): a loose box
    # around a large lesion gives a model mask of the lesion and a band of the liver beside it, whose parenchyma
    # is a small part of the whole mask (the condition above) but most of what the union would add (lits117's
    # loose boxes: 0.82-0.91 of the added voxels parenchyma-like, 3,300-6,400 voxels a lesion; the lesions the
    # union is for, ircadb17's with near-isodense ends, 0.47-0.67). One-box tumour Dice, lits117, jittered /
    # loose boxes: 0.8011 / 0.7393 -> 0.8075 / 0.7515; tight boxes and the other cases unchanged (docs/RESULTS.md,
    # session 21). None: not checked.
    max_added_parenchyma_fraction: float | None = 0.75


@dataclass(frozen=True)
class LesionExtent:
    """How far a lesion's track (a segment inside a container) may reach from its prompted slice:
    ``max_diameters`` x the largest in-plane diameter the walk has had so far (the diameter of a disc of its largest
    area, the prompted slice's included, never less than ``min_extent_mm``; each direction is walked on its own); the
    track stops there ("reached the lesion's extent").

    A lesion is roughly as deep as it is wide: the four cases' 74 labelled lesions reach at most 1.43 x their largest
    slice's diameter from it (lits117's; ircadb17's and the hcc cases' 0.29-0.43 x). A small lesion's track does
    not stop that way when a loose box lets the model follow a vessel (lits117: a 41-voxel lesion's track ran 32
    slices, 79 slices another's) or walk into a larger lesion. Measured on the largest diameter so far, so a box
    drawn away from the lesion's largest slice lets the track reach further as it walks onto larger slices (the walk
    away from the larger slices is measured on the prompted slice, the largest it has, so it stays short). With
    the union's added-parenchyma condition, one-box tumour Dice on lits117, jittered / loose boxes 0.8075 / 0.7515
    -> 0.8081 / 0.7654, tight unchanged, the other cases unchanged; 1.0 x gained more there (0.8141 / 0.7755, tight
    0.8237) but cost lits117 0.013 with every lesion boxed 0.7 of the way through it (1.5 x: nothing;
    docs/RESULTS.md, session 21). Off in re-propagation after a fix. None: no limit."""

    max_diameters: float | None = 1.5
    min_extent_mm: float = 5.0
    # A track whose box showed no contrast at all (the intensity refinement found none in the box or in the model's
    # mask, so the model's mask is kept as it is) reaches this many diameters instead: half, a sphere's reach from
    # its largest slice. With nothing but the model to follow, a loose box around a lesion of a few voxels gives the
    # model a vessel, and the track followed it for 26-33 slices (lits117). One-box tumour Dice on lits117, tight /
    # jittered / loose boxes 0.8215 / 0.8139 / 0.7741 -> 0.8216 / 0.8165 / 0.7853 (0.75: 0.8215 / 0.8164 / 0.7826;
    # 0: 0.8218 / 0.8167 / 0.7887, but an isodense lesion would get one slice); the other three cases have no such
    # track and do not change (docs/RESULTS.md, session 24). None: as ``max_diameters``.
    max_diameters_without_contrast: float | None = 0.5

    def reached(self, distance_mm: float, largest_area_mm2: float, without_contrast: bool = False) -> bool:
        """Whether a slice ``distance_mm`` from the prompted one lies beyond the extent of a track whose largest
        area so far is ``largest_area_mm2``; ``without_contrast``: the track's box showed no contrast."""
        factor = self.max_diameters
        if without_contrast and self.max_diameters_without_contrast is not None and factor is not None:
            factor = self.max_diameters_without_contrast
        if factor is None:
            return False
        diameter = 2.0 * float(np.sqrt(largest_area_mm2 / np.pi))
        return distance_mm > factor * max(diameter, self.min_extent_mm)


@dataclass
class SliceRecord:
    """What happened on one slice of one track."""

    k: int
    area_mm2: float
    score: float
    box_ij: tuple[float, float, float, float] | None
    source: str  # "user" or "propagated"
    touches_box_edge: bool = False


@dataclass
class Track:
    seed_k: int
    records: dict[int, SliceRecord] = field(default_factory=dict)
    stop_reasons: dict[str, str] = field(default_factory=dict)  # "up"/"down" -> why the track stopped


@dataclass
class PropagationOutcome:
    mask_kji: np.ndarray
    scores: dict[int, float]
    tracks: list[Track]
    user_slices: list[int]
    computed_slices: list[int]  # slices predicted (or interpolated between predicted ones) in this call
    # repropagate only: the fresh track's voxels it wrote that no other object of the existing mask holds (what
    # took the fixed object's place; None elsewhere)
    replaced_kji: np.ndarray | None = None
    # lesions (``past_container``, ``hypodense_past_container``, ``continue_past_container``): by slice, the flat
    # indices [j * n_i + i] of voxels outside the container that a hyper- or hypodense lesion's track whose model mask
    # lay outside it on the seed slice, or a track the container cut short, took; the pipeline gives the organ back
    # those its final lesion mask holds
    beyond_container: dict[int, np.ndarray] = field(default_factory=dict)


def _box_of(mask_ji: np.ndarray) -> tuple[float, float, float, float] | None:
    js, is_ = np.nonzero(mask_ji)
    if js.size == 0:
        return None
    return (float(is_.min()), float(js.min()), float(is_.max()), float(js.max()))


def _expand_box(box, margin_ij: tuple[float, float], shape_ji: tuple[int, int]):
    i0, j0, i1, j1 = box
    mi, mj = margin_ij
    return (max(i0 - mi, 0.0), max(j0 - mj, 0.0), min(i1 + mi, shape_ji[1] - 1.0), min(j1 + mj, shape_ji[0] - 1.0))


def _touches_box_edge(mask_ji: np.ndarray, box, shape_ji) -> bool:
    """True when the mask reaches an edge of its prompt box that is not the image border."""
    bb = _box_of(mask_ji)
    if bb is None or box is None:
        return False
    i0, j0, i1, j1 = (int(round(v)) for v in box)
    b0, c0, b1, c1 = (int(v) for v in bb)
    return (
        (b0 <= i0 and i0 > 0) or (c0 <= j0 and j0 > 0)
        or (b1 >= i1 and i1 < shape_ji[1] - 1) or (c1 >= j1 and j1 < shape_ji[0] - 1)
    )


def _box_iou(a, b) -> float:
    ai0, aj0, ai1, aj1 = a
    bi0, bj0, bi1, bj1 = b
    wi = min(ai1, bi1) - max(ai0, bi0) + 1
    wj = min(aj1, bj1) - max(aj0, bj0) + 1
    if wi <= 0 or wj <= 0:
        return 0.0
    inter = wi * wj
    area_a = (ai1 - ai0 + 1) * (aj1 - aj0 + 1)
    area_b = (bi1 - bi0 + 1) * (bj1 - bj0 + 1)
    return float(inter / (area_a + area_b - inter))


SAME_OBJECT_BOX_IOU = 0.25  # a user's box is for the track's object when it overlaps the track's box this much


def _prompt_overlaps(prompts: SlicePrompts, mask_ji: np.ndarray, margin: int = 2) -> bool:
    """Whether a user's prompts on a slice concern the object a track carries there: a box whose overlap
    (IoU) with the box of the track's mask is at least ``SAME_OBJECT_BOX_IOU``, or a positive point on the
    mask (grown by ``margin``). Another lesion's box next to this one does not stop the track: the same
    prompts give the same masks whether the lesions share a segment or each has its own."""
    track_box = _box_of(mask_ji)
    if track_box is None:
        return False
    for box in prompts.boxes_ij:
        if _box_iou(track_box, box) >= SAME_OBJECT_BOX_IOU:
            return True
    if prompts.boxes_ij and not prompts.points_pos_ij:
        return False
    grown = ndimage.binary_dilation(mask_ji, iterations=margin)
    for i, j in prompts.points_pos_ij:
        inside_a_box = any(b[0] - 0.5 <= i <= b[2] + 0.5 and b[1] - 0.5 <= j <= b[3] + 0.5 for b in prompts.boxes_ij)
        if inside_a_box:
            continue  # belongs to its box, judged above
        jj, ii = int(round(j)), int(round(i))
        if 0 <= jj < grown.shape[0] and 0 <= ii < grown.shape[1] and grown[jj, ii]:
            return True
    return False


def split_into_seeds(seg: SegmentPrompts) -> list[tuple[int, SlicePrompts]]:
    """One seed per box (with the points inside it); a slice's loose points form one more seed."""
    seeds: list[tuple[int, SlicePrompts]] = []
    for k, prompts in sorted(seg.slices.items()):
        used: set = set()
        for box in prompts.boxes_ij:
            i0, j0, i1, j1 = box
            inside = [p for p in prompts.points_pos_ij if i0 - 0.5 <= p[0] <= i1 + 0.5 and j0 - 0.5 <= p[1] <= j1 + 0.5]
            used.update(inside)
            negatives = list(prompts.points_neg_ij)
            seeds.append((k, SlicePrompts(boxes_ij=[box], points_pos_ij=inside, points_neg_ij=negatives)))
        loose = [p for p in prompts.points_pos_ij if p not in used]
        if loose:
            seeds.append((k, SlicePrompts(points_pos_ij=loose, points_neg_ij=list(prompts.points_neg_ij))))
    return seeds


PARENCHYMA_SLICES = 5  # slices either side of a lesion's seed that give its organ's parenchyma
# A lesion's box that shows no contrast of its own (too little of it lesion-like: a loose box around a small
# lesion) is judged again inside the model's mask on that slice, when the mask has at least this many voxels.
MIN_MODEL_MASK_VOXELS = 10
# The parenchyma around a lesion's seed leaves out the part of the user's box near the model's mask on that slice (the
# lesion), not the whole box (None: the whole box). "Near": round(this / the finest in-plane spacing) 4-connected
# steps, a diamond that reaches this many mm along the image axes (about 0.7 x as far on the diagonals). A loose box
# left out the parenchyma near the lesion too, so its mode and spread, and with them the lesion's threshold, moved
# with the box's size: lits117's largest lesion, tight / 7 mm looser box, threshold 97.0 / 102.5 HU. One-box tumour Dice, four-case mean, tight /
# jittered / loose boxes: 0.7842 / 0.7700 / 0.7186 -> 0.7849 / 0.7755 / 0.7247 (3 mm: 0.7850 / 0.7764 / 0.7245);
# liver unchanged (docs/RESULTS.md, session 17).
PARENCHYMA_LESION_MARGIN_MM: float | None = 5.0
# A lesion's track may leave its container (within its box) when the model's own mask for the user's box lies at least
# this much outside the container on the seed slice and is hyperdense (``_Propagator._hyperdense_past_container``, which
# also asks a mask lying this much inside a container without contrast to be lesion-like there; docs/RESULTS.md,
# session 22).
HYPERDENSE_MIN_OUTSIDE = 0.25
HYPERDENSE_NEAR_MM = 10.0  # ... and that outside part reaches within this distance of the container
# A box that fits hypodense is asked the same when at least this fraction of its dark voxels inside the container lie
# within this distance of the container's outline (``_Propagator._dark_side_along_outline``): a loose box around a bright
# lesion on the outline holds more of the outline's dark partial-volume strip than of the lesion (hcc0697 with its
# lesion made hyperdense, loose box: 74 % within 5 mm; tumour Dice 0.00 -> 0.80). A dark lesion reaches deeper, so its
# fit stands even when the model's mask for its box is a bright neighbour (the kidney). docs/RESULTS.md, session 24.
OUTLINE_STRIP_MM = 5.0
OUTLINE_STRIP_FRACTION = 0.5
# A hypodense lesion's track may leave its container the same way (``_Propagator._hypodense_past_container``) when the
# user's box shows a hypodense contrast inside the container and the model's mask for the box lies at least
# ``HYPERDENSE_MIN_OUTSIDE`` outside the container near it, is itself hypodense, and at least this fraction of its part
# outside is lesion-like by the box's contrast (its band leaves out fat and air beside the organ). On thick slices the
# liver's mask cut a hypodense lesion on the dome out on every slice it spans (lits117 averaged to 3 mm slices: the
# tumour held 0 -> 3,211 of that lesion's 3,582 voxels; docs/RESULTS.md, session 28).
HYPODENSE_OUTSIDE_LESION_LIKE = 0.5
# A lesion's parenchyma is read around its seed (``PARENCHYMA_SLICES``); where other lesions fill the organ there, it
# is their tissue, and the plain liver in the box then fits as a lesion of the opposite kind. A contrast whose lesion
# class lies on the wrong side of the organ's own parenchyma (the mode over the whole container: a hyperdense "lesion"
# no brighter than the organ, a hypodense one no darker) is fitted again against the organ's parenchyma, read on up to
# ``ORGAN_PARENCHYMA_SLICES`` of its slices (``_Propagator._organ_parenchyma``), which the past-organ checks then use
# too. False: never. lits117, a small lesion on the last slice beside a large one, 7 mm looser box: the local mode
# was 61 HU, the organ's 119, the box's liver fitted hyperdense and the track took 100-700 voxels of liver a slice
# over 12 slices; fitted again, hypodense. Tumour Dice there 0.7860 -> 0.7973 (noisy copy 0.7450 -> 0.7551); no
# other box of the four cases (tight, loose or jittered) or of their noisy, hyperdense or half-contrast copies
# (tight or loose) fits on the wrong side (the nearest lies 21 HU on the right side; docs/RESULTS.md, session 29).
ORGAN_PARENCHYMA_CHECK = True
ORGAN_PARENCHYMA_SLICES = 16
# The same re-fit when the parenchyma read around the seed lies on the far side of the organ's own mode from the
# lesion, at least this far (HU; the fit's ``min_contrast_hu``, a lesion's least contrast): the tissue around the box
# is not plain organ, and the threshold halfway between it and the lesion falls near the organ's mode, so that much of
# the plain organ is "lesion-like". lits117 with its lesions at half contrast, loose box on slice 84: parenchyma 94 HU
# around the seed, organ 116, lesion 143, threshold 118; its track took 3,000-5,000 voxels of liver a slice over 70
# slices when it did not meet another box's slice first (tumour Dice there 0.3719 -> 0.6555 with the organ's gaps
# closed, ``PipelineSettings.fill_organ_gaps_below_mm``). Of the 514 contrasts fitted on the four cases and their
# copies (tight and loose; docs/RESULTS.md, session 30) the rule takes this one and one other (hyperdense copy, loose,
# slice 127: 104 HU around, organ 122); every other parenchyma lies within 10 HU of the organ's mode on that side.
ORGAN_PARENCHYMA_FAR_HU = 15.0


class _Propagator:
    def __init__(
        self,
        predictor: SlicePredictor,
        settings: PropagationSettings,
        postprocess: PostprocessSettings,
        user_slices: dict[int, SlicePrompts],
        container_kji: np.ndarray | None,
        progress: Callable[[str, int, int], None] | None,
        cancel: Callable[[], bool] | None,
        name: str,
        organ_track: OrganTrackSettings | None = None,
        lesion_extent: LesionExtent | None = None,
        past_container: bool = False,
        continue_past_container: bool = False,
        hypodense_past_container: bool = False,
    ) -> None:
        self.predictor = predictor
        self.settings = settings
        self.organ_track = organ_track or OrganTrackSettings()
        self.lesion_extent = lesion_extent if container_kji is not None else None  # lesions only; None: no limit
        self.postprocess = postprocess
        self.user_slices = user_slices
        self.container = container_kji
        # A hyperdense lesion's track may leave the container within its box (``_hyperdense_past_container``): the
        # organ's propagation sets such a lesion aside as too bright, or its model mask leaves it out.
        self.past_container = past_container and container_kji is not None
        # ... and a hypodense lesion's, when the model's mask for its box lies outside (``_hypodense_past_container``)
        self.hypodense_past = hypodense_past_container and container_kji is not None
        self._relaxed = False  # the current track is such a lesion's
        self._relaxed_by_footprint = False  # ... a hypodense one's (``_container_at``)
        # A lesion's track that clipping to the container would end goes on within its previous slice's footprint
        # (``_continue_past_container``).
        self.continue_past = continue_past_container and container_kji is not None
        self._unheld_at: int | None = None  # the slice whose refined lesion the model's mask did not hold
        # (slice, voxels outside the container) of the last step's mask that ``_continue_past_container`` gave
        self._outside_at: tuple[int, np.ndarray] | None = None
        self._without_contrast = False  # the current track's box showed no contrast (``LesionExtent``)
        self._searched_contrast = False  # ... the refinement looked for one (a parenchyma around the box was found)
        self.beyond_container: dict[int, np.ndarray] = {}  # what lesion tracks took outside the container
        self.progress = progress
        self.cancel = cancel
        self.name = name
        geometry = predictor.volume.geometry
        self.spacing_ji = (geometry.spacing_mm[1], geometry.spacing_mm[0])
        self.pixel_mm2 = geometry.spacing_mm[0] * geometry.spacing_mm[1]
        self.thickness_mm = geometry.spacing_mm[2]
        skip = self.organ_track.skip_max_thickness_mm
        # Never on slices thick enough for the tip rule (it compares slices one step apart) and never for lesions.
        self.skip = (container_kji is None and skip is not None and self.thickness_mm <= skip
                     and self.thickness_mm < self.organ_track.tip_min_thickness_mm)
        margin_mm = settings.box_margin_mm
        if container_kji is None:
            margin_mm = max(margin_mm, self.organ_track.organ_margin_per_mm_slice * geometry.spacing_mm[2])
        self.margin_ij = (margin_mm / geometry.spacing_mm[0], margin_mm / geometry.spacing_mm[1])
        self.nk = geometry.size_ijk[2]
        self.shape_ji = predictor.volume.array_kji.shape[1:]
        self.superior_step, _ = _superior_step_and_left_i(geometry.direction_lps)
        self.left_axis, self.left_i = patient_left_axis(geometry.direction_lps)
        self.computed: list[int] = []
        self.interpolated: list[int] = []  # slices taken from their neighbours (never predicted)
        self._recovered_at: dict[int, np.ndarray | None] = {}  # the walk's pieces asked for apart, by slice
        self.contrast: LesionContrast | None = None  # the current lesion track's contrast (refinement on)
        self.organ: tuple[float, float] | None = None  # the current organ track's parenchyma (mode, SD)
        # (seed k, its prompts, the model's unrefined mask for them there), from the contrast's fit
        self._seed_model_mask: tuple[int, SlicePrompts, np.ndarray] | None = None
        self._organ_mode: float | None = None  # the container's parenchyma mode, raw voxels (``_organ_s_mode``)
        self._median_window: tuple[int, int] | None = None  # (slices, size): from the scan's noise, first refinement

    def _set_noise_from(self, ks, masks) -> None:
        if self._median_window is None:
            array = self.predictor.volume.array_kji
            noise = estimate_noise_hu([array[k] for k in ks], masks)
            self._median_window = median_window_for_noise(noise, self.thickness_mm)

    def _smoothed_slice(self, k: int, within: np.ndarray) -> np.ndarray:
        """Slice k smoothed over the bounding box of ``within`` (NaN elsewhere)."""
        return smooth_slice_in_volume(self.predictor.volume.array_kji, k, self._median_window or (1, 3), within)

    def _parenchyma_around(self, seed_k: int, box: np.ndarray) -> tuple[float, float] | None:
        """(mode, SD) of the container around a lesion's seed (``PARENCHYMA_SLICES`` slices either side) outside
        the columns of ``box`` (the lesion's part of the user's box, :meth:`_lesion_part_of`): local, so a contrast
        that changes along the organ does not matter, and cheap."""
        ks = [k for k in range(seed_k - PARENCHYMA_SLICES, seed_k + PARENCHYMA_SLICES + 1)
              if 0 <= k < self.nk and (self.container[k] & ~box).any()]  # fmt: skip
        if not ks:
            return None
        masks = [self.container[k] & ~box for k in ks]
        self._set_noise_from(ks, masks)
        values = np.concatenate([self._smoothed_slice(k, m)[m] for k, m in zip(ks, masks, strict=True)])
        return parenchyma_statistics(values)

    def _fit_contrast_of_seed(self, seed_k: int, prompts: SlicePrompts) -> LesionContrast | None:
        """The lesion contrast of a track seeded by a box inside the container (None: refinement off).

        Read from the container inside the user's box on the seed slice against the parenchyma around it (which
        leaves out the box near the model's mask, not the whole box: nearly the same parenchyma for a tight or a
        loose box, ``PARENCHYMA_LESION_MARGIN_MM``); when
        the box shows none (under ``LesionContrastSettings.min_lesion_fraction`` of it is lesion-like, as in a
        loose box around a small lesion), from the part of the box the model's own mask covers on that slice.
        A lesion that is truly isodense shows no contrast either way, and its model mask stays as it is.

        One-box tumour Dice, four cases (docs/RESULTS.md, session 6): loose boxes (+7 mm) 0.698 -> 0.722 and
        jittered 0.759 -> 0.768 on the mean (lits117 0.670 -> 0.765, 0.780 -> 0.816: half of its 70 loose
        boxes showed no contrast and their raw model masks took in the liver around), tight unchanged."""
        if not self.settings.intensity_refinement or self.container is None or not prompts.boxes_ij:
            return None
        box = box_region(self.shape_ji, prompts.boxes_ij[0])
        model_mask, prediction = self._predict(seed_k, prompts, record=False)  # self.contrast is None: the model
        self._seed_model_mask = (seed_k, prompts, model_mask)  # the model-track union asks for the same mask next
        parenchyma = self._parenchyma_around(seed_k, self._lesion_part_of(box, model_mask))
        if parenchyma is None:
            return None
        self._searched_contrast = True
        region = box & self.container[seed_k]
        contrast = self._fit_in_box(seed_k, region, model_mask, parenchyma)
        if contrast is not None and ORGAN_PARENCHYMA_CHECK:
            wrong_side = self._on_the_organ_s_wrong_side(contrast)
            if wrong_side or self._read_far_from_the_organ(contrast):
                # the parenchyma around the seed is other lesions' tissue: the box against the organ's own. A lesion
                # class already on its right side keeps its side (a loose box may hold more of the dark tissue
                # around than of a bright lesion, and the lesion would be lost)
                parenchyma = self._organ_parenchyma()
                contrast = self._fit_in_box(seed_k, region, model_mask, parenchyma,
                                            None if wrong_side else contrast.polarity)
        if not (self.past_container or self.hypodense_past):
            return contrast
        raw = clean_slice(prediction.mask_ji, self.spacing_ji, self.postprocess)  # the model's own mask, unclipped
        if self.past_container and (contrast is None or contrast.polarity > 0
                                    or self._dark_side_along_outline(seed_k, box, parenchyma)):
            # a box fitted hypodense is asked too when its dark voxels lie along the organ's outline: a loose box
            # around a bright lesion there holds more of the outline's dark partial-volume strip than of the lesion
            fitted = contrast if contrast is not None and contrast.polarity > 0 else None
            hyperdense = self._hyperdense_past_container(seed_k, raw, parenchyma, fitted)
            if hyperdense is not None:
                self._relaxed = True
                return hyperdense
        if self.hypodense_past and contrast is not None and contrast.polarity < 0:
            hypodense = self._hypodense_past_container(seed_k, raw, parenchyma, contrast)
            if hypodense is not None:
                self._relaxed = self._relaxed_by_footprint = True
                return hypodense
        return contrast

    def _fit_in_box(self, seed_k: int, region: np.ndarray, model_mask: np.ndarray,
                    parenchyma: tuple[float, float], polarity: int | None = None) -> LesionContrast | None:
        """The contrast of the container's part of a lesion's box (``region``) against ``parenchyma``; when it shows
        none, of that part within the model's mask for the box. ``polarity``: on that side only."""
        contrast = fit_lesion_contrast(self._smoothed_slice(seed_k, region)[region], *parenchyma, polarity=polarity)
        if contrast is None and model_mask.sum() >= MIN_MODEL_MASK_VOXELS:
            region = region & model_mask
            contrast = fit_lesion_contrast(self._smoothed_slice(seed_k, region)[region], *parenchyma,
                                           polarity=polarity)
        return contrast

    def _organ_s_mode(self) -> float:
        """The organ's parenchyma mode (raw voxels of the whole container; the mode is where the parenchyma is even
        when lesions fill much of the organ, and noise does not move it), read once per propagation."""
        if self._organ_mode is None:
            self._organ_mode = parenchyma_statistics(self.predictor.volume.array_kji[self.container])[0]
        return self._organ_mode

    def _on_the_organ_s_wrong_side(self, contrast: LesionContrast) -> bool:
        """Whether ``contrast``'s lesion class lies on the wrong side of the organ's parenchyma mode: a hyperdense
        lesion no brighter than the organ, a hypodense one no darker."""
        return contrast.polarity * (contrast.lesion_hu - self._organ_s_mode()) <= 0

    def _read_far_from_the_organ(self, contrast: LesionContrast) -> bool:
        """Whether the parenchyma ``contrast`` was read against (around the seed) lies at least
        ``ORGAN_PARENCHYMA_FAR_HU`` on the far side of the organ's mode from the lesion."""
        return contrast.polarity * (self._organ_s_mode() - contrast.parenchyma_hu) >= ORGAN_PARENCHYMA_FAR_HU

    def _organ_parenchyma(self) -> tuple[float, float]:
        """(mode, SD) of the container on up to ``ORGAN_PARENCHYMA_SLICES`` of its slices, evenly spread, smoothed as
        the track's slices are (the same units as :meth:`_parenchyma_around`'s)."""
        ks = np.flatnonzero(self.container.any(axis=(1, 2)))
        ks = ks[np.unique(np.linspace(0, ks.size - 1, min(ks.size, ORGAN_PARENCHYMA_SLICES)).round().astype(int))]
        values = np.concatenate([self._smoothed_slice(int(k), self.container[k])[self.container[k]] for k in ks])
        return parenchyma_statistics(values)

    def _hypodense_past_container(self, seed_k: int, raw_mask: np.ndarray, parenchyma: tuple[float, float],
                                  fitted: LesionContrast) -> LesionContrast | None:
        """The contrast of a hypodense lesion that lies outside the container on the seed slice, or None.

        The organ's model mask may leave out a hypodense lesion on its outline on every slice the lesion spans (on
        thick slices above all), and the lesion the user boxed, clipped to the organ, would be lost. Its track may
        leave the container within its box on the seed slice, as a hyperdense lesion's does
        (:meth:`_hyperdense_past_container`), and off it within the previous slice's lesion (:meth:`_container_at`),
        when the box shows a hypodense contrast inside the container (``fitted``, from the part of the lesion the
        organ kept; the caller asks this) and the model's own mask for the user's box (``raw_mask``) lies at least
        ``HYPERDENSE_MIN_OUTSIDE`` outside the container within ``HYPERDENSE_NEAR_MM`` of it, is itself hypodense
        against the parenchyma (the fit on the mask alone), and at least ``HYPODENSE_OUTSIDE_LESION_LIKE`` of its part
        outside is lesion-like by ``fitted`` (not fat or air darker than the lesion). Returns ``fitted``.

        Without a contrast inside the container the rule does not apply: on lits117 with its lesions pulled halfway
        to the liver's HU, loose boxes whose masks ran into dark tissue beside the liver (one fitted -32 HU, fat)
        took 600-1,000 voxels a slice outside the liver over 40 slices (liver Dice 0.9477 -> 0.9256)."""
        outside = self._outside_near_container(seed_k, raw_mask)
        if outside is None:
            return None
        smoothed = self._smoothed_slice(seed_k, raw_mask)
        contrast = fit_lesion_contrast(smoothed[raw_mask], *parenchyma)
        if contrast is None or contrast.polarity > 0:
            return None
        if float(fitted.lesion_like(smoothed)[outside].mean()) < HYPODENSE_OUTSIDE_LESION_LIKE:
            return None
        return fitted

    def _outside_near_container(self, seed_k: int, raw_mask: np.ndarray) -> np.ndarray | None:
        """The part of ``raw_mask`` outside the container on the seed slice when it is at least
        ``HYPERDENSE_MIN_OUTSIDE`` of the mask and reaches within ``HYPERDENSE_NEAR_MM`` of the container, else None."""
        if not raw_mask.any():
            return None
        container = self.container[seed_k]
        outside = raw_mask & ~container
        if outside.sum() < HYPERDENSE_MIN_OUTSIDE * raw_mask.sum():
            return None
        steps = max(1, int(round(HYPERDENSE_NEAR_MM / min(self.spacing_ji))))
        if not (outside & ndimage.binary_dilation(container, iterations=steps)).any():
            return None
        return outside

    def _dark_side_along_outline(self, seed_k: int, box: np.ndarray, parenchyma: tuple[float, float]) -> bool:
        """Whether at least ``OUTLINE_STRIP_FRACTION`` of the dark voxels (beyond the fit's outlier limit) of the
        container inside a lesion's box lie within ``OUTLINE_STRIP_MM`` of the container's outline: the dark
        partial-volume strip along an organ's outline, not a hypodense lesion, which reaches deeper."""
        region = box & self.container[seed_k]
        smoothed = self._smoothed_slice(seed_k, region)
        mode, sd = parenchyma
        dark = region & (smoothed < mode - LesionContrastSettings().outlier_sd * sd)
        if not dark.any():
            return False
        depth = ndimage.distance_transform_edt(self.container[seed_k], sampling=self.spacing_ji)
        return float((depth[dark] <= OUTLINE_STRIP_MM).mean()) >= OUTLINE_STRIP_FRACTION

    def _container_at(self, k: int, box_ij, previous_mask: np.ndarray | None = None) -> np.ndarray:
        """The container on slice k as the current track sees it: with the track's box on that slice added when the
        track's lesion lies outside the container on its seed slice (``_relaxed``). Off the seed slice the box is the
        previous slice's lesion's box and margin; the lesion's extent limit and growth guard bound the walk. A
        hypodense lesion's track (``_relaxed_by_footprint``) gets the box on its seed slice only, and off it the
        previous slice's lesion (``previous_mask``): outside the container it keeps within the previous slice's
        lesion, not the whole box."""
        if not self._relaxed or box_ij is None:
            return self.container[k]
        if self._relaxed_by_footprint and previous_mask is not None:
            return self.container[k] | previous_mask
        return self.container[k] | box_region(self.shape_ji, box_ij)

    def _hyperdense_past_container(self, seed_k: int, raw_mask: np.ndarray, parenchyma: tuple[float, float],
                                   fitted: LesionContrast | None) -> LesionContrast | None:
        """The contrast of a hyperdense lesion that lies outside the container on the seed slice, or None.

        The organ's propagation sets aside tissue far brighter than its parenchyma (the kidney, vessels), and with
        it a hyperdense lesion at the organ's edge (an HCC in the arterial phase); the model's organ mask may leave
        such a lesion out, too. Clipped to the organ, the lesion the user boxed would be lost. The track may leave
        the container within its box (its voxels must still be lesion-like and held by the model's mask or continue
        the previous slice's lesion; the pipeline gives the organ what the lesion holds there) when the model's own
        mask for the user's box (``raw_mask``)

        - lies at least ``HYPERDENSE_MIN_OUTSIDE`` outside the container, within ``HYPERDENSE_NEAR_MM`` of it;
        - is itself hyperdense against the parenchyma (the fit on the mask alone);
        - and, when the box shows no hyperdense contrast inside the container (``fitted`` None: none, or hypodense
          along the outline, :meth:`_dark_side_along_outline`) and the mask lies a quarter or
          more inside it, is mostly lesion-like there: an isodense lesion whose mask spills into a bright neighbour
          (the kidney, a vessel) keeps its mask inside the organ as before.

        Returns ``fitted`` (the box's hyperdense contrast inside the container) when there is one, else the mask's.
        """
        if self._outside_near_container(seed_k, raw_mask) is None:
            return None
        smoothed = self._smoothed_slice(seed_k, raw_mask)
        contrast = fit_lesion_contrast(smoothed[raw_mask], *parenchyma)
        if contrast is None or contrast.polarity < 0:
            return None
        if fitted is not None:
            return fitted
        inside = raw_mask & self.container[seed_k]
        if inside.sum() >= HYPERDENSE_MIN_OUTSIDE * raw_mask.sum() and contrast.lesion_like(smoothed)[inside].mean() < 0.5:
            return None
        return contrast

    def _lesion_part_of(self, box: np.ndarray, model_mask: np.ndarray) -> np.ndarray:
        """The part of a lesion's box [j, i] that the parenchyma's estimate leaves out: within
        ``PARENCHYMA_LESION_MARGIN_MM`` of the model's mask along the image axes, a diamond of 4-connected steps (the
        whole box when that is off or the mask is tiny)."""
        if PARENCHYMA_LESION_MARGIN_MM is None or model_mask.sum() < MIN_MODEL_MASK_VOXELS:
            return box
        steps = max(1, int(round(PARENCHYMA_LESION_MARGIN_MM / min(self.spacing_ji))))
        return box & ndimage.binary_dilation(model_mask, iterations=steps)

    def _predict(self, k: int, prompts: SlicePrompts, mask_logits=None, previous_mask=None, record: bool = True,
                 footprint: np.ndarray | None = None, prediction: SlicePrediction | None = None):
        """The track's mask on slice ``k`` from its prompts: the model's, cleaned; a lesion's clipped to the container
        (with ``footprint``, voxels outside it that a lesion may keep too) and refined when the track has a contrast;
        an organ's pruned of foreign tissue. ``prediction``: the model's answer to these prompts, already asked."""
        if self.cancel is not None and self.cancel():
            raise Cancelled()
        if prediction is None:
            prediction = self.predictor.predict(k, prompts, mask_logits=mask_logits)
        if record:
            self.computed.append(k)
            if self.progress:
                # distinct slices: a refused longer step predicts its far slice again after the near one
                self.progress(f"propagating '{self.name}'", len(set(self.computed)) + len(self.interpolated), self.nk)
        mask = clean_slice(prediction.mask_ji, self.spacing_ji, self.postprocess)
        if self.container is not None:
            container = self._container_at(k, prompts.boxes_ij[0] if prompts.boxes_ij else None, previous_mask)
            if footprint is not None:
                container = container | footprint
            mask &= container
            if self.contrast is not None and prompts.boxes_ij:
                box = box_region(self.shape_ji, prompts.boxes_ij[0])
                lesion_like = self.contrast.lesion_like(self._smoothed_slice(k, box)) & container
                refined = refine_slice_mask(mask, lesion_like, prompts.boxes_ij[0], previous_mask)
                if previous_mask is not None and not model_holds_lesion(refined, mask):
                    self._unheld_at = k
                    refined = np.zeros_like(refined)
                mask = clean_slice(refined, self.spacing_ji, self.postprocess)
            if self._relaxed:
                self._note_beyond_container(k, mask & ~self.container[k])
        elif self.organ is not None and previous_mask is not None:
            mask = prune_foreign_tissue(mask, self._smoothed_slice(k, mask), self.organ, previous_mask)
        return mask, prediction

    def _note_beyond_container(self, k: int, beyond: np.ndarray) -> None:
        """Adds to ``beyond_container[k]`` (flat indices; a slice may be predicted more than once)."""
        if not beyond.any():
            return
        found = np.flatnonzero(beyond).astype(np.int64)
        before = self.beyond_container.get(k)
        self.beyond_container[k] = found if before is None else np.union1d(before, found)

    def _continue_past_container(self, k: int, box, logits, prev_mask: np.ndarray, mask: np.ndarray, prediction):
        """A lesion's (mask, prediction) on slice ``k`` when the container cut it short: clipped to the container, the
        track's mask would end there (too small, or collapsed against the previous slice's), so predict again with the
        part of the previous slice's lesion that lies outside the container on this slice allowed too. The organ's
        model mask leaves out a hypodense lesion along its outline where the lesion ends the organ's slice (ircadb17,
        slices 102-105: the liver's mask cut across the lesion and the lesion's track collapsed against it).

        Outside the container the lesion keeps within the previous slice's lesion, its voxels there are refined as
        inside it (lesion-like, and the refined slice held by the model's mask), and the pipeline gives the organ what
        the final lesion holds there (``beyond_container``, noted when :meth:`_accept` takes the slice). Only for a
        track with a contrast: the model's own track (``model_track_union``), a box without contrast or the refinement
        off would follow the model's mask past the organ unchecked. Not when the model's mask no longer held the
        refined lesion (the track ends for that reason, inside the container or out), nor for a relaxed lesion (hyper-
        or hypodense: its box, or its previous slice's lesion, already counts). Keeps ``mask`` unless the new one would
        not end the track."""
        if self._relaxed or self.contrast is None or self._unheld_at == k:
            return mask, prediction
        footprint = prev_mask & ~self.container[k]
        if not footprint.any():
            return mask, prediction
        wider, _ = self._predict(k, SlicePrompts(boxes_ij=[box]), mask_logits=logits, previous_mask=prev_mask,
                                 record=False, footprint=footprint, prediction=prediction)
        area = float(wider.sum())
        if (self._unheld_at == k or area * self.pixel_mm2 < self.settings.min_area_mm2
                or area < self.settings.collapse_ratio * float(prev_mask.sum())):
            self._unheld_at = None
            return mask, prediction
        self._outside_at = (k, wider & ~self.container[k])
        return wider, prediction

    def run_track(self, seed_k: int, seed_prompts: SlicePrompts, out: np.ndarray, scores: dict[int, float],
                  limits: tuple[int, int] | None = None, refine: bool = True) -> Track:
        """Segment the seed slice, then walk up and down. ``limits`` = (k_min, k_max) allowed, inclusive.
        ``refine=False``: no intensity refinement for this track (the model's own track of a lesion)."""
        k_min, k_max = limits if limits is not None else (0, self.nk - 1)
        track = Track(seed_k=seed_k)
        self._median_window = None  # per track: a track's result does not depend on the tracks before it
        self._relaxed = self._relaxed_by_footprint = False
        self.contrast = None
        self.organ = None
        self._searched_contrast = False
        if refine and self.settings.intensity_refinement:
            self.contrast = self._fit_contrast_of_seed(seed_k, seed_prompts)
        # a lesion's box in which the refinement looked for contrast and found none (``LesionExtent``)
        self._without_contrast = self._searched_contrast and self.contrast is None
        mask, prediction = self._predict(seed_k, seed_prompts)
        if self.settings.intensity_refinement and self.container is None and mask.any():
            self._set_noise_from([seed_k], [mask])
            self.organ = parenchyma_statistics(self._smoothed_slice(seed_k, mask)[mask])
        box = seed_prompts.boxes_ij[0] if seed_prompts.boxes_ij else _box_of(mask)
        track.records[seed_k] = SliceRecord(seed_k, float(mask.sum() * self.pixel_mm2), prediction.score, box, "user",
                                            _touches_box_edge(mask, box, self.shape_ji) if seed_prompts.boxes_ij else False)
        out[seed_k] |= mask
        scores[seed_k] = min(scores.get(seed_k, 1.0), prediction.score)
        for direction, step in (("up", 1), ("down", -1)):
            track.stop_reasons[direction] = self._walk(seed_k, step, mask, prediction, track, out, scores, k_min, k_max)
        return track

    def model_track_union(self, seed_k: int, seed_prompts: SlicePrompts, refined_kji: np.ndarray,
                          union: ModelTrackUnion) -> np.ndarray | None:
        """The part of the lesion's own model track (no refinement) to add to its refined track
        ``refined_kji``, or None when :class:`ModelTrackUnion`'s conditions do not hold. Call right after the
        refined :meth:`run_track` of the same seed (it uses that track's contrast)."""
        contrast = self.contrast
        if contrast is None:
            return None
        self.contrast = None
        cached = self._seed_model_mask
        if cached is not None and cached[0] == seed_k and cached[1] is seed_prompts:
            model_seed = cached[2]  # the same prompts, unrefined: asked for by the contrast's fit
        else:
            model_seed, _ = self._predict(seed_k, seed_prompts)
        self.contrast = contrast
        if not model_seed.any():
            return None
        smoothed = self._smoothed_slice(seed_k, model_seed)[model_seed]
        parenchyma_like = np.abs(smoothed - contrast.parenchyma_hu) < union.parenchyma_sd * contrast.parenchyma_sd
        ratio = refined_kji[seed_k].sum() / model_seed.sum()
        if ratio >= union.max_seed_ratio or parenchyma_like.mean() >= union.max_parenchyma_fraction:
            return None
        added = ~refined_kji[seed_k][model_seed]  # the model's voxels the refined track does not hold
        if (union.max_added_parenchyma_fraction is not None and added.any()
                and parenchyma_like[added].mean() >= union.max_added_parenchyma_fraction):
            return None
        model_out = np.zeros_like(refined_kji)
        self.run_track(seed_k, seed_prompts, model_out, {}, refine=False)
        self.contrast = contrast
        model_out = connected_to_slice(model_out, seed_k)
        areas = model_out.sum(axis=(1, 2))
        keep = np.zeros(len(areas), dtype=bool)
        for step in (1, -1):
            k = seed_k
            while 0 <= k < len(areas) and 0 < areas[k] <= union.max_growth * areas[seed_k]:
                keep[k] = True
                k += step
        return model_out & keep[:, None, None]

    def _regrow(self, k: int, box, mask: np.ndarray, prediction, prev_mask: np.ndarray):
        """An organ that reaches its box's edge goes on beyond it (a lobe appears between thick slices):
        move those edges out by ``box_regrow_mm`` and predict again, up to ``box_regrow_steps`` times,
        while the mask keeps growing by more than ``regrow_min_gain``."""
        s = self.organ_track
        if s.box_regrow_steps <= 0:
            return box, mask, prediction
        gi, gj = s.box_regrow_mm / self.predictor.volume.geometry.spacing_mm[0], \
            s.box_regrow_mm / self.predictor.volume.geometry.spacing_mm[1]
        for _ in range(s.box_regrow_steps):
            bb = _box_of(mask)
            if bb is None:
                break
            i0, j0, i1, j1 = box
            ni, nj = self.shape_ji[1] - 1.0, self.shape_ji[0] - 1.0
            new = (
                max(i0 - gi, 0.0) if bb[0] <= i0 + 1 and i0 > 0 else i0,
                max(j0 - gj, 0.0) if bb[1] <= j0 + 1 and j0 > 0 else j0,
                min(i1 + gi, ni) if bb[2] >= i1 - 1 and i1 < ni else i1,
                min(j1 + gj, nj) if bb[3] >= j1 - 1 and j1 < nj else j1,
            )
            if new == tuple(box):
                break
            new_mask, new_prediction = self._predict(k, SlicePrompts(boxes_ij=[new]), previous_mask=prev_mask)
            if new_mask.sum() < (1.0 + s.regrow_min_gain) * mask.sum():
                break
            box, mask, prediction = new, new_mask, new_prediction
        return box, mask, prediction

    def _widen(self, k: int, box, mask: np.ndarray, prediction, prev_mask: np.ndarray, dome: DomeLimit | None = None):
        """(box, mask, prediction) of an organ's slice ``k``: those given, or those of the box widened by
        ``OrganTrackSettings.wider_box_mm`` on every side when its mask passes the checks described there. A
        wider mask that the leak guard would stop (growth against the previous slice) is never taken. ``dome``:
        the wider box and mask keep within it too."""
        o = self.organ_track
        spacing = self.predictor.volume.geometry.spacing_mm
        wide = _expand_box(box, (o.wider_box_mm / spacing[0], o.wider_box_mm / spacing[1]), self.shape_ji)
        if dome is not None:
            wide = dome.clamp_box(wide)
        if wide == tuple(box):
            return box, mask, prediction
        # record=False: the same slice again (its embedding is cached); computed_slices lists it once
        wide_mask, wide_prediction = self._predict(k, SlicePrompts(boxes_ij=[wide]), previous_mask=prev_mask,
                                                   record=False)
        if dome is not None:
            wide_mask = dome.cut(wide_mask)
        area, wide_area = float(mask.sum()), float(wide_mask.sum())
        if (wide_area <= area or wide_area > o.wider_max_growth * area
                or (wide_mask & mask).sum() < o.wider_min_keep * area):
            return box, mask, prediction
        if self._leaks(wide_area, float(prev_mask.sum())):
            return box, mask, prediction
        added = wide_mask & ~mask
        mode, sd = self.organ
        parenchyma_like = np.abs(self._smoothed_slice(k, added)[added] - mode) < o.wider_parenchyma_sd * sd
        if parenchyma_like.mean() < o.wider_parenchyma_fraction:
            return box, mask, prediction
        return wide, wide_mask, wide_prediction

    def _recover_pieces(self, k: int, mask: np.ndarray, prev_mask: np.ndarray, dome: DomeLimit | None,
                        recovered_prev: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
        """(``mask`` with the pieces of the previous slice's organ it misses, each asked for with its own box;
        the voxels so added, or None) (``OrganTrackSettings.piece_min_mm2``). ``recovered_prev``: the voxels
        recovered so on the previous slice; a piece made mostly of them is not followed further."""
        o = self.organ_track
        labels, n = ndimage.label(prev_mask)
        if n < 2:
            return mask, None
        flat = labels.ravel()
        sizes = np.bincount(flat, minlength=n + 1)
        covered = np.bincount(flat, weights=mask.ravel().astype(np.float64), minlength=n + 1)
        smallest = max(o.piece_min_mm2 / self.pixel_mm2, o.piece_min_fraction * float(prev_mask.sum()))
        mode, sd = self.organ
        recovered = None
        for c in range(1, n + 1):
            if sizes[c] < smallest or covered[c] >= o.piece_max_covered * sizes[c]:
                continue
            piece = labels == c
            if recovered_prev is not None and (recovered_prev & piece).sum() > 0.5 * sizes[c]:
                continue
            box = _expand_box(_box_of(piece), self.margin_ij, self.shape_ji)
            if dome is not None:
                box = dome.clamp_box(box)
            found, _ = self._predict(k, SlicePrompts(boxes_ij=[box]), previous_mask=prev_mask, record=False)
            if dome is not None:
                found = dome.cut(found)
            added = found & ~mask
            area = float(added.sum())
            if area == 0 or area > o.piece_max_growth * sizes[c] or (added & piece).sum() < o.piece_min_overlap * area:
                continue
            if abs(float(np.median(self._smoothed_slice(k, added)[added])) - mode) > o.piece_max_sd * sd:
                continue
            mask = mask | added
            recovered = added if recovered is None else recovered | added
        return mask, recovered

    def _dome_limit(self, step: int, prev_mask: np.ndarray, areas: dict[int, float]) -> DomeLimit | None:
        """How far towards the patient's left an organ's next slice may reach (``OrganTrackSettings.dome_fraction``),
        or None where the rule does not apply: a lesion, a walk towards inferior, a slice no smaller than
        ``dome_fraction`` of the track's largest so far (``areas``: voxels per slice), a scan not in axial
        orientation."""
        o = self.organ_track
        if (o.dome_fraction is None or self.container is not None or self.left_i == 0 or step != self.superior_step
                or not prev_mask.any()):
            return None
        if float(prev_mask.sum()) >= o.dome_fraction * max(areas.values()):
            return None
        # the columns (i) or rows (j) the organ covers, whichever axis runs to the patient's left
        lines = np.flatnonzero(prev_mask.any(axis=1 - self.left_axis))
        allowance = o.dome_left_allowance_mm / self.predictor.volume.geometry.spacing_mm[1 - self.left_axis]
        edge = lines.max() if self.left_i > 0 else lines.min()
        return DomeLimit(self.left_i, float(edge) + self.left_i * allowance, self.left_axis)

    def _leaks(self, area: float, prev_area: float) -> bool:
        """The leak guard on sudden growth: ``area`` (voxels) more than ``max_growth_ratio`` x ``prev_area`` +
        ``growth_allowance_mm2``."""
        s = self.settings
        return bool(s.max_growth_ratio) and (area * self.pixel_mm2
                                             > s.max_growth_ratio * prev_area * self.pixel_mm2 + s.growth_allowance_mm2)

    def _mean_hu(self, k: int, mask: np.ndarray) -> float:
        return float(self.predictor.volume.array_kji[k][mask].mean()) if mask.any() else float("nan")

    def _before_slice(self, k: int, prev_mask: np.ndarray, prev_area: float, count: int, k_min: int,
                      k_max: int) -> str | None:
        """Why the walk may not go on to slice ``k`` (``count`` slices walked so far), or None."""
        s = self.settings
        if not (k_min <= k <= k_max) or not (0 <= k < self.nk):
            return "volume end" if not (0 <= k < self.nk) else "reached limit"
        if s.max_slices is not None and count >= s.max_slices:
            return "max slices"
        if prev_area * self.pixel_mm2 < s.min_area_mm2:
            return "structure ended"
        if k in self.user_slices and _prompt_overlaps(self.user_slices[k], prev_mask):
            return f"user prompts on slice {k}"
        if self.container is not None and not self.container[k].any():
            return "outside container"
        return None

    def _step_to(self, k: int, step: int, prev_mask: np.ndarray, prev_prediction, prev_area: float, seed_area: float,
                 seed_hu: float, areas: dict[int, float], k_prev: int):
        """Predict slice ``k`` from the previous accepted slice's mask (slice ``k_prev``); (why the track stops
        there, or None; box, mask, prediction, area)."""
        s = self.settings
        o = self.organ_track
        self._unheld_at = None
        self._outside_at = None
        box = _expand_box(_box_of(prev_mask), self.margin_ij, self.shape_ji)
        logits = prev_prediction.low_res_logits if s.use_mask_prompt else None
        dome = self._dome_limit(step, prev_mask, areas)
        if dome is not None:
            box = dome.clamp_box(box)
        mask, prediction = self._predict(k, SlicePrompts(boxes_ij=[box]), mask_logits=logits, previous_mask=prev_mask)
        if self.container is None:
            box, mask, prediction = self._regrow(k, box, mask, prediction, prev_mask)
            if dome is not None:
                mask = dome.cut(mask)
            if o.wider_box_mm and self.organ is not None and mask.any():
                box, mask, prediction = self._widen(k, box, mask, prediction, prev_mask, dome)
            if o.piece_min_mm2 is not None and self.organ is not None and mask.any():
                mask, self._recovered_at[k] = self._recover_pieces(k, mask, prev_mask, dome,
                                                                   self._recovered_at.get(k_prev))
        area = float(mask.sum())
        if self.continue_past and (area * self.pixel_mm2 < s.min_area_mm2 or area < s.collapse_ratio * prev_area):
            mask, prediction = self._continue_past_container(k, box, logits, prev_mask, mask, prediction)
            area = float(mask.sum())
        reason = None
        if self._unheld_at == k and area == 0:
            reason = "the model's mask no longer holds the lesion"
        elif area * self.pixel_mm2 < s.min_area_mm2:
            reason = "structure ended"
        elif area < s.collapse_ratio * prev_area:
            reason = "mask collapsed"
        elif self._leaks(area, prev_area):
            reason = f"leak: area grew {area / max(prev_area, 1):.1f}x"
        elif s.max_mean_hu_shift is not None and abs(shift := self._mean_hu(k, mask) - seed_hu) > s.max_mean_hu_shift:
            reason = f"leak: mean HU moved {shift:+.0f} from the seed's"
        elif prediction.score < s.min_score:
            reason = f"low score {prediction.score:.2f}"
        elif (mask & ndimage.binary_dilation(prev_mask, iterations=3)).sum() < s.min_overlap * area:
            reason = "jumped away from previous slice"
        elif (self.container is None and o.tip_fraction is not None and self.thickness_mm >= o.tip_min_thickness_mm
                and area < o.tip_fraction * seed_area):
            window = max(1, int(round(o.tip_window_mm / self.thickness_mm)))
            back = areas.get(k - window * step)
            if back is not None and area > o.tip_min_shrink * back:
                reason = "tip stopped tapering"
        return reason, box, mask, prediction, area

    def _walk(self, k0, step, prev_mask, prev_prediction, track, out, scores, k_min, k_max) -> str:
        """Walk from the seed ``k0`` in direction ``step`` until a stop rule holds; the reason it stopped.

        An organ on thin slices (``self.skip``) is predicted on every other slice, the slice between taken from
        its two neighbours (:func:`interpolate_between`). Every rule holds for the longer step too; where one
        fails (or the slice between carries the user's prompts, or the walk's limit is one slice away) the
        walk takes the next slice alone, and the next one after it, as without skipping."""
        prev_area = float(prev_mask.sum())
        seed_area = prev_area
        areas = {k0: prev_area}
        self._recovered_at = {}  # each walk starts afresh (a slice of another walk is not this walk's previous)
        seed_hu = self._mean_hu(k0, prev_mask)
        count = 0
        k_prev = k0
        single_steps = 0  # slices still to take one at a time after a longer step failed
        while True:
            near = k_prev + step
            reason = self._before_slice(near, prev_mask, prev_area, count, k_min, k_max)
            if reason is not None:
                return reason
            if self.lesion_extent is not None and self.lesion_extent.reached(
                    abs(near - k0) * self.thickness_mm, max(areas.values()) * self.pixel_mm2, self._without_contrast):
                return "reached the lesion's extent"
            far = near + step
            if (self.skip and single_steps == 0
                    and self._before_slice(far, prev_mask, prev_area, count + 1, k_min, k_max) is None
                    and near not in self.user_slices and far not in self.user_slices):
                reason, box, mask, prediction, area = self._step_to(far, step, prev_mask, prev_prediction, prev_area,
                                                                    seed_area, seed_hu, areas, k_prev)
                between = interpolate_between(prev_mask, mask, self.spacing_ji) if reason is None else None
                if between is not None and not self._plausible_between(between, prev_mask, mask):
                    reason = "the slice between would not join its neighbours"
                if reason is None:
                    between_score = min(prediction.score, scores.get(k_prev, prediction.score))
                    areas[near] = float(between.sum())
                    track.records[near] = SliceRecord(near, areas[near] * self.pixel_mm2, between_score, None,
                                                      "interpolated")
                    out[near] |= between
                    scores[near] = min(scores.get(near, 1.0), between_score)
                    self.interpolated.append(near)
                    self._accept(far, box, mask, prediction, area, areas, track, out, scores)
                    prev_mask, prev_prediction, prev_area = mask, prediction, area
                    count += 2
                    k_prev = far
                    continue
                single_steps = 2
            reason, box, mask, prediction, area = self._step_to(near, step, prev_mask, prev_prediction, prev_area,
                                                                seed_area, seed_hu, areas, k_prev)
            if reason is not None:
                return reason
            self._accept(near, box, mask, prediction, area, areas, track, out, scores)
            prev_mask, prev_prediction, prev_area = mask, prediction, area
            count += 1
            k_prev = near
            single_steps = max(0, single_steps - 1)

    def _plausible_between(self, between: np.ndarray, below: np.ndarray, above: np.ndarray) -> bool:
        """An interpolated slice must overlap both neighbours and not collapse (two masks that barely touch
        interpolate to almost nothing): else the slice is predicted."""
        area = float(between.sum())
        return (area >= self.settings.collapse_ratio * min(float(below.sum()), float(above.sum()))
                and bool((between & below).any()) and bool((between & above).any()))

    def _accept(self, k, box, mask, prediction, area, areas, track, out, scores) -> None:
        areas[k] = area
        track.records[k] = SliceRecord(k, area * self.pixel_mm2, prediction.score, box, "propagated",
                                       _touches_box_edge(mask, box, self.shape_ji))
        out[k] |= mask
        scores[k] = min(scores.get(k, 1.0), prediction.score)
        if self._outside_at is not None and self._outside_at[0] == k:
            self._note_beyond_container(k, self._outside_at[1])
            self._outside_at = None


def _superior_step_and_left_i(direction_lps: np.ndarray) -> tuple[int, int]:
    """(k step towards superior, i direction towards the patient's left): +1 or -1 each, 0 where that axis is
    not within about 45 degrees of the body axis it should follow (LPS: +x is left, +z superior)."""
    def sign_along(component: float) -> int:
        return 0 if abs(component) < 0.7 else (1 if component > 0 else -1)

    direction = np.asarray(direction_lps, dtype=float)
    return sign_along(direction[2, 2]), sign_along(direction[0, 0])


def patient_left_axis(direction_lps: np.ndarray) -> tuple[int, int]:
    """(axis of a slice mask [j, i] that runs towards the patient's left: 1 for i, 0 for j; +1 or -1 along it),
    sign 0 where neither in-plane axis is within about 45 degrees of left-right. A scan stored with its in-plane
    axes swapped has the patient's left along j."""
    direction = np.asarray(direction_lps, dtype=float)
    for axis, component in ((1, direction[0, 0]), (0, direction[0, 1])):
        if abs(component) >= 0.7:
            return axis, (1 if component > 0 else -1)
    return 1, 0


@dataclass(frozen=True)
class DomeLimit:
    """The line ``limit_i`` that an organ's mask may not pass towards the patient's left (``left_i``: +1 when
    the patient's left is towards larger indices, -1 towards smaller), along ``axis`` of a slice mask [j, i]: 1, the
    i axis (a column limit, the usual axial storage), or 0, the j axis (a row limit: in-plane axes swapped)."""

    left_i: int
    limit_i: float
    axis: int = 1

    def clamp_box(self, box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
        i0, j0, i1, j1 = box
        lo, hi = (i0, i1) if self.axis == 1 else (j0, j1)
        if self.left_i > 0:
            lo, hi = lo, max(lo, min(hi, self.limit_i))
        else:
            lo, hi = min(hi, max(lo, self.limit_i)), hi
        return (lo, j0, hi, j1) if self.axis == 1 else (i0, lo, i1, hi)

    def cut(self, mask_ji: np.ndarray) -> np.ndarray:
        lines = np.arange(mask_ji.shape[self.axis])
        beyond = lines > self.limit_i if self.left_i > 0 else lines < self.limit_i
        index = (slice(None), beyond) if self.axis == 1 else (beyond, slice(None))
        if not mask_ji[index].any():
            return mask_ji
        out = mask_ji.copy()
        out[index] = False
        return out


def interpolate_between(below_ji: np.ndarray, above_ji: np.ndarray, spacing_ji: tuple[float, float]) -> np.ndarray:
    """The mask halfway between two slices' masks: where the mean of their signed distance maps (mm, negative
    inside) is negative. Computed on the two masks' common bounding box grown by a voxel (exact: both masks lie
    inside it)."""
    both = below_ji | above_ji
    out = np.zeros_like(both)
    if not both.any():
        return out
    js, is_ = np.nonzero(both)
    j0, j1 = max(js.min() - 1, 0), min(js.max() + 2, both.shape[0])
    i0, i1 = max(is_.min() - 1, 0), min(is_.max() + 2, both.shape[1])
    window = (slice(j0, j1), slice(i0, i1))

    def signed_distance(mask: np.ndarray) -> np.ndarray:
        if not mask.any():
            return np.full(mask.shape, np.inf)
        return (ndimage.distance_transform_edt(~mask, sampling=spacing_ji)
                - ndimage.distance_transform_edt(mask, sampling=spacing_ji))

    a, b = signed_distance(below_ji[window]), signed_distance(above_ji[window])
    out[window] = (a + b) < 0
    return out


def default_slice_postprocess(lesion: bool) -> PostprocessSettings:
    """The default clean-up of a segment's slice masks: holes filled for a lesion (a segment with a container),
    kept for an organ (``liversam.pipeline.PipelineSettings.fill_organ_slice_holes``)."""
    return PostprocessSettings(fill_holes=lesion)


def propagate_segment(
    seg: SegmentPrompts,
    predictor: SlicePredictor,
    settings: PropagationSettings | None = None,
    postprocess: PostprocessSettings | None = None,
    container_kji: np.ndarray | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    method: str = "liversam",
    organ_track: OrganTrackSettings | None = None,
    model_union: ModelTrackUnion | None = ModelTrackUnion(),
    lesion_extent: LesionExtent | None = LesionExtent(),
    past_container: bool = False,
    continue_past_container: bool = False,
    hypodense_past_container: bool = False,
) -> PropagationOutcome:
    """Segment every prompted slice of ``seg`` and propagate each seed both ways until the structure ends.

    ``method``: "liversam" (this module's walk) or "naive" (the reference loop, :func:`propagate_naive`).
    ``model_union``: when a refined lesion also takes its model's own track (None: never).
    ``lesion_extent``: how far a lesion's track (a segment inside a container) may reach (None: no limit).
    ``past_container``: a hyperdense lesion's track may leave its container within its box when its model mask
    does on the seed slice (the outcome's ``beyond_container`` says where; False: the container only).
    ``continue_past_container``: a lesion's track that the container would cut short goes on within the previous
    slice's lesion (``_Propagator._continue_past_container``; ``beyond_container`` says where).
    ``hypodense_past_container``: a hypodense lesion whose model mask lies outside the container on the seed slice
    may leave it within its box there and within the previous slice's lesion off it
    (``_Propagator._hypodense_past_container``; ``beyond_container`` says where).
    ``postprocess``: the slice masks' clean-up; by default :func:`default_slice_postprocess` (as the pipeline's).
    """
    if method not in PROPAGATION_METHODS:
        raise ValueError(f"propagation method '{method}': choose one of {', '.join(PROPAGATION_METHODS)}")
    settings = settings or PropagationSettings()
    if method == "naive":
        return propagate_naive(seg, predictor, settings, progress=progress, cancel=cancel)
    postprocess = postprocess or default_slice_postprocess(container_kji is not None)
    propagator = _Propagator(predictor, settings, postprocess, seg.slices, container_kji, progress, cancel, seg.name,
                             organ_track, lesion_extent, past_container, continue_past_container,
                             hypodense_past_container)
    out = np.zeros(predictor.volume.geometry.shape_kji, dtype=bool)
    scores: dict[int, float] = {}
    tracks = []
    lesion = settings.intensity_refinement and container_kji is not None
    for k, prompts in split_into_seeds(seg):
        track_out = np.zeros_like(out) if lesion else out
        tracks.append(propagator.run_track(k, prompts, track_out, scores))
        if lesion and model_union is not None:
            extra = propagator.model_track_union(k, prompts, track_out, model_union)
            if extra is not None:
                track_out |= extra
        if lesion:  # a lesion is one object: drop specks that lost touch with the prompted slice's mask
            out |= connected_to_slice(track_out, k)
    return PropagationOutcome(out, scores, tracks, sorted(seg.slices), propagator.computed + propagator.interpolated,
                              beyond_container=propagator.beyond_container)


def propagate_naive(
    seg: SegmentPrompts,
    predictor: SlicePredictor,
    settings: PropagationSettings | None = None,
    progress: Callable[[str, int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> PropagationOutcome:
    """The reference loop every evaluation reports beside LiverSAM's walk: for each seed (box), predict the
    seed slice, then on each next slice the box of the previous slice's mask + ``NAIVE_MARGIN_PX`` pixels,
    stopping when the mask has fewer than ``NAIVE_MIN_PIXELS`` pixels (or at ``max_slices``). No clean-up,
    no leak guards, no intensity refinement; each seed on its own, results united (the pipeline clips a
    segment to its ``inside`` container afterwards)."""
    settings = settings or PropagationSettings()
    nk = predictor.volume.geometry.size_ijk[2]
    shape_ji = predictor.volume.array_kji.shape[1:]
    pixel_mm2 = predictor.volume.geometry.spacing_mm[0] * predictor.volume.geometry.spacing_mm[1]
    out = np.zeros(predictor.volume.geometry.shape_kji, dtype=bool)
    scores: dict[int, float] = {}
    computed: list[int] = []
    tracks: list[Track] = []

    def predict(k: int, prompts: SlicePrompts):
        if cancel is not None and cancel():
            raise Cancelled()
        prediction = predictor.predict(k, prompts)
        computed.append(k)
        if progress:
            progress(f"propagating '{seg.name}'", len(computed), nk)
        return prediction.mask_ji, prediction

    for seed_k, prompts in split_into_seeds(seg):
        track = Track(seed_k=seed_k)
        mask, prediction = predict(seed_k, prompts)
        box = prompts.boxes_ij[0] if prompts.boxes_ij else _box_of(mask)
        track.records[seed_k] = SliceRecord(seed_k, float(mask.sum() * pixel_mm2), prediction.score, box, "user")
        out[seed_k] |= mask
        scores[seed_k] = min(scores.get(seed_k, 1.0), prediction.score)
        for direction, step in (("up", 1), ("down", -1)):
            prev, k, count, reason = mask, seed_k + step, 0, "volume end"
            while 0 <= k < nk:
                if settings.max_slices is not None and count >= settings.max_slices:
                    reason = "max slices"
                    break
                if prev.sum() < NAIVE_MIN_PIXELS:
                    reason = "structure ended"
                    break
                box = _expand_box(_box_of(prev), (NAIVE_MARGIN_PX, NAIVE_MARGIN_PX), shape_ji)
                new, prediction = predict(k, SlicePrompts(boxes_ij=[box]))
                if new.sum() < NAIVE_MIN_PIXELS:
                    reason = "structure ended"
                    break
                track.records[k] = SliceRecord(k, float(new.sum() * pixel_mm2), prediction.score, box, "propagated",
                                               _touches_box_edge(new, box, shape_ji))
                out[k] |= new
                scores[k] = min(scores.get(k, 1.0), prediction.score)
                prev, k, count = new, k + step, count + 1
            track.stop_reasons[direction] = reason
        tracks.append(track)
    return PropagationOutcome(out, scores, tracks, sorted(seg.slices), computed)


def connected_to_slice(mask_kji: np.ndarray, k: int) -> np.ndarray:
    """The 3D components (26-connected) of ``mask_kji`` that have voxels on slice ``k``."""
    if not mask_kji[k].any():
        return mask_kji.copy()
    labels, _ = ndimage.label(mask_kji, structure=np.ones((3, 3, 3), dtype=bool))
    keep = np.unique(labels[k][mask_kji[k]])
    return np.isin(labels, keep[keep > 0])


def repropagate(
    existing_kji: np.ndarray,
    seg: SegmentPrompts,
    k_fix: int,
    new_prompts: SlicePrompts,
    predictor: SlicePredictor,
    settings: PropagationSettings | None = None,
    postprocess: PostprocessSettings | None = None,
    container_kji: np.ndarray | None = None,
    cancel: Callable[[], bool] | None = None,
    past_container: bool = False,
    hypodense_past_container: bool = False,
) -> PropagationOutcome:
    """Fix one slice with new prompts and recompute only what that fix affects.

    The object being fixed is the part of ``existing_kji`` connected (in 3D) to the new prompts on slice
    ``k_fix``. Only ``k_fix`` and at most ``REPROPAGATION_MAX_REACH`` slices each way, never a user-prompted
    slice of ``seg``, are recomputed, and only that object's voxels there are replaced; every other slice and
    every other object is left exactly as it was. ``seg`` gains the new prompts. ``past_container``,
    ``hypodense_past_container``: as :func:`propagate_segment`'s (a hyper- or hypodense lesion the container leaves
    out).
    """
    settings = settings or PropagationSettings()
    postprocess = postprocess or default_slice_postprocess(container_kji is not None)
    nk = existing_kji.shape[0]
    others = [k for k in seg.slices if k != k_fix]
    below = max((k for k in others if k < k_fix), default=-1)
    above = min((k for k in others if k > k_fix), default=nk)
    k_lo, k_hi = below + 1, above - 1

    # The object the fix concerns: 3D components of the existing mask touching the new prompts' region.
    region = np.zeros(existing_kji.shape[1:], dtype=bool)
    for box in new_prompts.boxes_ij:
        region |= box_region(region.shape, box)
    for i, j in new_prompts.points_pos_ij:
        region[int(round(j)), int(round(i))] = True
    labels, _ = ndimage.label(existing_kji)
    touched = np.unique(labels[k_fix][region & existing_kji[k_fix]])
    touched = touched[touched > 0]
    object_mask = np.isin(labels, touched) if touched.size else np.zeros_like(existing_kji)

    seg.slices[k_fix] = new_prompts
    # A fix is often on a small cross-section, and its track walks towards larger ones: an organ's mask that
    # reaches its box's edge is predicted again from a box moved out (lits117, a fix on slice 73 of a liver
    # boxed on slice 33: without it the track under-segments slices 34..72 and the 3D Dice falls 0.952 ->
    # 0.829; with it only slices 72..74 change and it rises to 0.954).
    propagator = _Propagator(predictor, settings, postprocess, seg.slices, container_kji, None, cancel, seg.name,
                             # no widening and no pieces asked for apart on top of the regrowth, no lesion extent:
                             # the fix reaches one slice each way, measured without them (benchmarks/fix_reach.py)
                             OrganTrackSettings(box_regrow_steps=REPROPAGATION_REGROW_STEPS, wider_box_mm=None,
                                                piece_min_mm2=None), None, past_container,
                             hypodense_past_container=hypodense_past_container)
    scores: dict[int, float] = {}
    fresh = np.zeros_like(existing_kji)
    k_lo, k_hi = max(k_lo, k_fix - REPROPAGATION_MAX_REACH), min(k_hi, k_fix + REPROPAGATION_MAX_REACH)
    track = propagator.run_track(k_fix, new_prompts, fresh, scores, limits=(k_lo, k_hi))
    # The fix reaches its neighbours only (REPROPAGATION_MAX_REACH), and only where the new track neither agrees
    # with the existing object nor has stopped (see _reach_of_fix).
    k_lo, k_hi = _reach_of_fix(fresh, object_mask, k_fix, k_lo, k_hi)
    result = existing_kji.copy()
    result[k_lo : k_hi + 1] &= ~object_mask[k_lo : k_hi + 1]
    result[k_lo : k_hi + 1] |= fresh[k_lo : k_hi + 1]
    scores = {k: v for k, v in scores.items() if k_lo <= k <= k_hi}
    fresh[:k_lo] = False
    fresh[k_hi + 1 :] = False
    fresh[k_lo : k_hi + 1] &= ~(existing_kji[k_lo : k_hi + 1] & ~object_mask[k_lo : k_hi + 1])
    return PropagationOutcome(result, scores, [track], sorted(seg.slices), propagator.computed, replaced_kji=fresh)


REPROPAGATION_AGREEMENT = 0.9
REPROPAGATION_REGROW_STEPS = 3
# How far a fix reaches. Measured on simulated reader fixes (the 6 worst slices of each of the four cases
# fixed one at a time with a box 3 mm around the label, the propagation + CRF result as the old one;
# benchmarks/fix_reach.py): replacing slices until the new track agrees with the old result changed the
# 3D liver Dice by -0.056 on average (down to -0.31: a new track that stopped at once emptied 8 good slices);
# the fix slice alone -0.0001; one slice each way at most, never one the new track left empty, -0.0013 (lits117
# +0.0017, ircadb17 -0.0003, hcc0697 -0.0054, hcc2144 -0.0015); two -0.0036, three -0.0068, five -0.0127.
# Also not kept: not replacing where the new mask is a smaller part of the old one (-0.0009 with one slice), as
# it would stop every fix that trims a leak.
REPROPAGATION_MAX_REACH = 1


def _reach_of_fix(fresh: np.ndarray, existing: np.ndarray, k_fix: int, k_lo: int, k_hi: int) -> tuple[int, int]:
    """The slices a fix replaces: from ``k_fix`` outwards, at most ``REPROPAGATION_MAX_REACH`` slices each way,
    up to (not including) the first slice where the fresh track has nothing (it stopped) or agrees with the
    existing object (slice Dice >= ``REPROPAGATION_AGREEMENT``)."""
    def keeps_existing(k: int) -> bool:
        a, b = fresh[k], existing[k]
        area = int(a.sum())
        return area == 0 or 2.0 * float((a & b).sum()) / (area + int(b.sum())) >= REPROPAGATION_AGREEMENT

    hi = k_fix
    while hi + 1 <= min(k_hi, k_fix + REPROPAGATION_MAX_REACH) and not keeps_existing(hi + 1):
        hi += 1
    lo = k_fix
    while lo - 1 >= max(k_lo, k_fix - REPROPAGATION_MAX_REACH) and not keeps_existing(lo - 1):
        lo -= 1
    return lo, hi
