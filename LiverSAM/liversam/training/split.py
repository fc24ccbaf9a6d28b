"""Train / validation / test split by patient (never by slice), seeded or explicit, saved with the run.

With a single study there are no patients to split: the study's liver slices are split into contiguous
blocks instead (training first, a gap of one sampled slice, then held-back validation slices), so a demo
on one CT can still show learning on slices the model never saw. This is logged as a warning: it
measures generalisation to other slices of the same patient, not to other patients.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic_write import write_text_atomically
from .config import TrainingConfigError

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class DataSplit:
    """Case ids per split. ``mode`` is ``patients`` or ``slices`` (single study: ``slices`` holds the
    axial slice indices per split of that one study)."""

    train: list[str]
    val: list[str]
    test: list[str]
    mode: str = "patients"
    seed: int = 0
    slices: dict[str, list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "seed": self.seed,
            "train": list(self.train),
            "val": list(self.val),
            "test": list(self.test),
            "slices": {k: [int(v) for v in ks] for k, ks in self.slices.items()},
        }

    @classmethod
    def from_dict(cls, data: dict) -> DataSplit:
        return cls(
            train=list(data.get("train", [])),
            val=list(data.get("val", [])),
            test=list(data.get("test", [])),
            mode=str(data.get("mode", "patients")),
            seed=int(data.get("seed", 0)),
            slices={k: [int(v) for v in ks] for k, ks in (data.get("slices") or {}).items()},
        )

    def save(self, path: str | Path) -> None:
        write_text_atomically(path, json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> DataSplit:
        return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))

    def split_of(self, case_id: str) -> str | None:
        for name in SPLITS:
            if case_id in getattr(self, name):
                return name
        return None


def split_patients(
    case_ids: list[str], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> DataSplit:
    """A seeded split of patient ids. Validation and test get at least one case each when their fraction
    is non-zero and at least three cases exist; training always keeps at least one."""
    ids = sorted(case_ids)
    n = len(ids)
    if n < 2:
        raise TrainingConfigError(
            "A patient split needs at least two studies (one study is split by slices)."
        )
    order = [ids[i] for i in np.random.default_rng(seed).permutation(n)]
    n_val = int(round(fractions[1] * n))
    n_test = int(round(fractions[2] * n))
    if fractions[1] > 0 and n_val == 0:
        n_val = 1
    if fractions[2] > 0 and n_test == 0 and n >= 3:
        n_test = 1
    while n_val + n_test > n - 1:
        if n_test > 0:
            n_test -= 1
        else:
            n_val -= 1
    val = sorted(order[:n_val])
    test = sorted(order[n_val : n_val + n_test])
    train = sorted(order[n_val + n_test :])
    return DataSplit(train=train, val=val, test=test, mode="patients", seed=seed)


def split_from_file(path: str | Path, case_ids: list[str]) -> DataSplit:
    """An explicit split from JSON ``{"train": [...], "val": [...], "test": [...]}``; every id must exist
    and belong to one split only."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TrainingConfigError(f"Cannot read split file '{path}': {exc}.") from exc
    split = DataSplit.from_dict({**data, "mode": "patients"})
    known = set(case_ids)
    seen: set[str] = set()
    for name in SPLITS:
        for case_id in getattr(split, name):
            if case_id not in known:
                raise TrainingConfigError(
                    f"Split file '{path}': case '{case_id}' ({name}) is not among the studies ({', '.join(sorted(known))})."
                )
            if case_id in seen:
                raise TrainingConfigError(f"Split file '{path}': case '{case_id}' is in more than one split.")
            seen.add(case_id)
    if not split.train:
        raise TrainingConfigError(f"Split file '{path}' has no training cases.")
    return split


def split_single_study_slices(
    case_id: str, slices_k: list[int], fractions: tuple[float, float, float] = (0.8, 0.1, 0.1), seed: int = 0
) -> DataSplit:
    """Contiguous blocks of one study's sampled slices: training first, one slice left out as a gap, then
    validation (the validation and test fractions together). No test slices."""
    ks = sorted(int(k) for k in slices_k)
    if len(ks) < 3:
        raise TrainingConfigError(
            f"Study '{case_id}' has only {len(ks)} usable slices; a single-study run needs at least 3."
        )
    n_held = max(1, int(round((fractions[1] + fractions[2]) * len(ks))))
    n_train = max(1, len(ks) - n_held - 1)
    log.warning(
        "Only one study ('%s'): splitting its slices instead of patients (%d training, %d held back). "
        "Validation then measures other slices of the same patient, not other patients.",
        case_id,
        n_train,
        n_held,
    )
    return DataSplit(
        train=[case_id],
        val=[case_id],
        test=[],
        mode="slices",
        seed=seed,
        slices={"train": ks[:n_train], "val": ks[n_train + 1 :]},
    )
