"""The training step's CPU speed-ups: the same functions and the same state dict, less time per step.

Each swaps or wraps a part of SAM's mask decoder in place, keeping the parameter objects (checkpoints load
unchanged), and each was measured on 2-core CPUs (docs/PERFORMANCE.md): SAM's ``LayerNorm2d`` as one fused layer
norm, the last upscaling activation with one memory layout, the transformer's image inputs in channels-last memory,
and the upscaling's transposed convolutions with a faster bias gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class ChannelLayerNorm2d(torch.nn.Module):
    """SAM's ``LayerNorm2d`` (layer norm over the channels of an N x C x H x W tensor) as one fused
    ``F.layer_norm`` call. Same parameters (``weight``, ``bias``: the state dict is unchanged) and the same
    function; SAM's version spells it as eight elementwise operations, each with its own backward pass,
    which took about a sixth of a decoder training step on the CPU (docs/PERFORMANCE.md).

    The normalisation is fused; the scale and shift are applied after it, in the input's dtype. Fused into
    ``F.layer_norm`` too, their gradients came out about 20 % off for a bf16 input (under bf16 autocast) on
    PyTorch 2.14's CPU kernels, against 0.3-0.5 % this way and with SAM's version (docs/PERFORMANCE.md, session 43)."""

    def __init__(self, source: torch.nn.Module) -> None:
        super().__init__()
        self.weight, self.bias, self.eps = source.weight, source.bias, float(source.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), None, None, self.eps)
        y = y * self.weight.to(y.dtype) + self.bias.to(y.dtype)
        return y.permute(0, 3, 1, 2)


def fuse_layer_norms(module: torch.nn.Module) -> int:
    """Replace every SAM ``LayerNorm2d`` below ``module`` with :class:`ChannelLayerNorm2d` (same parameter
    objects), in place, for training speed. Returns how many were replaced."""
    replaced = 0
    for name, child in list(module.named_children()):
        if type(child).__name__ == "LayerNorm2d" and all(
            hasattr(child, a) for a in ("weight", "bias", "eps")
        ):
            setattr(module, name, ChannelLayerNorm2d(child))
            replaced += 1
        else:
            replaced += fuse_layer_norms(child)
    return replaced


def _upscaling(network) -> torch.nn.Sequential | None:
    """The mask decoder's ``output_upscaling`` layers, None when ``network`` has none as a ``Sequential``."""
    upscaling = getattr(getattr(network, "mask_decoder", None), "output_upscaling", None)
    return upscaling if isinstance(upscaling, torch.nn.Sequential) else None


class ContiguousInputActivation(torch.nn.Module):
    """``activation(x.contiguous())``: the same function, with its input in the standard (NCHW) layout.

    In SAM's mask decoder the last upscaling GELU's input is channels-last (the transposed-convolution output of
    the transformer's token-major features) while the gradient that returns from the hypernetwork product is
    contiguous; PyTorch's CPU ``gelu_backward`` on that mix of layouts took 63 ms for a (4, 32, 256, 256) bf16
    tensor against 6 ms with one layout (docs/PERFORMANCE.md, session 13). No parameters of its own."""

    def __init__(self, activation: torch.nn.Module) -> None:
        super().__init__()
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(x.contiguous())


def match_upscaling_layouts(network) -> int:
    """Give the mask decoder's last upscaling activation a contiguous input (:class:`ContiguousInputActivation`),
    in place; 1 when replaced, 0 when the decoder has no such stateless last layer (or has it already)."""
    upscaling = _upscaling(network)
    if upscaling is None or len(upscaling) == 0:
        return 0
    last = upscaling[-1]
    if isinstance(last, ContiguousInputActivation) or last.state_dict():  # a layer with state keeps its keys
        return 0
    upscaling[len(upscaling) - 1] = ContiguousInputActivation(last)
    return 1


