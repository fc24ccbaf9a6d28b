"""A loaded SAM-family model: the encoder/decoder calls LiverSAM needs, on one device."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .registry import ModelSpec


@dataclass
class LoadedModel:
    """A ready-to-run model. ``network`` has ``image_encoder``, ``prompt_encoder``, ``mask_decoder``.

    ``encoder_override`` lets a faster implementation of the same image encoder (ONNX Runtime, a compiled
    graph, ...) replace the PyTorch one without touching the rest; it takes and returns the same tensors.
    """

    spec: ModelSpec
    network: nn.Module
    device: torch.device
    source: str
    metadata: dict = field(default_factory=dict)
    encoder_override: Callable[[torch.Tensor], torch.Tensor] | None = None
    # Same signature and result as ``decode`` (e.g. liversam.acceleration's exported prompt decoder).
    decoder_override: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", self.spec.name))

    @property
    def input_size(self) -> int:
        return self.spec.input_size

    @property
    def low_res_mask_size(self) -> int:
        """Side of the decoder's mask logits (4x the embedding grid: 256 for every SAM variant)."""
        return int(self.network.prompt_encoder.mask_input_size[0])

    @torch.inference_mode()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Image embeddings (N, 256, 64, 64) for preprocessed inputs (N, 3, S, S); returned on the CPU."""
        if self.encoder_override is not None:
            return self.encoder_override(images).float().cpu()
        return self.network.image_encoder(images.to(self.device)).float().cpu()

    @torch.inference_mode()
    def decode(
        self,
        embedding: torch.Tensor,
        points_xy: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box_xyxy: np.ndarray | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run prompt encoder + mask decoder on one cached embedding (1, 256, 64, 64).

        Coordinates are in model-input pixels. ``point_labels``: 1 positive, 0 negative.
        ``mask_logits``: (1, 1, L, L) dense prompt. Returns (low-res logits (M, 1, L, L), scores (M,)),
        M = 3 when ``multimask`` else 1.
        """
        if self.decoder_override is not None:
            return self.decoder_override(embedding, points_xy, point_labels, box_xyxy, mask_logits, multimask)
        dev = self.device
        points = None
        if points_xy is not None and len(points_xy):
            coords = torch.as_tensor(np.asarray(points_xy, dtype=np.float32), device=dev)[None]
            labels = torch.as_tensor(np.asarray(point_labels, dtype=np.int64), device=dev)[None]
            points = (coords, labels)
        boxes = None
        if box_xyxy is not None:
            boxes = torch.as_tensor(np.asarray(box_xyxy, dtype=np.float32), device=dev).reshape(1, 4)
        masks = mask_logits.to(dev) if mask_logits is not None else None
        sparse, dense = self.network.prompt_encoder(points=points, boxes=boxes, masks=masks)
        low_res, iou = self.network.mask_decoder(
            image_embeddings=embedding.to(dev),
            image_pe=self.network.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask,
        )
        return low_res[0][:, None].float().cpu(), iou[0].float().cpu()
