"""The exported decoder's token-major path computes what SAM's ``MaskDecoder.predict_masks`` computes."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from liversam.models.token_major_decoder import embedding_as_tokens, predict_masks_from_tokens


@pytest.fixture(scope="module")
def network():
    from liversam.models import load_model

    return load_model("litemedsam", device="cpu").network.eval()


@pytest.mark.parametrize("with_mask", [False, True])
def test_same_masks_and_scores_as_sam_s_decoder(network, with_mask: bool) -> None:
    """LiteMedSAM's own prompt encoder (fp32) and mask decoder (in float64, so only the layout can differ): a box
    and a point, with and without a mask input."""
    torch.manual_seed(1)
    pe = network.prompt_encoder
    decoder = copy.deepcopy(network.mask_decoder).double()
    embedding = torch.randn(1, 256, 64, 64, dtype=torch.float64)
    points = (torch.tensor([[[120.0, 130.0]]]), torch.tensor([[1]]))
    box = torch.tensor([[60.0, 70.0, 190.0, 200.0]])
    mask = torch.randn(1, 1, 256, 256) * 4 if with_mask else None
    with torch.no_grad():
        sparse, dense = (t.double() for t in pe(points=points, boxes=box, masks=mask))
        image_pe = pe.get_dense_pe().double()
        expected = decoder.predict_masks(embedding, image_pe, sparse, dense)
        got = predict_masks_from_tokens(
            decoder,
            embedding.flatten(2).transpose(1, 2).contiguous(),
            image_pe.flatten(2).transpose(1, 2),
            sparse,
            dense.flatten(2).transpose(1, 2),
            tuple(pe.image_embedding_size),
        )
    for a, b in zip(expected, got, strict=True):
        assert a.shape == b.shape
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-10), float((a - b).abs().max())


def test_tokens_are_the_embedding_row_major() -> None:
    embedding = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).reshape(2, 3, 4, 5)
    tokens = embedding_as_tokens(embedding)
    assert tokens.shape == (2, 20, 3) and tokens.is_contiguous() and tokens.dtype == torch.float32
    for n, y, x, c in [(0, 0, 0, 0), (1, 3, 4, 2), (0, 2, 1, 1)]:
        assert tokens[n, y * 5 + x, c] == embedding[n, c, y, x]


def test_one_transpose_per_slice_for_all_its_prompts(monkeypatch) -> None:
    """FastPromptDecoder transposes a slice's embedding once however many prompts it decodes on it."""
    from liversam.acceleration import decoder as module

    calls = []
    real = module.embedding_as_tokens
    monkeypatch.setattr(module, "embedding_as_tokens", lambda e: calls.append(1) or real(e))
    fast = object.__new__(module.FastPromptDecoder)
    fast._last_tokens = None
    first, second = torch.randn(1, 256, 64, 64), torch.randn(1, 256, 64, 64)
    a = fast._tokens(first)
    assert fast._tokens(first) is a and len(calls) == 1
    b = fast._tokens(second)
    assert len(calls) == 2 and np.array_equal(b, real(second).numpy())
    assert np.array_equal(fast._tokens(first), a) and len(calls) == 3  # only the last slice is kept
    first.add_(1.0)  # written in place: transposed again
    assert np.array_equal(fast._tokens(first), real(first).numpy()) and len(calls) == 4
    with torch.inference_mode():
        frozen = torch.randn(1, 256, 64, 64)  # no version counter
    fast._tokens(frozen)
    fast._tokens(frozen)
    assert len(calls) == 5  # transposed once: an inference tensor cannot be written in place
