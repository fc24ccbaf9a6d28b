"""The preprocessing cache: one HDF5 file per study, built once, reused while inputs and settings match.

File ``<cache_dir>/<case_id>-<key16>.h5`` where ``key`` is a SHA-256 over the study's input bytes (CT and
labels), the label configuration, the CT window, slice selection, augmentation and, when the encoder is
frozen, the base model's identity. Any change gives a new key, hence a rebuild; an unchanged study is
reused by every run pointing at the same cache folder. Each file is written atomically, so a run killed
while caching loses at most the study being cached.

Datasets (``N`` samples = selected slices x (1 + augmented copies)):

- ``k`` (N,) int32: axial slice index in the study; ``copy`` (N,) int16: 0 original, >0 augmented copy;
- ``image`` (N, nj, ni) float16: the windowed slice in [0, 1] (augmented for copies);
- ``liver``, ``tumor`` (N, nj, ni) uint8: the label slices (augmented with the image);
- ``embedding`` (N, C, H, W) float16: the frozen image encoder's output (only with a frozen encoder).

Attributes: ``case_id``, ``key``, ``geometry`` (JSON: size, spacing mm, origin LPS, direction LPS),
``settings`` (JSON), ``input_size``, ``liversam_version``, ``ct_checked`` (which checks of the study's CT in
:func:`~liversam.training.studies.check_study_ct` it passed when the file was built: :data:`CT_CHECK_LEVEL`).

A file without ``ct_checked`` was built by an older LiverSAM, which did not refuse a label map given as the CT; one
with ``ct_checked`` True (1) by one that did not refuse a CT without Hounsfield units. Before such a file is reused, a
few of its cached slices are looked at: a label map, or values without HU (0..1, or stored values), windowed by the CT
window have at most ``LABEL_MASK_MAX_DISTINCT`` distinct values, a CT's liver slices far more; only when they have so
few is the CT read and checked, and refused (see :func:`check_unchecked_cache`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic_write import atomic_path
from ..preprocess import SliceTransform, WindowSettings, display_view, window_slice
from .augment import SliceAugmenter
from .config import TrainingConfig
from .studies import TrainingDataError, TrainingStudy, check_study_ct, load_study

log = logging.getLogger(__name__)

CACHE_FORMAT = "liversam-train-cache/1"
ENCODE_BATCH = 4
# Seed embeddings must match the cache's encoder this closely (relative L2 on one re-encoded slice). The
# accelerated encoders differ from fp32 PyTorch (and from each other) by up to ~0.04 (OpenVINO bf16-rest:
# 0.036, accepted by liversam.acceleration's mask check); another slice, model or window gives far more.
SEED_TOLERANCE = 0.05
CT_CHECKED_ATTR = "ct_checked"
#: what ``ct_checked`` says of a cache built now: 1, the CT is not a label map; 2, and it holds Hounsfield units
CT_CHECK_LEVEL = 2
CT_CHECK_SAMPLE_SLICES = 3  # original (not augmented) slices looked at in a cache without CT_CHECKED_ATTR


def _unbatched(embedding: np.ndarray, ndim: int) -> np.ndarray:
    """``embedding`` as float32 without leading length-1 batch axes beyond ``ndim`` dimensions."""
    e = np.asarray(embedding, dtype=np.float32)
    while e.ndim > ndim and e.shape[0] == 1:
        e = e[0]
    return e


def load_seed_embeddings(folder: str | Path | None, case_id: str) -> dict[int, np.ndarray] | None:
    """``<folder>/emb_<case_id>.npz`` (keys ``ks``: slice indices, ``embs``: embeddings) as a lazy
    ``{k: embedding}`` mapping, or None when there is no such file."""
    if not folder:
        return None
    path = Path(folder) / f"emb_{case_id}.npz"
    if not path.is_file():
        return None
    data = np.load(path)
    if "ks" not in data or "embs" not in data:
        log.warning("seed embeddings %s: keys %s, expected 'ks' and 'embs'; ignored", path, list(data.keys()))
        return None
    embs = data["embs"]
    return {int(k): embs[i] for i, k in enumerate(data["ks"])}


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little")


def select_slices(
    liver_kji: np.ndarray, min_voxels: int, max_slices: int | None, end_slices: int = 0
) -> list[int]:
    """Slices with at least ``min_voxels`` liver voxels; with ``max_slices``, an evenly spaced subset; plus
    ``end_slices`` slices beyond each end (inside the volume)."""
    areas = liver_kji.reshape(liver_kji.shape[0], -1).sum(axis=1)
    ks = [int(k) for k in np.flatnonzero(areas >= max(1, min_voxels))]
    if max_slices is not None and len(ks) > max_slices:
        picks = np.unique(np.round(np.linspace(0, len(ks) - 1, max_slices)).astype(int))
        ks = [ks[i] for i in picks]
    if ks and end_slices > 0:
        ends = [ks[0] - e for e in range(1, end_slices + 1)] + [ks[-1] + e for e in range(1, end_slices + 1)]
        ks = sorted(set(ks) | {k for k in ends if 0 <= k < liver_kji.shape[0]})
    return ks


def cache_settings(config: TrainingConfig, model_identity: str) -> dict:
    """The settings that determine a study's cache content."""
    return {
        "format": CACHE_FORMAT,
        "labels": config.to_dict()["labels"],
        "window": [config.window_level, config.window_width],
        "max_slices_per_case": config.max_slices_per_case,
        "min_liver_voxels": config.min_liver_voxels,
        **({"end_slices": config.end_slices} if config.end_slices else {}),  # keeps older keys unchanged
        "augment_copies": config.augment_copies,
        "augmentation": config.to_dict()["augmentation"] if config.augment_copies else None,
        "seed": config.seed if config.augment_copies else None,
        "encoder": model_identity if config.frozen_encoder else None,
        # slices shown to the model in the display view (session 17): a cache made before, in the stored order of a
        # flipped or transposed study, is rebuilt rather than trained on in another frame than inference uses
        "slice_view": "display",
    }


