"""The click simulator: every click lies inside an error region, at its centre, with the right sign."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from liversam.click_simulation import (
    Click,
    mean_dice_per_click,
    next_click,
    pooled_dice_per_click,
    region_centre_ij,
    simulate_clicks_on_slice,
)


def test_first_click_is_positive_at_the_centre_of_the_reference() -> None:
    ref = np.zeros((12, 14), dtype=bool)
    ref[2:9, 3:10] = True  # rows 2..8, columns 3..9: centre row 5, column 6
    click = next_click(np.zeros_like(ref), ref)
    assert click == Click(i=6, j=5, positive=True)


def test_larger_false_positive_region_gives_a_negative_click_inside_it() -> None:
    ref = np.zeros((20, 20), dtype=bool)
    ref[2:6, 2:6] = True
    pred = ref.copy()
    pred[2:5, 2:4] = False  # 6 false-negative pixels
    pred[10:19, 10:19] = True  # 81 false-positive pixels, centre (14, 14)
    click = next_click(pred, ref)
    assert click is not None and not click.positive
    assert (click.i, click.j) == (14, 14)


def test_no_click_when_prediction_is_perfect() -> None:
    ref = np.zeros((8, 8), dtype=bool)
    ref[2:5, 2:5] = True
    assert next_click(ref.copy(), ref) is None


def test_region_touching_the_border_is_clicked_away_from_the_border() -> None:
    region = np.zeros((10, 20), dtype=bool)
    region[0:3, :] = True  # a 3-row strip along the top: the border counts as boundary
    i, j = region_centre_ij(region)
    assert j == 1 and 1 <= i <= 18


def test_previous_clicks_are_avoided_but_stay_inside() -> None:
    region = np.zeros((9, 9), dtype=bool)
    region[2:7, 2:7] = True
    first = region_centre_ij(region)
    assert first == (4, 4)
    second = region_centre_ij(region, avoid_ij=[first])
    assert second != first and region[second[1], second[0]]
    # A one-pixel region already clicked: the click must still be inside it.
    single = np.zeros((5, 5), dtype=bool)
    single[3, 1] = True
    assert region_centre_ij(single, avoid_ij=[(1, 3)]) == (1, 3)


@pytest.mark.parametrize("seed", range(40))
def test_click_is_always_inside_the_largest_error_region(seed: int) -> None:
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(8, 40)), int(rng.integers(8, 40)))
    # Blobby random masks (smoothed noise), sometimes touching the border.
    ref = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    pred = ndimage.gaussian_filter(rng.random(shape), 2.0) > 0.5
    spacing = (float(rng.uniform(0.5, 3.0)), float(rng.uniform(0.5, 3.0)))
    previous = [Click(int(rng.integers(shape[1])), int(rng.integers(shape[0])), True) for _ in range(3)]
    click = next_click(pred, ref, spacing_ji_mm=spacing, previous_clicks=previous)
    false_neg = ref & ~pred
    false_pos = pred & ~ref
    if not false_neg.any() and not false_pos.any():
        assert click is None
        return
    assert click is not None
    error = false_neg if click.positive else false_pos
    assert error[click.j, click.i], "the click must lie inside an error region of its sign"
    # ... and in the largest error region (by pixel count, over both kinds).
    eight = np.ones((3, 3), dtype=bool)
    sizes = [
        np.bincount(ndimage.label(m, structure=eight)[0].ravel())[1:].max() if m.any() else 0
        for m in (false_neg, false_pos)
    ]
    labels, _ = ndimage.label(error, structure=eight)
    assert (labels == labels[click.j, click.i]).sum() == max(sizes)


def _component_predictor(ref: np.ndarray):
    """A toy model: the reference components hit by a positive click, grown by one pixel, minus a
    3-pixel disc around each negative click."""

    def predict(clicks: list[Click], _logits):
        labels, _ = ndimage.label(ref, structure=np.ones((3, 3), dtype=bool))
        hit = {labels[c.j, c.i] for c in clicks if c.positive} - {0}
        mask = ndimage.binary_dilation(np.isin(labels, list(hit)))
        jj, ii = np.mgrid[0 : ref.shape[0], 0 : ref.shape[1]]
        for c in clicks:
            if not c.positive:
                mask &= (ii - c.i) ** 2 + (jj - c.j) ** 2 > 9
        return mask, None

    return predict


def test_simulated_session_adds_clicks_inside_errors_and_improves_dice() -> None:
    ref = np.zeros((40, 40), dtype=bool)
    ref[5:16, 5:16] = True  # 121 px
    ref[25:35, 25:35] = True  # 100 px, a second lesion on the same slice
    seen: list[tuple[Click, np.ndarray]] = []
    base = _component_predictor(ref)
    state = {"pred": np.zeros_like(ref)}

    def predict(clicks, logits):
        seen.append((clicks[-1], state["pred"].copy()))
        mask, out = base(clicks, logits)
        state["pred"] = mask
        return mask, out

    result = simulate_clicks_on_slice(predict, ref, max_clicks=6, k=3)
    assert len(result.dice_per_click) == 6
    first = result.clicks[0]
    assert first.positive and (first.i, first.j) == (10, 10)
    # After click 1 the missed lesion (100 px) is the largest error, bigger than the 48-px ring.
    assert result.clicks[1].positive and 25 <= result.clicks[1].i < 35
    assert not result.clicks[2].positive, "then the false-positive rings get negative clicks"
    for click, pred_before in seen:
        error = (ref & ~pred_before) if click.positive else (pred_before & ~ref)
        assert error[click.j, click.i]
    assert result.dice_per_click[1] > result.dice_per_click[0]
    assert result.dice_per_click[1] > 0.8
    assert result.noc == {0.85: 6, 0.90: 6}, "never reached within 6 clicks: NoC is the cap"
    assert pooled_dice_per_click([result]) == pytest.approx(result.dice_per_click)
    assert mean_dice_per_click([result, result]) == pytest.approx(result.dice_per_click)


def test_perfect_prediction_stops_and_pads_the_curve() -> None:
    ref = np.zeros((10, 10), dtype=bool)
    ref[2:6, 2:6] = True
    result = simulate_clicks_on_slice(lambda clicks, logits: (ref.copy(), None), ref, max_clicks=5)
    assert len(result.clicks) == 1
    assert result.dice_per_click == [1.0] * 5
    assert result.noc == {0.85: 1, 0.90: 1}


def test_initial_prompt_then_corrective_clicks() -> None:
    ref = np.zeros((20, 20), dtype=bool)
    ref[4:12, 4:12] = True
    ref[15:19, 15:19] = True  # missed by the "box"
    calls = []

    def predict(clicks, logits):
        calls.append(list(clicks))
        mask = np.zeros_like(ref)
        mask[4:12, 4:12] = True  # the initial box result
        if any(c.positive and c.i >= 15 for c in clicks):
            mask[15:19, 15:19] = True
        return mask, None

    result = simulate_clicks_on_slice(predict, ref, max_clicks=3, initial_prompt=True)
    assert calls[0] == [], "the initial prediction is made from the caller's prompt alone"
    assert result.dice_initial == pytest.approx(2 * 64 / (64 + 80))
    assert result.clicks[0].positive and (result.clicks[0].i, result.clicks[0].j) in {
        (16, 16),
        (17, 17),
        (16, 17),
        (17, 16),
    }
    assert result.dice_per_click == [1.0, 1.0, 1.0]
    assert result.noc == {0.85: 0, 0.90: 1}, "the box alone reaches 0.85 (Dice 0.889) but not 0.90"
    perfect = simulate_clicks_on_slice(
        lambda clicks, logits: (ref.copy(), None), ref, max_clicks=3, initial_prompt=True
    )
    assert perfect.clicks == [] and perfect.noc == {0.85: 0, 0.90: 0} and perfect.dice_per_click == [1.0] * 3
