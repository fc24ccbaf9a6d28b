"""SAM's image-to-token attention laid out for CPUs: the same function, fewer slow kernels.

Used by the exported prompt decoder (:mod:`liversam.acceleration.decoder`). Training keeps SAM's layout: in
PyTorch this one was no faster there (docs/PERFORMANCE.md, session 13).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class ImageToTokenAttention(nn.Module):
    """SAM's image-to-token attention (4096 image queries, a few prompt-token keys) in a CPU-friendly layout.

    The same arithmetic as SAM's ``Attention`` with the few keys' heads laid out as blocks: the keys and
    values become (heads x tokens, channels) matrices that keep only their own head's channels, so the
    logits of every head come from one plain matrix product, the softmax runs across the short token axis
    of a (heads, tokens, image) tensor (vectorised over the long image axis), and the output is one more
    product. SAM's layout runs a softmax along rows of 7 and moves (8, 4096, 16) head tensors around: on a
    2-core AMX Xeon the exported bf16 graph took 19.4 ms per box prompt with it and 15.2 ms with this one
    (OpenVINO, interleaved rounds; fp32 logits within 3e-7 relative). Shares the wrapped layer's weights.
    """

    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.q_proj, self.k_proj = attention.q_proj, attention.k_proj
        self.v_proj, self.out_proj = attention.v_proj, attention.out_proj
        self.heads = int(attention.num_heads)
        channels = int(attention.internal_dim)
        per_head = channels // self.heads
        self.scale = 1.0 / math.sqrt(per_head)
        head_of = torch.arange(channels) // per_head
        # (heads, channels): 1 where the channel belongs to the head; not saved with the weights
        self.register_buffer("head_channels", (head_of[None, :] == torch.arange(self.heads)[:, None]).float(), False)

    def _head_blocks(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, C) -> (B, heads * T, C): row (h, t) is token t with only head h's channels."""
        b, t, c = x.shape
        return (x[:, None] * self.head_channels[None, :, None, :]).reshape(b, self.heads * t, c)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(q), self.k_proj(k), self.v_proj(v)
        b, tokens, _ = k.shape
        logits = (self._head_blocks(k) @ q.transpose(1, 2)) * self.scale  # (B, heads * T, N)
        n = logits.shape[-1]
        attn = torch.softmax(logits.reshape(b, self.heads, tokens, n), dim=-2).reshape(b, self.heads * tokens, n)
        return self.out_proj(attn.transpose(1, 2) @ self._head_blocks(v))  # (B, N, C)


def use_fast_image_to_token_attention(mask_decoder: nn.Module) -> nn.Module:
    """Give ``mask_decoder``'s two-way transformer :class:`ImageToTokenAttention` layers, in place (the same
    parameter objects, the same state dict); returns ``mask_decoder``. Layers already swapped are kept."""
    for layer in mask_decoder.transformer.layers:
        if not isinstance(layer.cross_attn_image_to_token, ImageToTokenAttention):
            layer.cross_attn_image_to_token = ImageToTokenAttention(layer.cross_attn_image_to_token)
    return mask_decoder