def _image_inputs_token_major(module: torch.nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook of SAM's ``TwoWayTransformer(image_embedding, image_pe, point_embedding)``: the image
    embedding and its positional encoding in channels-last memory, the same values (None: other arguments)."""
    if len(args) < 2 or not all(isinstance(a, torch.Tensor) and a.dim() == 4 for a in args[:2]):
        return None
    return tuple(a.contiguous(memory_format=torch.channels_last) for a in args[:2]) + tuple(args[2:])


def token_major_transformer_inputs(network) -> int:
    """Hand the mask decoder's two-way transformer its image inputs in channels-last memory, in place (a forward
    pre-hook: no new module, the state dict unchanged); 1 when added, 0 when there is no such transformer or it
    has the hook already.

    The transformer reads its N x C x H x W inputs as N x HW x C tokens (``flatten(2).permute(0, 2, 1)``). From
    the standard layout that is a strided view, and every elementwise operation on it (the positional encoding
    added before each attention to the image, the residual adds) and its backward pass walk memory with a stride
    of H x W elements; from channels-last memory the same view is contiguous. A (4, 4096, 256) add took 8.0 ms
    from the strided view and 1.1 ms from the contiguous one (fp32; bf16 6.2 / 0.5 ms) on a 2-core AVX-512 CPU,
    and the training step went from 9.4 to 11.4 slices per second (docs/PERFORMANCE.md, session 14)."""
    transformer = getattr(getattr(network, "mask_decoder", None), "transformer", None)
    if not isinstance(transformer, torch.nn.Module) or getattr(transformer, "_liversam_token_major", False):
        return 0
    if any(
        p.device.type != "cpu" for p in transformer.parameters()
    ):  # measured on CPUs only: a GPU keeps its path
        return 0
    transformer.register_forward_pre_hook(_image_inputs_token_major)
    transformer._liversam_token_major = True
    return 1


def channel_sums(t: torch.Tensor) -> torch.Tensor:
    """``t.sum((0, 2, 3))`` of an N x C x H x W tensor, in its dtype, read in the order its memory holds it.

    PyTorch's CPU sum over (0, 2, 3) took 11.6 ms for a contiguous (4, 32, 256, 256) bf16 tensor on a 2-core
    AVX-512 EPYC, against 0.2 ms summed over the rows of its (N x C, H x W) view first (docs/PERFORMANCE.md,
    session 43)."""
    n, c = t.shape[:2]
    if t.is_contiguous():
        return t.reshape(n, c, -1).sum(2).sum(0)
    if t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1, c).sum(0)
    return t.sum((0, 2, 3))


class _TransposedConvolution(torch.autograd.Function):
    """``F.conv_transpose2d`` whose backward pass computes the bias gradient with :func:`channel_sums` instead of
    inside ``aten::convolution_backward`` (the input and weight gradients still come from there)."""

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, output_padding, groups, dilation):
        ctx.save_for_backward(x, weight)
        ctx.geometry = (stride, padding, output_padding, groups, dilation)
        return F.conv_transpose2d(x, weight, bias, stride, padding, output_padding, groups, dilation)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        stride, padding, output_padding, groups, dilation = ctx.geometry
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_x = grad_weight = grad_bias = None
        if need_x or need_weight:
            grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
                grad,
                x,
                weight,
                None,
                stride,
                padding,
                dilation,
                True,
                output_padding,
                groups,
                [need_x, need_weight, False],
            )
        if need_bias:
            grad_bias = channel_sums(grad)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


def _cpu_autocast_dtype() -> torch.dtype | None:
    """The dtype CPU autocast computes ``conv_transpose2d`` in, None when it is off."""
    try:
        enabled = torch.is_autocast_enabled("cpu")
        return torch.get_autocast_dtype("cpu") if enabled else None
    except (TypeError, AttributeError):  # torch < 2.4
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None


class TransposedConv2dFastBiasGrad(torch.nn.Module):
    """A ``ConvTranspose2d`` (zero padding) that computes the same outputs and gradients, holding the *same*
    ``weight`` and ``bias`` parameters (the state dict is unchanged), with a faster bias gradient.

    In the training step's backward pass PyTorch's CPU ``convolution_backward`` of the mask decoder's two
    upscaling convolutions took 38.6 and 23.6 ms per part of four slices on a 2-core AVX-512 EPYC, most of it the
    bias gradient: without it the same call took 8.8-17 ms, and the bias gradient summed by :func:`channel_sums`
    0.2-0.4 ms (docs/PERFORMANCE.md, session 43). Under CPU autocast it casts its input, weight and bias as
    autocast would for ``conv_transpose2d``."""

    def __init__(self, source: torch.nn.ConvTranspose2d) -> None:
        super().__init__()
        self.weight, self.bias = source.weight, source.bias
        self.geometry = (
            list(source.stride),
            list(source.padding),
            list(source.output_padding),
            int(source.groups),
            list(source.dilation),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        dtype = _cpu_autocast_dtype() if x.device.type == "cpu" else None
        if dtype is not None:  # autocast's casts for conv_transpose2d (float64 stays as it is)
            x, weight, bias = (
                t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
                for t in (x, weight, bias)
            )
        with torch.autocast("cpu", enabled=False):
            return _TransposedConvolution.apply(x, weight, bias, *self.geometry)


def fast_upscaling_bias_gradients(network) -> int:
    """Swap the mask decoder's upscaling ``ConvTranspose2d`` layers (zero padding, on the CPU) for
    :class:`TransposedConv2dFastBiasGrad`, in place; returns how many were swapped (0 when done already)."""
    upscaling = _upscaling(network)
    if upscaling is None:
        return 0
    swapped = 0
    for index, layer in enumerate(upscaling):
        if (
            isinstance(layer, torch.nn.ConvTranspose2d)
            and layer.padding_mode == "zeros"
            and layer.weight.device.type == "cpu"  # measured on CPUs only: a GPU keeps its path
        ):
            upscaling[index] = TransposedConv2dFastBiasGrad(layer)
            swapped += 1
    return swapped


def speed_up_decoder_training(network) -> None:
    """The training step's CPU speed-ups, in place and without changing the function or the state dict:
    :func:`fuse_layer_norms`, :func:`match_upscaling_layouts`, :func:`token_major_transformer_inputs` and
    :func:`fast_upscaling_bias_gradients`."""
    fuse_layer_norms(network)
    match_upscaling_layouts(network)
    token_major_transformer_inputs(network)
    fast_upscaling_bias_gradients(network)