def cache_key(study: TrainingStudy, settings: dict, content_hash: str | None = None) -> str:
    """SHA-256 of the study's inputs (``content_hash``: :meth:`TrainingStudy.content_hash`, computed when not
    given) and the cache settings."""
    digest = hashlib.sha256()
    digest.update((content_hash or study.content_hash()).encode())
    digest.update(study.kind.encode())
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()


def cache_file(cache_dir: Path, study: TrainingStudy, key: str) -> Path:
    safe_id = "".join(c if c.isalnum() or c in "-_." else "_" for c in study.case_id)
    return Path(cache_dir) / f"{safe_id}-{key[:16]}.h5"


def distinct_cached_image_values(handle, slices: int = CT_CHECK_SAMPLE_SLICES) -> int:
    """How many distinct values the windowed images of up to ``slices`` original cached slices (first, middle, last)
    hold together: at most ``LABEL_MASK_MAX_DISTINCT`` for a label map given as the CT, far more for a CT."""
    originals = np.flatnonzero(handle["copy"][:] == 0)
    if len(originals) == 0:
        return 0
    picks = np.linspace(0, len(originals) - 1, min(slices, len(originals))).astype(int)
    rows = sorted({int(originals[i]) for i in picks})
    return int(np.unique(np.concatenate([np.asarray(handle["image"][row]).ravel() for row in rows])).size)


def check_unchecked_cache(handle, path: Path, study: TrainingStudy) -> None:
    """A cache built before its CT was checked as now (``ct_checked`` below :data:`CT_CHECK_LEVEL`): raise
    :class:`TrainingDataError` when the study's CT is a label map or does not hold Hounsfield units. Cheap: a few cached slices are looked at; the CT is read only when they hold as few
    distinct values as a label map does."""
    from ..ct_io import LABEL_MASK_MAX_DISTINCT, read_ct

    distinct = distinct_cached_image_values(handle)
    if distinct > LABEL_MASK_MAX_DISTINCT:
        return  # a label map windowed cannot have this many values
    log.info("cache %s: built without today's CT checks and its slices hold only %d distinct values; checking the CT '%s'",
             path, distinct, study.ct_path)  # fmt: skip
    check_study_ct(
        study, read_ct(study.ct_path),
        context=f" (its training cache '{path}' was built from this CT by an earlier LiverSAM, which did not check it; "
        "delete that file, and start over any run trained on it: a new --out folder, or delete its state.pt)",
    )  # fmt: skip


