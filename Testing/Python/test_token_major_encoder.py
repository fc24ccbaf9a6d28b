"""The exported encoder's channels-last TinyViT blocks compute what TinyViT computes, with no token transposes."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from liversam.acceleration.backends import EXPORT_FORMAT, STEM_SPLITS, prepare_export, reference_image
from liversam.models.token_major_encoder import use_token_major_layout


@pytest.fixture(scope="module")
def encoder():
    from liversam.models import load_model

    return load_model("litemedsam", device="cpu").network.image_encoder.eval()


def test_same_embedding_and_state_dict_as_tinyvit(encoder) -> None:
    """LiteMedSAM's TinyViT (fp32) on the synthetic reference image and on a random one: the same embedding; the
    model's own encoder keeps its classes' forwards."""
    changed = copy.deepcopy(encoder)
    count = use_token_major_layout(changed)
    blocks = sum(type(m).__name__ in ("TinyViTBlock", "PatchMerging") for m in encoder.modules())
    assert count == blocks > 0
    assert all("forward" not in vars(m) for m in encoder.modules())
    torch.manual_seed(0)
    for image in (reference_image(256), torch.rand(1, 3, 256, 256) * 2 - 1):
        with torch.inference_mode():
            want, got = encoder(image), changed(image)
        assert want.shape == got.shape == (1, 256, 64, 64)
        assert float((want - got).abs().max()) <= 1e-6 * float(want.abs().max())
    assert all(
        torch.equal(a, b)
        for a, b in zip(encoder.state_dict().values(), changed.state_dict().values(), strict=True)
    )


def test_an_encoder_that_is_not_a_tinyvit_is_left_alone() -> None:
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.GELU())
    assert use_token_major_layout(module) == 0
    assert all("forward" not in vars(m) for m in module.modules())


def test_the_export_has_no_token_transposes_and_replaces_an_old_entry(encoder, tmp_path) -> None:
    """An entry of the previous format is exported again; the files cut or quantised from its graph go with it;
    the new graph turns no (N, C, HW) tensor into tokens by a transpose (the layout OpenVINO ran slowly)."""
    import onnx

    from liversam.acceleration.backends import encoder_weights_sha256

    folder = tmp_path / f"{encoder_weights_sha256(encoder)}-256px"
    folder.mkdir()
    # every split's parts (bf16-mid's fp32 neck too), named here so that a part left out of the clean-up is seen
    derived = ("encoder_stem.onnx", "encoder_rest.onnx", "encoder_stem_block0.onnx", "encoder_rest_block1.onnx",
               "encoder_mid.onnx", "encoder_neck.onnx", "encoder_int8-x.xml")
    assert {name for split in STEM_SPLITS.values() for name in split.files} <= set(derived)
    for name in ("encoder.onnx", "reference.npy", *derived):
        (folder / name).write_bytes(b"old")
    (folder / "export.json").write_text(json.dumps({"format": "liversam-encoder-export/1"}))

    entry = prepare_export(encoder, 256, tmp_path)

    assert json.loads((folder / "export.json").read_text())["format"] == EXPORT_FORMAT
    assert not [name for name in derived if (folder / name).exists()]
    graph = onnx.load(str(entry.onnx_path)).graph
    perms = [
        list(attribute.ints)
        for node in graph.node
        if node.op_type == "Transpose"
        for attribute in node.attribute
        if attribute.name == "perm"
    ]
    assert [0, 2, 1] not in perms, "a token transpose is left in the exported encoder"
    assert len(perms) > 0  # the window partitions and attention heads keep theirs
