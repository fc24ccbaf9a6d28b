"""Segmentation losses on mask logits in the decoder's low-resolution frame."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dice_bce_per_sample(logits: torch.Tensor, targets: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss + binary cross-entropy, one value per sample. ``logits``/``targets``: (B, 1, L, L)."""
    logits = logits.float()
    targets = targets.float()
    probs = torch.sigmoid(logits)
    dims = (1, 2, 3)
    intersection = (probs * targets).sum(dims)
    dice = 1.0 - (2.0 * intersection + smooth) / (probs.sum(dims) + targets.sum(dims) + smooth)
    bce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none").mean(dims)
    return dice + bce


def mask_iou(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with the targets, per sample (1 when both are empty)."""
    pred = logits.detach() > 0
    tgt = targets > 0.5
    inter = (pred & tgt).sum((1, 2, 3)).float()
    union = (pred | tgt).sum((1, 2, 3)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


def segmentation_loss(
    logits: torch.Tensor,
    iou_pred: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor,
    iou_loss_weight: float = 0.1,
    batch: tuple[float, int] | None = None,
) -> torch.Tensor:
    """Weighted mean of Dice+BCE per sample (``weights``: e.g. higher for tumour targets) plus the MSE of
    the predicted IoU against the actual IoU (keeps the model's quality score meaningful).

    ``batch`` = (sum of the whole batch's weights, its sample count) when these samples are one part of a
    batch: the parts' losses then add up to the whole batch's loss (gradient accumulation)."""
    per_sample = dice_bce_per_sample(logits, targets)
    weights = weights.to(per_sample)
    weight_total, count = (weights.sum(), per_sample.numel()) if batch is None else batch
    loss = (per_sample * weights).sum() / weight_total
    if iou_loss_weight > 0:
        squared = (iou_pred.float().reshape(-1) - mask_iou(logits, targets)) ** 2
        loss = loss + iou_loss_weight * squared.sum() / count
    return loss
