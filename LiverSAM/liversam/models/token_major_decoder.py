"""SAM's mask decoder fed with token-major image inputs, for the exported prompt-decoder graph.

SAM's ``MaskDecoder.predict_masks`` takes the image embedding as N x C x H x W and adds the dense prompt embedding
in that layout; its ``TwoWayTransformer.forward`` then reads both the embedding and the positional encoding as
N x HW x C tokens (``flatten(2).permute(0, 2, 1)``). Exported to ONNX, those become transposes of a 256 x 4096
tensor on every prompt, which OpenVINO's CPU plugin ran with its reference (unvectorised) transpose: about 3.1 ms
of a 24 ms bf16 prompt on a 2-core AVX-512 EPYC (two nodes, one of them split out of the first value projection),
and moving the transpose before the dense-prompt add did not let OpenVINO fold it away (docs/PERFORMANCE.md,
session 14). :func:`predict_masks_from_tokens` is the same computation with the image and the dense prompt given
as tokens: the caller transposes the embedding once (per slice, not per prompt), and the graph has no such
transpose left. It uses the decoder's own submodules (no parameters of its own), so the state dict is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


def predict_masks_from_tokens(
    mask_decoder: nn.Module,
    image_tokens: torch.Tensor,  # (B, HW, C) the image embedding as tokens (row-major over H, W)
    image_pe_tokens: torch.Tensor,  # (1 or B, HW, C) the dense positional encoding as tokens
    sparse_prompt_embeddings: torch.Tensor,  # (B, N, C)
    dense_prompt_tokens: torch.Tensor,  # (1 or B, HW, C) the dense prompt embedding as tokens
    grid_hw: tuple[int, int],  # (H, W) of the embedding
) -> tuple[torch.Tensor, torch.Tensor]:
    """(all masks (B, M, 4H, 4W), IoU predictions (B, M)) as ``mask_decoder.predict_masks`` returns them for the
    same inputs in SAM's N x C x H x W layout (one embedding per prompt)."""
    d = mask_decoder
    transformer = d.transformer
    output_tokens = torch.cat([d.iou_token.weight, d.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(sparse_prompt_embeddings.size(0), -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    # TwoWayTransformer.forward, with its image inputs already token-major
    queries, keys = tokens, image_tokens + dense_prompt_tokens
    for layer in transformer.layers:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=image_pe_tokens)
    attn_out = transformer.final_attn_token_to_image(q=queries + tokens, k=keys + image_pe_tokens, v=keys)
    queries = transformer.norm_final_attn(queries + attn_out)
    # The rest of MaskDecoder.predict_masks
    iou_token_out = queries[:, 0, :]
    mask_tokens_out = queries[:, 1 : (1 + d.num_mask_tokens), :]
    b, _, c = keys.shape
    src = keys.transpose(1, 2).reshape(b, c, grid_hw[0], grid_hw[1])
    upscaled = d.output_upscaling(src)
    hyper_in = torch.stack(
        [d.output_hypernetworks_mlps[i](mask_tokens_out[:, i, :]) for i in range(d.num_mask_tokens)], dim=1
    )
    b, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.reshape(b, c, h * w)).reshape(b, -1, h, w)
    return masks, d.iou_prediction_head(iou_token_out)


def as_tokens(t: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, HW, C), row-major over H, W: a view (contiguous when ``t`` is in channels-last memory)."""
    return t.flatten(2).transpose(1, 2)


def embedding_as_tokens(embedding: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> contiguous (N, HW, C) float32 tokens, the layout :func:`predict_masks_from_tokens` reads."""
    return as_tokens(embedding.detach().to("cpu", torch.float32)).contiguous()
