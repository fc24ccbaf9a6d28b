"""A lesion loses the thin bands it sends along its organ's outline, and nothing else
(``liversam.lesion_outline_band``)."""

from __future__ import annotations

import numpy as np

from liversam.lesion_outline_band import OutlineBandSettings, remove_outline_bands

NJ, NI = 80, 100
SPACING = (1.0, 1.0)  # 2 mm disc: radius 2 voxels; 3 mm zone: 3 voxels


def _organ() -> np.ndarray:
    organ = np.zeros((NJ, NI), dtype=bool)
    organ[10:70, 10:90] = True  # the organ's outline: rows 10 and 69, columns 10 and 89
    return organ


def _disc(cj: int, ci: int, r: float) -> np.ndarray:
    jj, ii = np.mgrid[0:NJ, 0:NI]
    return (jj - cj) ** 2 + (ii - ci) ** 2 <= r * r


def test_a_surface_lesion_loses_the_bands_along_the_outline_and_keeps_its_body():
    body = _disc(62, 50, 7) & _organ()  # a lesion on the surface (reaches the bottom outline, row 69)
    band = np.zeros((NJ, NI), dtype=bool)
    band[67:70, 20:80] = True  # 3 voxels thick along the outline on both sides of it
    thicker = np.zeros((NJ, NI), dtype=bool)
    thicker[66:70, 20:80] = True  # 4 voxels: reaches deeper than the 3 mm zone, still too thin for the 2 mm disc
    lesion = np.stack([body | band, body | thicker])
    organ = np.stack([_organ(), _organ()])
    removed = remove_outline_bands(lesion, organ, SPACING, OutlineBandSettings())
    for k, b in enumerate((band, thicker)):
        assert not (lesion[k] & b & ~_disc(62, 50, 11)).any()  # gone beyond the fillets where it meets the body
        assert lesion[k][body & _disc(62, 50, 6)].all()  # the body stays
        assert (lesion[k] & ~(body | b)).sum() == 0  # nothing added
    assert removed == int(((body | band) & ~lesion[0]).sum() + ((body | thicker) & ~lesion[1]).sum())
    assert removed >= 2 * 100


def test_a_round_lesion_on_the_outline_and_one_at_the_image_edge_keep_nearly_all_of_themselves():
    organ = np.zeros((NJ, NI), dtype=bool)
    organ[10:70, 0:90] = True  # cut by the image's left edge (a cropped field of view): that edge is no outline
    on_outline = _disc(63, 60, 6) & organ  # touches the bottom outline
    at_edge = np.zeros((NJ, NI), dtype=bool)
    at_edge[30:45, 0:8] = True  # a body against the image's edge
    lesion = (on_outline | at_edge)[None].copy()
    remove_outline_bands(lesion, organ[None], SPACING, OutlineBandSettings())
    assert lesion[0][at_edge].all()
    assert lesion[0][on_outline].sum() >= 0.95 * on_outline.sum()  # a digital disc's few corner voxels at most


def test_small_lesions_thin_lesions_inside_and_bodies_are_left_alone():
    small = _disc(68, 30, 1.0)  # 5 voxels on the outline: no disc fits anywhere in it, left whole
    strip_inside = np.zeros((NJ, NI), dtype=bool)
    strip_inside[38:40, 30:60] = True  # a thin lesion deep inside the organ: not near the outline
    deep = _disc(40, 75, 6)  # a round lesion 8 voxels from the right outline, wholly a body
    lesion = (small | strip_inside | deep)[None].copy()
    before = lesion.copy()
    assert remove_outline_bands(lesion, _organ()[None], SPACING, OutlineBandSettings()) == 0
    np.testing.assert_array_equal(lesion, before)


