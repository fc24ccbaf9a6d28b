"""Fine-tuning options of issue 13 on synthetic data (no model weights, a stub encoder): propagation-like
prompts from neighbouring slices, seeding the training cache from earlier embeddings, decoder-only
training, final-epoch model selection."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from liversam.training import TrainingConfig, discover_studies
from liversam.training.cache import build_study_cache, load_seed_embeddings
from liversam.training.config import PromptSimulationConfig, TrainingConfigError
from liversam.training.dataset import CachedSlices
from liversam.training.prompt_simulation import lowres_to_input, overlapping, propagation_box, tight_box
from liversam.training.trainer import Trainer, set_trainable

INPUT, LOW_RES = 64, 64  # the stub model's input side and mask frame


class StubEncoder:
    """A deterministic 'encoder': 2 x 4 x 4 pooled channels of the input; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.input_size = INPUT
        self.spec = SimpleNamespace(normalization="minmax")

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        pooled = torch.nn.functional.adaptive_avg_pool2d(batch[:, :2], 4)
        return pooled + 1.0


def _write_study(folder: Path) -> Path:
    """8 slices of 64 x 64 at 0.8 x 0.8 x 5 mm: a liver square growing with k (lobe appears on slice 4),
    one lesion on slices 3..5 (moving right), a second lesion on slice 5 only."""
    nk, n = 8, 64
    ct = np.full((nk, n, n), -100, dtype=np.int16)
    label = np.zeros((nk, n, n), dtype=np.uint8)
    for k in range(1, 7):
        half = 8 + 2 * k
        label[k, 32 - half : 32 + half, 32 - half : 32 + half] = 1
        ct[k][label[k] == 1] = 60
    label[4:7, 50:60, 4:12] = 1  # a lobe that appears on slice 4
    for k, x in ((3, 20), (4, 22), (5, 24)):
        label[k, 28:34, x : x + 6] = 2
    label[5, 40:44, 40:44] = 2
    folder.mkdir(parents=True)
    for name, array in (("ct", ct), ("label", label)):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.8, 5.0))
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
    return folder


@pytest.fixture
def cached(tmp_path):
    study_dir = _write_study(tmp_path / "case")
    [study] = discover_studies(study_dir)
    config = TrainingConfig(
        data=str(study_dir), out=str(tmp_path / "run"), min_liver_voxels=1,
        prompts=PromptSimulationConfig(propagation_prob=1.0, tumor_target_prob=1.0),
    )
    encoder = StubEncoder()
    path = build_study_cache(study, config, encoder, "stub", progress=False)
    return config, study, encoder, path


def test_propagation_box_is_the_neighbours_box_plus_the_margin_within_the_jitter():
    neighbour = np.zeros((LOW_RES, LOW_RES), dtype=bool)
    neighbour[20:30, 10:40] = True
    config = PromptSimulationConfig(propagation_jitter_fraction=0.05)
    rng = np.random.default_rng(0)
    x0, y0, x1, y1 = tight_box(neighbour)
    expected = np.concatenate([lowres_to_input([x0 - 3, y0 - 2], LOW_RES, INPUT),
                               lowres_to_input([x1 + 3, y1 + 2], LOW_RES, INPUT)])
    side = np.array([expected[2] - expected[0] + 1, expected[3] - expected[1] + 1] * 2)
    boxes = np.stack([propagation_box(neighbour, (3.0, 2.0), rng, config, INPUT) for _ in range(200)])
    assert np.all(np.abs(boxes - expected) <= 0.05 * side + 1e-4)
    assert np.abs(boxes - expected).max() > 0.5 * 0.05 * side.min()  # it does jitter
    edge = np.zeros_like(neighbour)
    edge[0:5, 0:5] = True
    assert propagation_box(edge, (4.0, 4.0), rng, config, INPUT).min() >= 0  # clipped to the image


def test_overlapping_keeps_the_components_that_touch_the_reference():
    mask = np.zeros((20, 20), dtype=bool)
    mask[2:5, 2:5] = True  # touches the reference
    mask[12:15, 12:15] = True  # far away
    reference = np.zeros_like(mask)
    reference[5:7, 3:5] = True  # right below it: touches once grown by 1
    kept = overlapping(mask, reference, grow=1)
    assert kept[3, 3] and not kept[13, 13]
    assert not overlapping(mask, reference, grow=0).any()
    assert not overlapping(np.zeros_like(mask), reference).any()