def build_study_cache(
    study: TrainingStudy,
    config: TrainingConfig,
    model,
    model_identity: str,
    progress: bool = True,
    seed_embeddings: dict[int, np.ndarray] | None = None,
    content_hash: str | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """The cache file of ``study``, built now if no valid one exists. ``model`` is a
    :class:`~liversam.models.LoadedModel` (its encoder is used only with a frozen encoder).

    ``seed_embeddings`` (slice index -> embedding, e.g. from :func:`load_seed_embeddings`): embeddings of
    the original (not augmented) slices computed earlier; the first seeded slice is encoded anyway and the
    seeds are used only when they agree with it (relative L2 error <= :data:`SEED_TOLERANCE`), else the
    study is encoded as usual (logged). ``content_hash``: the study's :meth:`TrainingStudy.content_hash` when
    the caller has it already (not read again). ``on_progress(done, total)``: called with the slices cached so far
    (augmented copies included) while the cache is built, from ``(0, total)`` to ``(total, total)``; not called for a
    cache reused as it is (``liversam train --events`` reports it to the Slicer module)."""
    import h5py

    from ..progress import progress_bar as tqdm  # bar on a terminal, lines in a log, nothing with --quiet

    settings = cache_settings(config, model_identity)
    key = cache_key(study, settings, content_hash)
    path = cache_file(config.cache_path, study, key)
    if path.is_file():
        try:
            with h5py.File(path, "r") as handle:
                if handle.attrs.get("key") == key and handle.attrs.get("complete", False):
                    if int(handle.attrs.get(CT_CHECKED_ATTR, 0)) < CT_CHECK_LEVEL:
                        check_unchecked_cache(handle, path, study)
                    log.info("cache: reusing %s", path)
                    return path
        except OSError:
            log.warning("cache: %s is unreadable; rebuilding it", path)
    started = time.perf_counter()
    loaded = load_study(study, config.labels)
    volume = loaded.volume
    ks = select_slices(
        loaded.liver_kji, config.min_liver_voxels, config.max_slices_per_case, config.end_slices
    )
    if not ks:
        per_slice = loaded.liver_kji.reshape(loaded.liver_kji.shape[0], -1).sum(axis=1)
        k_most = int(np.argmax(per_slice))
        raise TrainingDataError(
            f"Study '{study.case_id}' ('{study.label_path}') has no slice with at least {config.min_liver_voxels} "
            f"liver voxels (the most on one slice: {int(per_slice[k_most])}, slice {k_most}), so it gives nothing to "
            "train on. Check that this label is the liver's (--liver-labels / --liver-names), lower "
            "--min-liver-voxels, or leave the study out."
        )
    window = WindowSettings(level=config.window_level, width=config.window_width)
    augmenter = SliceAugmenter(config.augmentation)
    nj, ni = volume.array_kji.shape[1:]
    copies = 1 + config.augment_copies
    n = len(ks) * copies
    view = display_view(volume.geometry.direction_lps)  # as the predictor shows the model a slice
    transform = SliceTransform(slice_shape=(nj, ni), input_size=model.input_size, view=view)
    config.cache_path.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as handle:
        handle.attrs["format"] = CACHE_FORMAT
        handle.attrs["case_id"] = study.case_id
        handle.attrs["key"] = key
        handle.attrs["settings"] = json.dumps(settings, sort_keys=True)
        handle.attrs["geometry"] = json.dumps(
            {
                "size_ijk": list(volume.geometry.size_ijk),
                "spacing_mm": list(volume.geometry.spacing_mm),
                "origin_lps": list(volume.geometry.origin_lps),
                "direction_lps": np.asarray(volume.geometry.direction_lps).tolist(),
            }
        )
        handle.attrs["slice_view"] = json.dumps([int(view.transpose), int(view.flip_y), int(view.flip_x)])
        handle.attrs["input_size"] = model.input_size
        handle.attrs["liversam_version"] = __version__
        handle.attrs["ct"] = str(study.ct_path)
        handle.attrs[CT_CHECKED_ATTR] = CT_CHECK_LEVEL  # load_study refused a label map and values without HU
        handle.attrs["label"] = str(study.label_path)
        handle.create_dataset("k", data=np.repeat(np.asarray(ks, dtype=np.int32), copies))
        handle.create_dataset("copy", data=np.tile(np.arange(copies, dtype=np.int16), len(ks)))
        images = handle.create_dataset("image", (n, nj, ni), dtype=np.float16, chunks=(1, nj, ni))
        livers = handle.create_dataset(
            "liver", (n, nj, ni), dtype=np.uint8, chunks=(1, nj, ni), compression="gzip"
        )
        tumors = handle.create_dataset(
            "tumor", (n, nj, ni), dtype=np.uint8, chunks=(1, nj, ni), compression="gzip"
        )
        embeddings = None
        pending: list[tuple[int, np.ndarray]] = []
        seeds = dict(seed_embeddings or {}) if config.frozen_encoder else {}
        seeds_checked = False

        def store(row: int, e: np.ndarray) -> None:
            nonlocal embeddings
            if embeddings is None:
                embeddings = handle.create_dataset(
                    "embedding", (n, *e.shape), dtype=np.float16, chunks=(1, *e.shape)
                )
            embeddings[row] = e.astype(np.float16)

        def flush() -> None:
            if not pending:
                return
            batch = torch.cat([transform.image_to_input(img, model.spec.normalization) for _, img in pending])
            emb = model.encode(batch).numpy()
            for (row, _), e in zip(pending, emb, strict=True):
                store(row, e)
            pending.clear()

        def check_seeds(k: int, img: np.ndarray) -> bool:
            encoded = model.encode(transform.image_to_input(img, model.spec.normalization)).numpy()[0]
            seed = _unbatched(seeds[k], encoded.ndim)
            error = (
                float(np.linalg.norm(seed - encoded) / max(np.linalg.norm(encoded), 1e-12))
                if seed.shape == encoded.shape
                else float("inf")
            )
            if error > SEED_TOLERANCE:
                log.warning(
                    "cache %s: the seed embeddings differ from this encoder's (slice %d: relative error %.3g, "
                    "shape %s vs %s); encoding the study instead",
                    study.case_id,
                    k,
                    error,
                    seed.shape,
                    encoded.shape,
                )
                return False
            log.info(
                "cache %s: seed embeddings match this encoder (relative error %.2g); using them",
                study.case_id,
                error,
            )
            return True

        bar = tqdm(total=n, desc=f"cache {study.case_id}", unit="slice", disable=not progress)
        reported = [-1]

        def report(done: int, total: int) -> None:  # each count once (the last slice's, then the end's, gave n twice)
            if on_progress is not None and done != reported[0]:
                reported[0] = done
                on_progress(done, total)

        report(0, n)
        row = 0
        for k in ks:
            image = window_slice(volume.array_kji[k], window)
            liver = loaded.liver_kji[k].astype(np.uint8)
            tumor = loaded.tumor_kji[k].astype(np.uint8)
            for copy in range(copies):
                if copy == 0:
                    img, masks = image, {"liver": liver, "tumor": tumor}
                else:
                    rng = np.random.default_rng([config.seed, _stable_int(study.case_id), k, copy])
                    img, masks = augmenter(image, {"liver": liver, "tumor": tumor}, rng)
                images[row] = img.astype(np.float16)
                livers[row] = masks["liver"]
                tumors[row] = masks["tumor"]
                if config.frozen_encoder and copy == 0 and k in seeds:
                    if not seeds_checked:
                        seeds_checked = True
                        if not check_seeds(k, img):
                            seeds = {}
                    if k in seeds:
                        store(row, _unbatched(seeds[k], 3))
                        row += 1
                        bar.update(1)
                        report(row, n)
                        continue
                if config.frozen_encoder:
                    pending.append((row, img))
                    if len(pending) >= ENCODE_BATCH:
                        flush()
                row += 1
                bar.update(1)
                if not pending:  # the slices counted are stored (their embeddings too)
                    report(row, n)
        flush()
        report(n, n)
        bar.close()
        handle.attrs["complete"] = True
    log.info("cache: built %s (%d samples) in %.1f s", path, n, time.perf_counter() - started)
    return path