def test_a_band_with_no_body_goes_whole_when_it_is_too_large_to_be_a_small_lesion():
    """Past a surface lesion's end only the outline's dark rim is left: a piece with no body at all, 3 voxels thick
    along the outline. At three discs or more (3 x 13 voxels here) it goes whole; a smaller bodiless piece may be a
    small lesion and stays, as do pieces of that size away from the outline and with ``bodiless_band_min_discs``
    None."""
    rim = np.zeros((NJ, NI), dtype=bool)
    rim[67:70, 30:60] = True  # 90 voxels along the bottom outline, no 2 mm disc fits
    small = np.zeros((NJ, NI), dtype=bool)
    small[10:13, 70:82] = True  # 36 voxels along the top outline: under three discs
    inside = np.zeros((NJ, NI), dtype=bool)
    inside[38:41, 20:50] = True  # 90 voxels, as thin, deep inside the organ
    lesion = np.stack([rim | small | inside, rim | small | inside])
    organ = np.stack([_organ(), _organ()])
    assert remove_outline_bands(lesion[:1], organ[:1], SPACING, OutlineBandSettings()) == int(rim.sum())
    np.testing.assert_array_equal(lesion[0], small | inside)
    kept = OutlineBandSettings(bodiless_band_min_discs=None)
    assert remove_outline_bands(lesion[1:], organ[1:], SPACING, kept) == 0
    np.testing.assert_array_equal(lesion[1], rim | small | inside)


def test_the_radius_follows_the_spacing():
    """On 0.5 mm pixels the 2 mm disc is 4 voxels: a 5-voxel band (2.5 mm) along the outline is a band there,
    while on 1 mm pixels a 5-voxel band (5 mm) holds the 2 mm disc and stays (but for its square corners)."""
    organ = _organ()
    body = _disc(55, 50, 14) & organ
    band = np.zeros((NJ, NI), dtype=bool)
    band[65:70, 15:85] = True
    fine = (body | band)[None].copy()
    coarse = fine.copy()
    assert remove_outline_bands(fine, organ[None], (0.5, 0.5), OutlineBandSettings()) > 0
    assert not fine[0, 65:70, 15:25].any()
    assert remove_outline_bands(coarse, organ[None], (1.0, 1.0), OutlineBandSettings()) <= 8  # its corners only
    assert coarse[0, 65:70, 18:82].all()


def _pipeline_tumour(settings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A propagated ``tumor`` inside a given liver through ``segment_volume``: on slices 1-3 the model's stand-in
    returns a dark lesion on the liver's surface and the dark band it reaches along the outline (both 40 HU in
    100 HU parenchyma, so the refinement keeps both)."""
    from liversam.pipeline import segment_volume
    from liversam.prompts import SegmentPrompts, SlicePrompts
    from scripted_predictor import ScriptedPredictor, box_around, synthetic_volume

    rng = np.random.default_rng(3)
    organ = _organ()
    body = _disc(62, 50, 7) & organ
    band = np.zeros((NJ, NI), dtype=bool)
    band[67:70, 25:75] = True
    ct = np.full((5, NJ, NI), -100.0)
    ct[:, organ] = 100.0
    ct[:, body | band] = 40.0
    ct += rng.normal(0.0, 5.0, ct.shape)
    volume = synthetic_volume(np.round(ct), (1.0, 1.0, 2.0))

    def predict(k: int, prompts: SlicePrompts):
        return ((body | band) if k in (1, 2, 3) else np.zeros((NJ, NI), dtype=bool)), 0.9

    tumour = SegmentPrompts("tumor", 2, (0.3, 0.6, 0.9), inside="liver", propagate=True)
    tumour.slices[2] = SlicePrompts(boxes_ij=[box_around(body | band)])
    liver = np.repeat(organ[None], 5, axis=0)
    result = segment_volume(volume, [tumour], ScriptedPredictor(volume, predict), settings, containers={"liver": liver})
    return result.segments[0].mask_kji, body, band


def test_the_pipeline_removes_the_band_only_with_the_refinement():
    from liversam.pipeline import PipelineSettings
    from liversam.propagation import PropagationSettings

    with_removal, body, band = _pipeline_tumour(PipelineSettings())
    without, _, _ = _pipeline_tumour(PipelineSettings(lesion_outline_band=None))
    band_beyond_body = band & ~_disc(62, 50, 11)  # the opening keeps a fillet where the band meets the body
    core = body & _disc(62, 50, 5)
    for k in (1, 2, 3):
        assert without[k][band_beyond_body].all()  # the refinement keeps the dark band
        assert not with_removal[k][band_beyond_body].any()
        assert with_removal[k][core].all()
    naive, _, _ = _pipeline_tumour(PipelineSettings(propagation_method="naive"))
    assert naive[2][band_beyond_body].all()  # the reference loop keeps the model's masks
    unrefined, _, _ = _pipeline_tumour(PipelineSettings(propagation=PropagationSettings(intensity_refinement=False)))
    assert unrefined[2][band_beyond_body].all()