def test_propagation_targets_come_from_neighbouring_cached_slices(cached):
    config, _, _, path = cached
    data = CachedSlices({"case": path}, INPUT, LOW_RES, min_target_pixels=1)
    assert data.lowres_mm["case"] == pytest.approx((0.8, 0.8, 5.0))
    trainer = Trainer(config, model=SimpleNamespace(input_size=INPUT))
    ks = [s.k for s in data.samples]
    assert ks == list(range(1, 7))
    index5 = ks.index(5)
    assert data.neighbour(index5, -1).k == 4 and data.neighbour(ks.index(6), 1) is None
    rng = np.random.default_rng(1)
    # Lesion targets (tumor_target_prob 1) on slice 5: the box comes from slice 4 or 6's lesion; slice 6
    # has none, so those draws give None (the lesion's own box is used instead).
    results = [trainer._propagation_target(data, index5, rng, INPUT) for _ in range(60)]
    lesion_results = [r for r in results if r is not None]
    assert lesion_results and len(lesion_results) < len(results)
    for target, weight, prompt in lesion_results:
        assert weight == config.tumor_loss_weight
        # the tracked lesion on slice 5 (moved right), not the other lesion of slice 5
        assert target[30, 26] and not target[41, 41]
        x0, y0, x1, y1 = prompt.box_xyxy
        # slice 4's lesion is x 22..27, y 28..33 (0.8 mm pixels): + 2 mm margin = 2.5 px, +- 5 % of 14 px
        assert 18.79 <= x0 <= 20.21 and 28.79 <= x1 <= 30.21 and 24.79 <= y0 <= 26.21 and 34.79 <= y1 <= 36.21
    # Liver targets: slice 4's box + max(4 mm, 1.4 x 5 mm) = 8.75 px; the target keeps slice 4's new lobe.
    liver_config = TrainingConfig(**{**config.__dict__, "prompts": PromptSimulationConfig(
        propagation_prob=1.0, tumor_target_prob=0.0, propagation_jitter_fraction=0.0)})
    trainer = Trainer(liver_config, model=SimpleNamespace(input_size=INPUT))
    index4 = ks.index(4)
    for _ in range(20):
        target, weight, prompt = trainer._propagation_target(data, index4, rng, INPUT)
        assert weight == 1.0 and target[55, 8]  # the lobe that appears on slice 4 is in the target
        neighbour = data.neighbour(index4, -1) if prompt.box_xyxy[0] > 5 else data.neighbour(index4, 1)
        x0, y0, x1, y1 = tight_box(neighbour.liver_lr)
        assert prompt.box_xyxy == pytest.approx(np.clip([x0 - 8.75, y0 - 8.75, x1 + 8.75, y1 + 8.75], 0, 63))
    data.close()


def test_lesion_ends_and_liver_ends_are_trained_as_empty_targets(tmp_path):
    study_dir = _write_study(tmp_path / "case")
    [study] = discover_studies(study_dir)
    config = TrainingConfig(
        data=str(study_dir), out=str(tmp_path / "run"), end_slices=1,
        prompts=PromptSimulationConfig(propagation_prob=1.0, tumor_target_prob=1.0),
    )
    path = build_study_cache(study, config, StubEncoder(), "stub", progress=False)
    data = CachedSlices({"case": path}, INPUT, LOW_RES, min_target_pixels=1, keep_ends=True)
    assert [(s.k, s.end) for s in data.samples] == [(0, True)] + [(k, False) for k in range(1, 7)] + [(7, True)]
    trainer = Trainer(config, model=SimpleNamespace(input_size=INPUT))
    rng = np.random.default_rng(2)
    ks = [s.k for s in data.samples]
    for k, liver_k in ((0, 1), (7, 6)):  # beyond the liver: box from the liver slice next to it, empty target
        target, weight, prompt = trainer._propagation_target(data, ks.index(k), rng, INPUT)
        x0, y0, x1, y1 = tight_box(data.samples[ks.index(liver_k)].liver_lr)
        assert not target.any() and weight == 1.0
        assert prompt.box_xyxy[0] < x0 and prompt.box_xyxy[2] > x1
    # slice 6: the lesions of slice 5 have ended; a lesion track arriving from slice 5 must stop
    ended = [r for r in (trainer._propagation_target(data, ks.index(6), rng, INPUT) for _ in range(40)) if r]
    assert ended and all(not target.any() and weight == config.tumor_loss_weight for target, weight, _ in ended)
    # without keep_ends (validation) the end slices are not samples
    assert [s.k for s in CachedSlices({"case": path}, INPUT, LOW_RES, min_target_pixels=1).samples] == list(range(1, 7))
    data.close()


