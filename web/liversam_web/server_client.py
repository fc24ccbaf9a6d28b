"""LiverSAM's stdlib + numpy client (``LiverSAM/LiverSAMLib/ServerClient.py``), imported from this checkout."""

from __future__ import annotations

import sys
from pathlib import Path

_LIVERSAM_DIR = Path(__file__).resolve().parents[2] / "LiverSAM"
if str(_LIVERSAM_DIR) not in sys.path:
    sys.path.insert(0, str(_LIVERSAM_DIR))

from LiverSAMLib.ServerClient import (  # noqa: E402
    AuthError,
    LiverSAMClient,
    LiverSAMClientError,
    LocalServerProcess,
    ServerError,
    ServerRequestError,
    ServerUnavailable,
    box_ijk,
    segment_spec,
)

REPO_ROOT = _LIVERSAM_DIR.parent

__all__ = [
    "REPO_ROOT",
    "AuthError",
    "LiverSAMClient",
    "LiverSAMClientError",
    "LocalServerProcess",
    "ServerError",
    "ServerRequestError",
    "ServerUnavailable",
    "box_ijk",
    "segment_spec",
]
