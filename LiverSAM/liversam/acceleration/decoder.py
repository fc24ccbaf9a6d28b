"""The prompt encoder + mask decoder as one exported graph (OpenVINO / ONNX Runtime), for fast prompts.

SAM's own ONNX recipe: every sparse prompt is a labelled point (label 0 negative, 1 positive, 2 / 3 the
box's top-left / bottom-right corners, -1 the padding point SAM adds when there is no box), and the dense
prompt is a mask input with a 0/1 flag. The graph returns all four masks and IoU scores; the caller picks
the single-mask (index 0) or the three multimask outputs, exactly as ``MaskDecoder.forward`` does.

``FastPromptDecoder`` has the signature of :meth:`liversam.models.LoadedModel.decode` so it can serve as
that model's ``decoder_override``.
"""

from __future__ import annotations

import copy
import logging
import threading
import warnings
import weakref
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..atomic_write import atomic_path
from ..models.attention_layout import use_fast_image_to_token_attention
from ..models.token_major_decoder import as_tokens, embedding_as_tokens, predict_masks_from_tokens
from .backends import BackendUnavailable, ExportEntry, openvino_core, relative_error

log = logging.getLogger(__name__)


class PromptDecoderGraph(nn.Module):
    """Exportable prompt encoder + mask decoder: (image tokens, points, labels, mask, has_mask) -> all masks.

    The image embedding comes in as (1, HW, C) tokens (:func:`~liversam.models.token_major_decoder.embedding_as_tokens`):
    the graph then holds no transpose of it (see :mod:`liversam.models.token_major_decoder`)."""

    def __init__(self, prompt_encoder: nn.Module, mask_decoder: nn.Module) -> None:
        super().__init__()
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    def forward(
        self,
        image_tokens: torch.Tensor,  # (1, 4096, 256): the (1, 256, 64, 64) embedding as tokens
        point_coords: torch.Tensor,  # (1, N, 2) model-input pixels (x, y); box corners included
        point_labels: torch.Tensor,  # (1, N) float: -1 padding, 0 negative, 1 positive, 2/3 box corners
        mask_input: torch.Tensor,  # (1, 1, L, L) low-res logits (zeros when unused)
        has_mask_input: torch.Tensor,  # (1,) 1.0 to use mask_input, 0.0 to ignore it
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pe = self.prompt_encoder
        coords = point_coords + 0.5  # pixel centres, as PromptEncoder does (padding point is masked out)
        sparse = pe.pe_layer.forward_with_coords(coords, pe.input_image_size)
        labels = point_labels.unsqueeze(-1)
        sparse = sparse * (labels != -1).to(sparse.dtype)
        sparse = sparse + pe.not_a_point_embed.weight * (labels == -1).to(sparse.dtype)
        for index, embedding in enumerate(pe.point_embeddings):
            sparse = sparse + embedding.weight * (labels == index).to(sparse.dtype)
        flag = has_mask_input.reshape(1, 1, 1, 1)
        dense = flag * pe.mask_downscaling(mask_input) + (1.0 - flag) * pe.no_mask_embed.weight.reshape(
            1, -1, 1, 1
        )
        return predict_masks_from_tokens(
            self.mask_decoder,
            image_tokens,
            as_tokens(pe.get_dense_pe()),  # a constant subgraph: the runtimes fold it when compiling
            sparse,
            as_tokens(dense),
            tuple(pe.image_embedding_size),
        )


#: Part of the mask-agreement verdict's key and of the exported file's name: a changed decoder graph is
#: exported and checked again. Version 2: the image-to-token attention in the layout of
#: :class:`~liversam.models.attention_layout.ImageToTokenAttention`. (A second graph for prompts without a
#: mask input saved 2 of 21 ms per prompt on an AMD EPYC but moved the bf16 masks enough to refuse
#: ``bf16-rest``, min Dice 0.9821 -> 0.9791; on an AMX Xeon it saved nothing: not kept.) Version 3: the image
#: embedding comes in as tokens (:mod:`liversam.models.token_major_decoder`).
DECODER_GRAPH_VERSION = 3

#: A box prompt's point count (its two corners): the size propagation asks on every slice.
BOX_POINTS = 2


def prompt_arrays(
    points_xy: np.ndarray | None,
    point_labels: np.ndarray | None,
    box_xyxy: np.ndarray | None,
) -> tuple[np.ndarray, np.ndarray]:
    """The graph's (1, N, 2) coordinates and (1, N) labels for LoadedModel.decode-style prompts."""
    coords = np.zeros((0, 2), np.float32)
    labels = np.zeros((0,), np.float32)
    if points_xy is not None and len(points_xy):
        coords = np.asarray(points_xy, np.float32).reshape(-1, 2)
        labels = np.asarray(point_labels, np.float32).reshape(-1)
    if box_xyxy is not None:
        corners = np.asarray(box_xyxy, np.float32).reshape(2, 2)
        coords = np.concatenate([coords, corners])
        labels = np.concatenate([labels, np.array([2.0, 3.0], np.float32)])
    elif len(coords):  # SAM pads point-only prompts with one "not a point"
        coords = np.concatenate([coords, np.zeros((1, 2), np.float32)])
        labels = np.concatenate([labels, np.array([-1.0], np.float32)])
    return coords[None], labels[None]


def export_decoder_onnx(network: nn.Module, path: Path) -> None:
    """Export ``network.prompt_encoder`` + ``network.mask_decoder`` to one ONNX file (N points dynamic)."""
    graph = PromptDecoderGraph(
        copy.deepcopy(network.prompt_encoder).cpu().eval(),
        use_fast_image_to_token_attention(copy.deepcopy(network.mask_decoder)).cpu().eval(),
    )
    side = int(network.prompt_encoder.mask_input_size[0])
    grid = network.prompt_encoder.image_embedding_size
    example = (
        torch.zeros(1, grid[0] * grid[1], graph.mask_decoder.transformer_dim),
        torch.tensor([[[10.0, 10.0], [100.0, 120.0]]]),
        torch.tensor([[2.0, 3.0]]),
        torch.zeros(1, 1, side, side),
        torch.zeros(1),
    )
    try:
        with warnings.catch_warnings(), torch.no_grad(), atomic_path(path) as tmp:
            warnings.simplefilter("ignore")
            torch.onnx.export(
                graph,
                example,
                str(tmp),
                dynamo=False,
                opset_version=17,
                input_names=[
                    "image_tokens",
                    "point_coords",
                    "point_labels",
                    "mask_input",
                    "has_mask_input",
                ],
                output_names=["masks", "iou_predictions"],
                dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            )
    except Exception as exc:
        raise BackendUnavailable(f"decoder ONNX export failed ({type(exc).__name__}: {exc})") from exc


class FastPromptDecoder:
    """Drop-in for ``LoadedModel.decode`` running the exported prompt decoder on OpenVINO or ONNX Runtime.

    Prompts with neither points nor a box (nothing for the graph to attend to) go to ``fallback``.
    """

    def __init__(self, onnx_path: Path, backend: str, threads: int, fallback, precision: str = "fp32") -> None:
        self.name = backend
        self.precision = precision if backend == "openvino" else "fp32"
        self.fallback = fallback
        self._lock = threading.Lock()
        self._last_tokens: tuple[weakref.ref, int | None, np.ndarray] | None = None
        self.compiled_graphs: dict[int | None, object] = {}  # OpenVINO's, by point count (None: any)
        if backend == "openvino":
            try:
                import openvino as ov
            except ImportError as exc:
                raise BackendUnavailable("the 'openvino' package is not installed") from exc
            config = {
                "INFERENCE_NUM_THREADS": int(threads),
                "PERFORMANCE_HINT": "LATENCY",
                "NUM_STREAMS": 1,
                "INFERENCE_PRECISION_HINT": "bf16" if self.precision == "bf16" else "f32",
            }
            core = openvino_core()
            requests: dict[int | None, object] = {}
            try:  # read once: the other prompt sizes compile from memory, whatever happens to the file meanwhile
                base_graph = core.read_model(str(onnx_path))
            except Exception as exc:
                raise BackendUnavailable(f"OpenVINO could not read '{onnx_path}': {exc}") from exc

            def request_for(num_points: int):
                """The box prompt (2 points, what propagation asks) on a graph with static shapes; every other
                prompt size on one graph with a dynamic point count, compiled the first time one is asked. A
                graph per size cost 0.28 s and about 50 MiB for every new number of clicks (docs/PERFORMANCE.md,
                session 23); the dynamic graph runs as fast."""
                key = num_points if num_points == BOX_POINTS else None
                if key not in requests:
                    try:
                        graph = base_graph.clone()
                        points = num_points if key is not None else -1
                        graph.reshape({"point_coords": ov.PartialShape([1, points, 2]),
                                       "point_labels": ov.PartialShape([1, points])})
                        requests[key] = core.compile_model(graph, "CPU", config).create_infer_request()
                    except Exception as exc:
                        raise BackendUnavailable(f"OpenVINO could not compile '{onnx_path}': {exc}") from exc
                return requests[key]

            request_for(BOX_POINTS)  # the box prompt, compiled now so a broken runtime is refused at load time
            self.compiled_graphs = requests  # the same dict request_for fills: release_click_graph drops from it

            def run(feeds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
                request = request_for(int(feeds[1].shape[1]))
                request.infer(feeds)
                return request.get_output_tensor(0).data.copy(), request.get_output_tensor(1).data.copy()

        elif backend == "onnxruntime":
            try:
                import onnxruntime as ort
            except ImportError as exc:
                raise BackendUnavailable("the 'onnxruntime' package is not installed") from exc
            options = ort.SessionOptions()
            options.intra_op_num_threads = int(threads)
            options.inter_op_num_threads = 1
            try:
                session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            except Exception as exc:
                raise BackendUnavailable(f"ONNX Runtime could not load '{onnx_path}': {exc}") from exc
            names = [i.name for i in session.get_inputs()]

            def run(feeds: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
                masks, iou = session.run(None, dict(zip(names, feeds, strict=True)))
                return masks, iou

        else:
            raise BackendUnavailable(f"no fast decoder for backend '{backend}'")
        self._run = run

    def release_click_graph(self) -> None:
        """Drop the graph for clicks (compiled by :func:`check_decoder`'s click prompts); the next click compiles it
        again (0.28 s once). A run with box prompts alone, what ``liversam segment`` and propagation ask, then does not
        hold it: 48 MiB on the 595-slice CT's peak (docs/PERFORMANCE.md, session 26)."""
        with self._lock:
            self.compiled_graphs.pop(None, None)

    def __call__(
        self,
        embedding: torch.Tensor,
        points_xy: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box_xyxy: np.ndarray | None = None,
        mask_logits: torch.Tensor | None = None,
        multimask: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as ``LoadedModel.decode``: (low-res logits (M, 1, L, L), scores (M,)), M = 3 or 1."""
        coords, labels = prompt_arrays(points_xy, point_labels, box_xyxy)
        if coords.shape[1] == 0:
            return self.fallback(embedding, points_xy, point_labels, box_xyxy, mask_logits, multimask)
        side = None
        if mask_logits is not None:
            mask = mask_logits.detach().to("cpu", torch.float32).numpy()
            has_mask = np.ones(1, np.float32)
        else:
            side = self._mask_side(embedding)
            mask = np.zeros((1, 1, side, side), np.float32)
            has_mask = np.zeros(1, np.float32)
        feeds = [
            self._tokens(embedding),
            coords,
            labels,
            np.ascontiguousarray(mask),
            has_mask,
        ]
        with self._lock:
            masks, iou = self._run(feeds)
        chosen = slice(1, None) if multimask else slice(0, 1)
        return torch.from_numpy(masks[0, chosen][:, None].copy()), torch.from_numpy(iou[0, chosen].copy())

    def _tokens(self, embedding: torch.Tensor) -> np.ndarray:
        """The graph's (1, HW, C) image input; a slice's embedding is transposed once for all its prompts (a
        propagated organ slice asks twice: the box and the wider box). The last one is remembered by a weak
        reference (a freed embedding can never match) and its version counter (nor can one written in place)."""
        last = self._last_tokens
        if last is not None and last[0]() is embedding and last[1] == _version(embedding):
            return last[2]
        tokens = embedding_as_tokens(embedding).numpy()
        self._last_tokens = (weakref.ref(embedding), _version(embedding), tokens)
        return tokens

    @staticmethod
    def _mask_side(embedding: torch.Tensor) -> int:
        return int(embedding.shape[-1]) * 4


def _version(tensor: torch.Tensor) -> int | None:
    """The tensor's in-place write counter (None for inference-mode tensors, which cannot be written in place)."""
    try:
        return int(tensor._version)
    except (AttributeError, RuntimeError):
        return None


def decoder_test_prompts(input_size: int) -> list[dict]:
    """Fixed prompts covering every path: box, box + points, points only, box + dense mask, multimask."""
    s = float(input_size)
    box = np.array([0.3 * s, 0.35 * s, 0.65 * s, 0.7 * s], np.float32)
    pts = np.array([[0.45 * s, 0.5 * s], [0.2 * s, 0.2 * s]], np.float32)
    lab = np.array([1, 0])
    side = 256
    yy, xx = np.mgrid[0:side, 0:side]
    blob = torch.from_numpy(np.where((xx - 120) ** 2 + (yy - 130) ** 2 < 40**2, 8.0, -8.0).astype(np.float32))
    return [
        {"box_xyxy": box},
        {"points_xy": pts, "point_labels": lab, "box_xyxy": box},
        {"points_xy": pts[:1], "point_labels": lab[:1], "multimask": True},
        {"box_xyxy": box, "mask_logits": blob[None, None]},
    ]


def check_decoder(fast: FastPromptDecoder, model, entry: ExportEntry, tolerance: float = 1e-3) -> float:
    """Largest relative L2 error of the fast decoder's logits against ``model``'s PyTorch decoder.

    ``tolerance``: 1e-3 for fp32; for bf16 a loose sanity bound (the mask agreement check decides)."""
    embedding = entry.reference_embedding()
    worst = 0.0
    for prompt in decoder_test_prompts(model.input_size):
        reference_logits, reference_iou = model.decode(embedding, **prompt)
        logits, iou = fast(embedding, **prompt)
        if logits.shape != reference_logits.shape:
            raise BackendUnavailable(
                f"fast decoder returned {tuple(logits.shape)}, expected {tuple(reference_logits.shape)}"
            )
        worst = max(worst, relative_error(logits, reference_logits), relative_error(iou, reference_iou))
    if not np.isfinite(worst) or worst > tolerance:
        raise BackendUnavailable(
            f"fast decoder differs from PyTorch by {worst:.2e} (relative L2, limit {tolerance:.0e})"
        )
    return worst
