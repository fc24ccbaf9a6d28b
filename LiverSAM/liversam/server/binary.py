"""Arrays on the wire: masks as packed bits, CT voxels and labelmaps as raw little-endian values.

A mask is ``numpy.packbits`` of the C-ordered boolean array (bit order big), ``ceil(n / 8)`` bytes; its
shape travels in the ``X-LiverSAM-Shape`` header (``"nj,ni"`` or ``"nk,nj,ni"``).
"""

from __future__ import annotations

import numpy as np
from fastapi import Response

OCTET = "application/octet-stream"
VOXEL_DTYPES = {"int16": np.dtype("<i2"), "float32": np.dtype("<f4")}
MASK_ENCODINGS = ("packbits", "uint8")


def pack_mask(mask: np.ndarray) -> bytes:
    return np.packbits(np.ascontiguousarray(mask, dtype=bool).ravel()).tobytes()


def mask_nbytes(shape: tuple[int, ...], encoding: str) -> int:
    count = int(np.prod(shape))
    return (count + 7) // 8 if encoding == "packbits" else count


def unpack_mask(data: bytes, shape: tuple[int, ...], encoding: str) -> np.ndarray:
    """Bytes -> bool array; the caller has checked the length with :func:`mask_nbytes`."""
    raw = np.frombuffer(data, dtype=np.uint8)
    if encoding == "packbits":
        return np.unpackbits(raw, count=int(np.prod(shape))).astype(bool).reshape(shape)
    return (raw != 0).reshape(shape)


def mask_response(mask: np.ndarray, headers: dict[str, str] | None = None) -> Response:
    return Response(
        content=pack_mask(mask),
        media_type=OCTET,
        headers={"X-LiverSAM-Shape": ",".join(str(s) for s in mask.shape), "X-LiverSAM-Encoding": "packbits",
                 **(headers or {})},
    )


def array_response(array: np.ndarray) -> Response:
    little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
    return Response(
        content=little.tobytes(),
        media_type=OCTET,
        headers={"X-LiverSAM-Shape": ",".join(str(s) for s in array.shape), "X-LiverSAM-Dtype": array.dtype.name},
    )


def binary_body(description: str) -> dict:
    """``openapi_extra`` of an endpoint whose body is raw bytes."""
    return {"requestBody": {"required": True, "description": description,
                            "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}}}


def binary_answer(description: str) -> dict:
    """``responses`` entry of an endpoint that answers raw bytes."""
    return {200: {"description": description, "content": {OCTET: {"schema": {"type": "string", "format": "binary"}}}}}
