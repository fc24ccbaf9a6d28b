"""A model-free stand-in for :class:`liversam.predictor.SlicePredictor`, for testing propagation's rules.

Propagation uses four things of a predictor: ``volume`` (its ``geometry`` and ``array_kji``), ``model.name``
(recorded in the result's provenance by the pipeline), and ``predict(k, prompts, mask_logits=None)``
returning a :class:`liversam.predictor.SlicePrediction` (``mask_ji``, ``score``, ``low_res_logits``).
:class:`ScriptedPredictor` has exactly that interface; the masks and scores it returns are chosen by the
test: a table ``{k: (mask_ji, score)}`` or a function ``(k, prompts) -> (mask_ji, score)``. Every call is
recorded, so a test can assert which slices were predicted and from which prompts.

The helpers build small synthetic volumes (:func:`synthetic_volume`) and exact masks (:func:`rect`) so that
a test can place a rule's threshold between two neighbouring pixel counts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import torch

from liversam.geometry import ImageGeometry
from liversam.predictor import SlicePrediction
from liversam.prompts import SlicePrompts
from liversam.volume import CTVolume

Script = Mapping[int, tuple[np.ndarray, float]] | Callable[[int, SlicePrompts], tuple[np.ndarray, float]]


@dataclass
class ScriptedPredictor:
    """Returns the scripted mask and score for each slice; slices missing from a table give an empty mask."""

    volume: CTVolume
    script: Script
    default_score: float = 0.95
    model: SimpleNamespace = field(default_factory=lambda: SimpleNamespace(name="scripted"))
    calls: list[tuple[int, SlicePrompts]] = field(default_factory=list)

    def predict(self, k: int, prompts: SlicePrompts, mask_logits: torch.Tensor | None = None) -> SlicePrediction:
        if prompts.is_empty():  # the real predictor refuses empty prompts too
            raise ValueError(f"slice k={k}: prompts need at least one box or positive point")
        self.calls.append((k, prompts))
        shape = self.volume.array_kji.shape[1:]
        if callable(self.script):
            mask, score = self.script(k, prompts)
        elif k in self.script:
            mask, score = self.script[k]
        else:
            mask, score = np.zeros(shape, dtype=bool), self.default_score
        mask = np.array(mask, dtype=bool, copy=True)  # propagation may change what it gets
        assert mask.shape == shape, f"scripted mask for k={k} has shape {mask.shape}, the slice {shape}"
        return SlicePrediction(k=k, mask_ji=mask, score=float(score), low_res_logits=torch.zeros(1, 1, 8, 8))

    @property
    def predicted_slices(self) -> list[int]:
        return [k for k, _ in self.calls]


def synthetic_volume(
    hu_kji: np.ndarray, spacing_mm: tuple[float, float, float] = (0.8, 0.8, 2.5)
) -> CTVolume:
    """A CT volume holding ``hu_kji`` (int16) with the given (i, j, k) spacing, axis-aligned at the origin."""
    nk, nj, ni = hu_kji.shape
    geometry = ImageGeometry((ni, nj, nk), spacing_mm, (0.0, 0.0, 0.0))
    return CTVolume(np.asarray(hu_kji, dtype=np.int16).copy(), geometry, source="synthetic")


def rect(shape_ji: tuple[int, int], j0: int, i0: int, rows: int, cols: int) -> np.ndarray:
    """A boolean slice with one filled rectangle of ``rows`` x ``cols`` pixels whose corner is (j0, i0)."""
    mask = np.zeros(shape_ji, dtype=bool)
    mask[j0 : j0 + rows, i0 : i0 + cols] = True
    assert int(mask.sum()) == rows * cols, "rectangle leaves the slice"
    return mask


def box_around(mask_ji: np.ndarray) -> tuple[float, float, float, float]:
    """The tight (i0, j0, i1, j1) box of a non-empty mask, computed here rather than by the code under test."""
    rows = np.flatnonzero(mask_ji.any(axis=1))
    cols = np.flatnonzero(mask_ji.any(axis=0))
    return (float(cols[0]), float(rows[0]), float(cols[-1]), float(rows[-1]))
