"""TinyViT's token <-> image changes written as channels-last views, for the exported encoder graph.

TinyViT (LiteMedSAM's and MobileSAM's image encoder) keeps its stages 1-3 as N x HW x C tokens. Around each
block's depthwise "local" convolution it goes to N x C x H x W and back with ``x.transpose(1, 2).reshape(...)``
and ``x.view(B, C, L).transpose(1, 2)``, and its patch merging ends with ``x.flatten(2).transpose(1, 2)``.
Exported to ONNX these are 3-D transposes of 4096-16384 x C tensors, which OpenVINO's CPU plugin ran with its
reference (unvectorised) transpose: 19 ms of the encoder's 245 ms bf16 part on a 2-core AVX-512 EPYC
(docs/PERFORMANCE.md, session 15). The same data movement written as ``view(B, H, W, C).permute(0, 3, 1, 2)``
(and back with ``permute(0, 2, 3, 1)``) is the channels-last layout OpenVINO already uses for the convolution,
so the plugin needs no transpose at all.

:func:`use_token_major_layout` gives the blocks of one (copied) encoder these forwards. The function is
unchanged (same values in fp32, bit for bit; same bf16 values in OpenVINO), and so is the state dict: only the
order in which the graph states the reshapes changes.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

#: Class names of TinyViT's modules whose forwards are replaced, and the attributes those forwards read.
_BLOCK_ATTRIBUTES = ("input_resolution", "window_size", "attn", "local_conv", "mlp", "drop_path")
_MERGING_ATTRIBUTES = ("input_resolution", "conv1", "conv2", "conv3", "act")


def _block_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``TinyViTBlock.forward`` with the local convolution's layout changes as channels-last views."""
    height, width = self.input_resolution
    batch, length, channels = x.shape
    if length != height * width:
        raise ValueError(f"TinyViT block expects {height} x {width} tokens, got {length}")
    residual = x
    size = self.window_size
    if height == size and width == size:
        x = self.attn(x)
    else:
        x = x.view(batch, height, width, channels)
        pad_b, pad_r = (size - height % size) % size, (size - width % size) % size
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        padded_h, padded_w = height + pad_b, width + pad_r
        rows, cols = padded_h // size, padded_w // size
        windows = x.view(batch, rows, size, cols, size, channels).transpose(2, 3)
        x = self.attn(windows.reshape(batch * rows * cols, size * size, channels))
        x = (
            x.view(batch, rows, cols, size, size, channels)
            .transpose(2, 3)
            .reshape(batch, padded_h, padded_w, channels)
        )
        if pad_b or pad_r:
            x = x[:, :height, :width].contiguous()
        x = x.view(batch, length, channels)
    x = residual + self.drop_path(x)
    image = self.local_conv(x.view(batch, height, width, channels).permute(0, 3, 1, 2))
    x = image.permute(0, 2, 3, 1).reshape(batch, length, channels)
    return x + self.drop_path(self.mlp(x))


def _merging_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``PatchMerging.forward`` ending with a channels-last view instead of ``flatten(2).transpose(1, 2)``."""
    if x.ndim == 3:
        height, width = self.input_resolution
        x = x.view(len(x), height, width, -1).permute(0, 3, 1, 2)
    x = self.act(self.conv1(x))
    x = self.act(self.conv2(x))
    x = self.conv3(x)
    batch, channels, height, width = x.shape
    return x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)


def use_token_major_layout(encoder: nn.Module) -> int:
    """Give ``encoder``'s TinyViT blocks and patch mergings the channels-last forwards above, in place (pass a
    copy: the model's own encoder should keep its classes' forwards). Returns how many modules changed; 0 for
    an encoder that is not a TinyViT (left as it is)."""
    changed = 0
    for module in encoder.modules():
        name = type(module).__name__
        if name == "TinyViTBlock" and all(hasattr(module, a) for a in _BLOCK_ATTRIBUTES):
            module.forward = types.MethodType(_block_forward, module)
            changed += 1
        elif name == "PatchMerging" and all(hasattr(module, a) for a in _MERGING_ATTRIBUTES):
            module.forward = types.MethodType(_merging_forward, module)
            changed += 1
    return changed