def test_cached_embeddings_come_as_float32_in_channels_last_memory(cached):
    """The training batches' embeddings are the cached values, float32, in the channels-last memory the
    decoder's transformer reads as tokens (the training step then copies none of them)."""
    import h5py

    _, _, _, path = cached
    data = CachedSlices({"case": path}, INPUT, LOW_RES, min_target_pixels=1)
    batch = data.embeddings([2, 0])
    assert batch.dtype == torch.float32 and batch.shape[:2] == (2, 2)
    assert batch.is_contiguous(memory_format=torch.channels_last) and not batch.is_contiguous()
    assert batch.flatten(2).transpose(1, 2).is_contiguous()
    with h5py.File(path, "r") as handle:
        rows = [handle["embedding"][data.samples[i].row] for i in (2, 0)]
    np.testing.assert_array_equal(batch.numpy(), np.stack(rows).astype(np.float32))
    assert float(batch.abs().sum()) > 0


def test_seed_embeddings_are_used_only_when_they_match_the_encoder(tmp_path, cached):
    import h5py

    config, study, encoder, reference_path = cached
    with h5py.File(reference_path, "r") as handle:
        ks, reference = handle["k"][:], handle["embedding"][:].astype(np.float32)
    n = len(ks)
    assert encoder.calls >= 2  # built by encoding (batches of 4)
    seeds_dir = tmp_path / "seeds"
    seeds_dir.mkdir()
    close = reference * 1.01  # 1 % off: an accelerated encoder's difference
    np.savez(seeds_dir / "emb_case.npz", ks=ks, embs=close[:, None])  # with a batch axis, as segment writes
    seeds = load_seed_embeddings(seeds_dir, "case")
    assert sorted(seeds) == [int(k) for k in ks] and load_seed_embeddings(seeds_dir, "other") is None
    config2 = TrainingConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "cache2")})
    counting = StubEncoder()
    path = build_study_cache(study, config2, counting, "stub", progress=False, seed_embeddings=seeds)
    assert counting.calls == 1  # only the check slice
    with h5py.File(path, "r") as handle:
        stored = handle["embedding"][:].astype(np.float32)
    assert np.allclose(stored, close, rtol=2e-3)
    wrong = {int(k): np.random.default_rng(0).normal(size=reference.shape[1:]) for k in ks}
    config3 = TrainingConfig(**{**config.__dict__, "cache_dir": str(tmp_path / "cache3")})
    counting = StubEncoder()
    path = build_study_cache(study, config3, counting, "stub", progress=False, seed_embeddings=wrong)
    assert counting.calls == 1 + (n + 3) // 4  # the check, then every slice encoded
    with h5py.File(path, "r") as handle:
        assert np.allclose(handle["embedding"][:].astype(np.float32), reference, rtol=2e-3)


def test_decoder_only_training_leaves_the_prompt_encoder_frozen():
    network = torch.nn.Module()
    network.image_encoder = torch.nn.Linear(2, 2)
    network.prompt_encoder = torch.nn.Linear(2, 2)
    network.mask_decoder = torch.nn.Linear(2, 2)
    params = set_trainable(network, "none", train_prompt_encoder=False)
    assert {id(p) for p in params} == {id(p) for p in network.mask_decoder.parameters()}
    assert not any(p.requires_grad for p in network.prompt_encoder.parameters())
    params = set_trainable(network, "none")
    assert len(params) == 4


def test_command_line_options_of_the_fine_tuning_study():
    from liversam.cli import build_parser
    from liversam.commands.train import config_from_args

    args = build_parser().parse_args(
        "train --data D --out R --freeze-prompt-encoder --select last --propagation-prompts 0.7 "
        "--propagation-offset 2 --point-prob 0 --refine-prob 0 --seed-embeddings S --end-slices 1".split()
    )
    config = config_from_args(args)
    assert not config.train_prompt_encoder and config.model_selection == "last"
    assert config.prompts.propagation_prob == 0.7 and config.prompts.propagation_max_offset == 2
    assert config.prompts.point_prob == 0 and config.prompts.refine_prob == 0
    assert config.seed_embeddings_dir == "S" and config.end_slices == 1
    with pytest.raises(TrainingConfigError, match="--select"):
        TrainingConfig(data="d", out="o", model_selection="first")
    with pytest.raises(TrainingConfigError, match="propagation"):
        TrainingConfig(data="d", out="o", prompts=PromptSimulationConfig(propagation_prob=1.5))
