"""HTTP client of ``liversam serve``: the standard library plus numpy only (runs inside Slicer's Python).

Python 3.9 compatible (Slicer 5.8). Every call is synchronous and bounded by ``timeout``; long work runs
on the server as a job (:meth:`LiverSAMClient.start_propagation`) that the caller polls with
:meth:`LiverSAMClient.job_status` (e.g. from a QTimer), so nothing here blocks for minutes.

Wire formats (see docs/SERVER.md):

- arrays are indexed ``[k, j, i]`` (slice, row, column); prompts are voxel indices (IJK): a box on slice
  ``k`` is ``(i0, j0, i1, j1)``, a point ``(i, j)``;
- a CT travels as raw little-endian ``int16`` or ``float32`` voxels in C order (``application/octet-stream``)
  with its shape and LPS geometry in the query string;
- a mask travels as ``numpy.packbits`` of the C-ordered boolean array (bit order "big"), its shape in the
  ``X-LiverSAM-Shape`` header (``"nj,ni"`` or ``"nk,nj,ni"``); a labelmap as raw ``uint8``/``uint16``;
- every other request and answer is JSON; an error answer is ``{"detail": "<what is wrong>"}``.

``LocalServerProcess`` starts ``python -m liversam serve --port 0 --token-file F`` with a given Python
(a venv that has the ``liversam`` package), waits until it answers and stops it again.
"""

from __future__ import annotations

import collections
import contextlib
import copy
import http.client
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

API_PREFIX = "/v1"
MASK_ENCODING = "packbits"


# --- errors ------------------------------------------------------------------------------------------------
class LiverSAMClientError(Exception):
    """Base class of every error this client raises."""


class ServerUnavailable(LiverSAMClientError):
    """The server cannot be reached (connection refused, timed out, not running, or it died)."""


class AuthError(LiverSAMClientError):
    """The server refused the token (HTTP 401)."""


class ServerRequestError(LiverSAMClientError):
    """The server refused a request (HTTP 4xx); ``message`` is the server's explanation."""

    def __init__(self, status: int, message: str, method: str = "", path: str = "") -> None:
        self.status = int(status)
        self.message = message
        self.method = method
        self.path = path
        super().__init__(f"{method} {path}: HTTP {status}: {message}".strip())


class JobLost(LiverSAMClientError):
    """The server no longer knows a job it started (restarted, or it closed the job's CT) and the job was already
    started again once."""


# The server's 404 answers that mean it no longer holds a session (liversam/server/sessions.py ``SessionNotFound``:
# evicted as least recently used or idle, closed, or the server restarted; liversam/server/jobs.py ``SessionClosed``)
# or a job (``JobNotFound``). Other 404s (a job without that segment, a path an older server lacks) are not.
_SESSION_LOST = re.compile(r"^(unknown session '|session '[^']*' was closed while)")
_JOB_LOST = re.compile(r"^unknown job '")


def session_lost(error: BaseException) -> bool:
    """True when ``error`` is the server saying it has no such session: open the CT again and repeat the request."""
    return _lost(error, "/sessions/", _SESSION_LOST)


def job_lost(error: BaseException) -> bool:
    """True when ``error`` is the server saying it has no such job (restarted, or it closed the job's session)."""
    return _lost(error, "/jobs/", _JOB_LOST)


def _lost(error: BaseException, path: str, message: re.Pattern) -> bool:
    if not isinstance(error, ServerRequestError) or error.status != 404:
        return False
    return error.path.startswith(path) and bool(message.match(error.message))


class ServerError(LiverSAMClientError):
    """The server failed (HTTP 5xx); ``message`` is what it said."""

    def __init__(self, status: int, message: str, method: str = "", path: str = "") -> None:
        self.status = int(status)
        self.message = message
        super().__init__(f"{method} {path}: HTTP {status}: {message}".strip())


class RequestAborted(LiverSAMClientError):
    """A request stopped by :meth:`LiverSAMClient.abort` (the module was cleaned up, or its server stopped or changed);
    a CT or mask upload stopped this way leaves nothing on the server (it drops a body that does not arrive whole)."""


class UploadRefused(LiverSAMClientError):
    """The server closed the connection while a large body was sent and its answer could not be read, yet it still
    answers: it refused the upload before reading it (its memory budget, a size limit). The server is not lost."""


# --- binary helpers ----------------------------------------------------------------------------------------
def pack_mask(mask: np.ndarray) -> bytes:
    """A boolean array as packed bits (C order, bit order big), the server's mask encoding."""
    return np.packbits(np.ascontiguousarray(mask, dtype=bool).ravel()).tobytes()


def unpack_mask(data: bytes, shape: Sequence[int]) -> np.ndarray:
    """Packed bits back into a boolean array of ``shape``."""
    count = int(np.prod([int(s) for s in shape]))
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), count=count)
    return bits.astype(bool).reshape(tuple(int(s) for s in shape))


def parse_shape(text: str | None) -> tuple[int, ...]:
    if not text:
        raise LiverSAMClientError("the server's answer has no X-LiverSAM-Shape header")
    return tuple(int(v) for v in text.split(","))


def box_ijk(i0: float, j0: float, i1: float, j1: float, k: float) -> list[list[float]]:
    """A box on slice ``k`` in the PROMPTS.json corner form ``[[i0, j0, k], [i1, j1, k]]`` (IJK)."""
    return [[float(i0), float(j0), float(k)], [float(i1), float(j1), float(k)]]


def segment_spec(
    name: str,
    label: int | None = None,
    boxes_ijk: Iterable[Sequence[Sequence[float]]] = (),
    points_ijk: Iterable[Sequence[float]] = (),
    negative_points_ijk: Iterable[Sequence[float]] = (),
    inside: str | None = None,
    propagate: bool = True,
    color: Sequence[float] | None = None,
) -> dict[str, Any]:
    """One segment of a propagation request, in PROMPTS.json form (IJK): see :func:`box_ijk` for boxes.

    ``inside``: another segment of the same request, or a mask uploaded with
    :meth:`LiverSAMClient.upload_mask` (e.g. the liver already in the scene) that clips this segment.
    """
    spec: dict[str, Any] = {
        "name": name,
        "boxes": [[list(map(float, c)) for c in box] for box in boxes_ijk],
        "points": [list(map(float, p)) for p in points_ijk],
        "negative_points": [list(map(float, p)) for p in negative_points_ijk],
        "propagate": bool(propagate),
    }
    if label is not None:
        spec["label"] = int(label)
    if inside:
        spec["inside"] = inside
    if color is not None:
        spec["color"] = [float(c) for c in color]
    return spec


class _Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body.decode("utf-8")) if self.body else None


# --- client ------------------------------------------------------------------------------------------------
class LiverSAMClient:
    """Talks to one ``liversam serve`` at ``base_url`` (e.g. ``http://127.0.0.1:8123``) with ``token``.

    ``timeout`` (seconds) bounds every single HTTP call; the first call that needs the model also waits
    for the server to load it (a few seconds), which ``predict_timeout`` allows for.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0,
                 predict_timeout: float = 300.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout = float(timeout)
        self.predict_timeout = float(predict_timeout)
        self._requests = _Requests()  # shared with the bounded() copies: abort() stops theirs too

    def abort(self) -> int:
        """Stop this client's requests under way, on any thread (their callers get :class:`RequestAborted` at once; a
        CT upload stopped mid-way leaves nothing on the server), and refuse every later request except those that free
        the server's resources (closing a session, deleting a mask, cancelling a job). For a client that is given up
        (the module cleaned up at Slicer's exit or reload, its server stopped or changed): an upload must neither hold
        the exit up nor go on into a session nobody closes. Returns how many requests were stopped."""
        return self._requests.abort()

    @property
    def aborted(self) -> bool:
        return self._requests.aborted

    def bounded(self, timeout: float) -> LiverSAMClient:
        """A copy of this client whose every call (uploads and slice predictions included) gives up after
        ``timeout`` seconds: for best-effort calls that must not hold Slicer up (the module's cleanup at exit)."""
        client = copy.copy(self)
        client.timeout = client.predict_timeout = max(0.05, float(timeout))
        client._bounded = True
        return client

    _bounded = False

    # --- transport ------------------------------------------------------------------------------------
    def _request(
        self,
        method: str,
        path: str,
        query: dict[str, Any] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
        content_type: str | None = None,
        timeout: float | None = None,
        auth: bool = True,
    ) -> _Answer:
        url = self.base_url + API_PREFIX + path
        if query:
            url += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json, application/octet-stream"}
        if json_body is not None:
            data = json.dumps(json_body, allow_nan=False).encode("utf-8")
            content_type = "application/json"
        if content_type:
            headers["Content-Type"] = content_type
        if auth and self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        under_way = self._requests.begin(method, path)
        if under_way is None:
            raise RequestAborted(f"{method} {path}: not sent, this connection to {self.base_url} was closed "
                                 "(LiverSAM was cleaned up, or its server stopped or changed)")
        outer = getattr(_CURRENT, "request", None)  # (UploadRefused's check asks info() inside a failed upload)
        _CURRENT.request = under_way  # the connection this thread opens registers with it (_EarlyAnswer.connect)
        try:
            return self._send(request, method, path, data, timeout, auth, under_way)
        finally:
            _CURRENT.request = outer
            self._requests.end(under_way)

    def _send(self, request: urllib.request.Request, method: str, path: str, data: bytes | None,
              timeout: float | None, auth: bool, under_way: _Request) -> _Answer:
        url = request.full_url
        try:
            bound = self.timeout if self._bounded else (timeout or self.timeout)
            with _opener_for(url).open(request, timeout=bound) as response:
                return _Answer(response.status, dict(response.headers.items()), response.read())
        except urllib.error.HTTPError as exc:
            body = exc.read()
            message = _error_message(body) or exc.reason
            if exc.code == 401:
                raise AuthError(f"the server at {self.base_url} refused the token: {message}") from None
            if 400 <= exc.code < 500:
                raise ServerRequestError(exc.code, _explained(exc.code, str(message)), method, path) from None
            raise ServerError(exc.code, str(message), method, path) from None
        except (urllib.error.URLError, ConnectionError, socket.timeout, TimeoutError) as exc:  # noqa: UP041 - 3.9
            if under_way.aborted:
                raise RequestAborted(f"{method} {path}: stopped, the connection to {self.base_url} was closed") from None
            reason = getattr(exc, "reason", exc)
            if data and len(data) > 65536 and isinstance(reason, _SEND_ERRORS) and auth:
                # The server closed the connection during a large upload and its answer was lost (the connection
                # reads it when the system kept it: _EarlyAnswer): it refused the request before reading it all.
                # Find out whether the token is the reason; a server that answers is not lost.
                raise UploadRefused(_upload_refused(self.base_url, path, len(data), self.info())) from None
            raise ServerUnavailable(f"LiverSAM server at {self.base_url} is not reachable: {reason}") from None
        except Exception:
            if under_way.aborted:  # e.g. http.client.IncompleteRead of an answer cut off
                raise RequestAborted(f"{method} {path}: stopped, the connection to {self.base_url} was closed") from None
            raise

    # --- server ----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``{"status": "ok", "version": ...}``; needs no token. Raises ServerUnavailable when down."""
        return self._request("GET", "/health", auth=False, timeout=min(self.timeout, 5.0)).json()

    def info(self) -> dict[str, Any]:
        """Version, model (and whether it is loaded), device, encoder/decoder backend and precision,
        open sessions, queued jobs and the server's limits."""
        return self._request("GET", "/info").json()

    def models(self) -> dict[str, Any] | None:
        """The models the server's machine can load: ``{"current": name, "models": [{"name", "description", "kind"
        ("built-in" / "registered"), "available"}]}``; None from a server too old to list them (404)."""
        try:
            return self._request("GET", "/models").json()
        except ServerRequestError as error:
            if error.status == 404:
                return None
            raise

    # --- sessions ----------------------------------------------------------------------------------------
    def open_volume(
        self,
        array_kji: np.ndarray,
        spacing: Sequence[float],
        origin_lps: Sequence[float],
        direction_lps: Sequence[float] | None = None,
        window_level: float | None = None,
        window_width: float | None = None,
    ) -> dict[str, Any]:
        """Send a CT (``[k, j, i]`` int16 or float32 HU) -> session info ``{"session_id", "shape_kji", ...}``.

        ``spacing`` is (i, j, k) in mm, ``origin_lps`` the centre of voxel (0, 0, 0) in LPS mm,
        ``direction_lps`` the 3x3 matrix (9 values, row-major) whose columns are the i, j, k axes in LPS.
        Other dtypes are converted to float32 (int16 when the values are integers within its range).
        """
        array = np.asarray(array_kji)
        if array.ndim != 3:
            raise ValueError(f"the CT must be a 3D array [k, j, i], got shape {array.shape}")
        if array.dtype not in (np.int16, np.float32):
            if np.issubdtype(array.dtype, np.integer) and array.size and \
                    array.min() >= -32768 and array.max() <= 32767:
                array = array.astype(np.int16)
            else:
                array = array.astype(np.float32)
        array = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        direction = np.eye(3) if direction_lps is None else np.asarray(direction_lps, dtype=float).reshape(3, 3)
        query = {
            "dtype": "int16" if array.dtype == np.int16 else "float32",
            "shape": _csv(array.shape),
            "spacing": _csv(spacing),
            "origin": _csv(origin_lps),
            "direction": _csv(direction.ravel()),
            "window_level": window_level,
            "window_width": window_width,
        }
        return self._request("POST", "/sessions", query=query, data=array.tobytes(),
                             content_type="application/octet-stream", timeout=max(self.timeout, 120.0)).json()

    def open_path(self, path: str, series_uid: str | None = None, series_number: int | None = None,
                  window_level: float | None = None, window_width: float | None = None,
                  allow_non_ct: bool = False, resample_irregular: bool = False) -> dict[str, Any]:
        """Open a CT file or DICOM folder on the server's machine -> session info (as :meth:`open_volume`).
        ``resample_irregular``: an irregular DICOM series (missing slices, gantry tilt) is interpolated onto a regular
        grid instead of refused (the session info then says ``resampled``; no DICOM SEG can reference it)."""
        body: dict[str, Any] = {"path": str(path)}
        for key, value in (("series_uid", series_uid), ("series_number", series_number),
                           ("window_level", window_level), ("window_width", window_width)):
            if value is not None:
                body[key] = value
        for key, flag in (("allow_non_ct", allow_non_ct), ("resample_irregular", resample_irregular)):
            if flag:
                body[key] = True
        return self._request("POST", "/sessions/open-path", json_body=body, timeout=max(self.timeout, 120.0)).json()

    def session_info(self, session: str) -> dict[str, Any]:
        """The session's geometry, uploaded masks and cached slices."""
        return self._request("GET", f"/sessions/{_q(session)}").json()

    def close_session(self, session: str) -> None:
        """Close a session (its jobs are cancelled, its memory is freed). Unknown ids raise a 404 error."""
        self._request("DELETE", f"/sessions/{_q(session)}")

    def upload_mask(self, session: str, name: str, mask_kji: np.ndarray) -> None:
        """Store a mask ``[k, j, i]`` in the session under ``name`` (a container for ``inside``, or the
        existing segment a re-propagation fixes)."""
        self._request("PUT", f"/sessions/{_q(session)}/masks/{_q(name)}", data=pack_mask(mask_kji),
                      content_type="application/octet-stream", timeout=max(self.timeout, 60.0))

    def delete_mask(self, session: str, name: str) -> None:
        """Forget the session's mask ``name`` (its memory is freed on the server). An unknown name raises a 404
        error."""
        self._request("DELETE", f"/sessions/{_q(session)}/masks/{_q(name)}")

    def export_dicom_seg(
        self,
        session: str,
        segments: Sequence[tuple[str, str]],
        reference_dicom: str | None = None,
        series_uid: str | None = None,
        series_description: str | None = None,
    ) -> bytes:
        """The session masks as a DICOM SEG file (bytes), written by the server with ``liversam.dicom_seg``.

        ``segments``: (segment name, session mask name) pairs, the masks uploaded with :meth:`upload_mask`
        (``liver`` and ``tumor`` get their SNOMED CT codes; empty segments are left out).
        ``reference_dicom``: the CT's DICOM folder as the server sees it; None for a session the server read
        from a DICOM folder itself (:meth:`open_path`). The session's grid must be that series' grid; a
        mismatch raises ServerRequestError (422) naming the difference.
        """
        body: dict[str, Any] = {"segments": [{"name": name, "mask": mask} for name, mask in segments]}
        for key, value in (("reference_dicom", reference_dicom), ("series_uid", series_uid),
                           ("series_description", series_description)):
            if value is not None:
                body[key] = value
        return self._request("POST", f"/sessions/{_q(session)}/export/dicom-seg", json_body=body,
                             timeout=max(self.timeout, 120.0)).body

    # --- interactive ---------------------------------------------------------------------------------------
    def predict_slice(
        self,
        session: str,
        k: int,
        boxes_ij: Iterable[Sequence[float]] = (),
        points_ij: Iterable[Sequence[float]] = (),
        negative_points_ij: Iterable[Sequence[float]] = (),
    ) -> tuple[np.ndarray, float]:
        """Segment slice ``k`` from boxes ``(i0, j0, i1, j1)`` and points ``(i, j)`` -> (mask [j, i] bool, score).

        The mask is the model's own (no clean-up), the same as ``SlicePredictor.predict``; the score is the
        model's predicted IoU. The slice is encoded unless its embedding is cached (see :meth:`prefetch`).
        """
        body = {
            "k": int(k),
            "boxes": [[float(v) for v in box] for box in boxes_ij],
            "points": [[float(v) for v in p] for p in points_ij],
            "negative_points": [[float(v) for v in p] for p in negative_points_ij],
        }
        answer = self._request("POST", f"/sessions/{_q(session)}/predict", json_body=body,
                               timeout=max(self.timeout, self.predict_timeout))
        mask = unpack_mask(answer.body, parse_shape(_header(answer.headers, "X-LiverSAM-Shape")))
        return mask, float(_header(answer.headers, "X-LiverSAM-Score") or "nan")

    def prefetch(self, session: str, k: int, radius: int = 3) -> list[int]:
        """Encode slices ``k``, ``k+-1``, ... ``k+-radius`` in the background (replaces the session's previous
        plan); returns the slices planned (those not cached yet), nearest first."""
        return list(self._request("POST", f"/sessions/{_q(session)}/prefetch",
                                  json_body={"k": int(k), "radius": int(radius)}).json()["planned"])

    # --- jobs ----------------------------------------------------------------------------------------------------
    def start_propagation(
        self,
        session: str,
        segments: Sequence[dict[str, Any]],
        max_slices: int | None = None,
        intensity_refinement: bool = True,
        coordinate_system: str = "IJK",
        settings: dict[str, Any] | None = None,
    ) -> str:
        """Start segmenting (and propagating) ``segments`` (:func:`segment_spec` dicts) -> job id.

        The same pipeline as ``liversam segment`` (``liversam.pipeline.segment_volume``). ``max_slices``
        caps each track per direction (None: until the structure ends). ``settings``: more fields of
        ``liversam.propagation.PropagationSettings`` by name (``min_score``, ``box_margin_mm``, ...) and
        ``min_island_mm2``; they win over the two arguments above. Poll :meth:`job_status`.
        """
        body: dict[str, Any] = {
            "coordinate_system": coordinate_system,
            "segments": list(segments),
            "settings": _job_settings(intensity_refinement, max_slices, settings),
        }
        return self._request("POST", f"/sessions/{_q(session)}/jobs/propagate", json_body=body).json()["job_id"]

    def start_repropagation(
        self,
        session: str,
        segment: dict[str, Any],
        fix_slices: Sequence[int],
        existing: str | None = None,
        container: str | None = None,
        max_slices: int | None = None,
        intensity_refinement: bool = True,
        coordinate_system: str = "IJK",
        settings: dict[str, Any] | None = None,
    ) -> str:
        """Fix slices ``fix_slices`` and re-propagate only what the fix affects -> job id.

        ``segment``: the segment's prompts as they are now (a :func:`segment_spec`, the fixed slices
        included). ``existing``: the session mask holding the segment as it is now (default: the
        segment's name: a previous job's result or an :meth:`upload_mask`); ``container``: a session mask
        that clips it (the liver, for a tumour). ``liversam.propagation.repropagate`` per fixed slice.
        ``settings`` as in :meth:`start_propagation`.
        """
        body: dict[str, Any] = {
            "coordinate_system": coordinate_system,
            "segment": dict(segment),
            "fix_slices": [int(k) for k in fix_slices],
            "existing": existing,
            "container": container,
            "settings": _job_settings(intensity_refinement, max_slices, settings),
        }
        return self._request("POST", f"/sessions/{_q(session)}/jobs/repropagate", json_body=body).json()["job_id"]

    def job_status(self, job: str) -> dict[str, Any]:
        """``{"job_id", "state": queued|running|done|failed|cancelled, "stage", "done", "total", "error", ...}``."""
        return self._request("GET", f"/jobs/{_q(job)}").json()

    def wait_job(self, job: str, timeout: float = 600.0, poll: float = 0.2,
                 on_progress: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the job has finished (any final state) and return its last status."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.job_status(job)
            if on_progress is not None:
                on_progress(status)
            if status["state"] in ("done", "failed", "cancelled"):
                return status
            if time.monotonic() > deadline:
                raise LiverSAMClientError(f"job {job} still {status['state']} after {timeout:.0f} s")
            time.sleep(poll)

    def cancel_job(self, job: str) -> dict[str, Any]:
        """Ask the job to stop; a cancelled job writes nothing. Returns its status."""
        return self._request("POST", f"/jobs/{_q(job)}/cancel").json()

    def job_result(self, job: str, masks: bool = True) -> dict[str, Any]:
        """The finished job's result: ``{"segments": [{"name", "label", "color", "voxels", "volume_ml",
        "computed_slices", "mask": bool [k, j, i]}], "review": {...}, "lesions": [...]}``.

        ``review`` is ``liversam.review.build_review_report``'s report and ``lesions`` the lesion table.
        A job that is not done (running, failed, cancelled) raises ServerRequestError (409) saying so.
        """
        result = self._request("GET", f"/jobs/{_q(job)}/result").json()
        if masks:
            for segment in result["segments"]:
                segment["mask"] = self.job_mask(job, segment["name"])
        return result

    def job_mask(self, job: str, segment: str) -> np.ndarray:
        """One segment of a finished job as a boolean array [k, j, i]."""
        answer = self._request("GET", f"/jobs/{_q(job)}/masks/{_q(segment)}", timeout=max(self.timeout, 60.0))
        return unpack_mask(answer.body, parse_shape(_header(answer.headers, "X-LiverSAM-Shape")))

    def job_labelmap(self, job: str) -> np.ndarray:
        """A finished job's segments as one labelmap [k, j, i] (uint8 or uint16; each segment's label)."""
        answer = self._request("GET", f"/jobs/{_q(job)}/labelmap", timeout=max(self.timeout, 60.0))
        dtype = np.dtype(_header(answer.headers, "X-LiverSAM-Dtype") or "uint8").newbyteorder("<")
        return np.frombuffer(answer.body, dtype=dtype).reshape(parse_shape(_header(answer.headers, "X-LiverSAM-Shape")))


def _job_settings(intensity_refinement: bool, max_slices: int | None,
                  settings: dict[str, Any] | None) -> dict[str, Any]:
    merged: dict[str, Any] = {"intensity_refinement": bool(intensity_refinement), "max_slices": max_slices}
    merged.update(settings or {})
    return merged


def _csv(values: Iterable[Any]) -> str:
    return ",".join(repr(float(v)) if not isinstance(v, (int, np.integer)) else str(int(v)) for v in values)


def _q(text: str) -> str:
    return urllib.parse.quote(str(text), safe="")


def _header(headers: dict[str, str], name: str) -> str | None:
    for key, value in headers.items():
        if key.lower() == name.lower():
            return value
    return None


def _explained(status: int, message: str) -> str:
    """The server's refusal, with what to do when it does not know a job setting this client sends (a server older
    than the client: pydantic's "Extra inputs are not permitted" on ``body.settings.<name>``)."""
    if status == 422 and "settings." in message and "Extra inputs are not permitted" in message:
        return (f"{message} (the server is older than this client and does not know that setting: update the LiverSAM "
                "server, or set the option back to its default)")
    return message


def _upload_refused(base_url: str, path: str, nbytes: int, info: dict[str, Any]) -> str:
    memory = info.get("memory") or {}
    held = (f": its sessions hold {memory['held_mb']} MB of their {memory['budget_mb']} MB memory budget "
            "(liversam serve --session-memory-gb)") if "held_mb" in memory and "budget_mb" in memory else ""
    return (f"the LiverSAM server at {base_url} stopped reading the {nbytes} bytes sent to {path} and closed the "
            f"connection without an answer this computer could read, but it still answers: it refused the upload "
            f"before reading it, for lack of memory or over a size limit{held}")


# --- requests under way, and stopping them -----------------------------------------------------------------
def _releases(method: str, path: str) -> bool:
    """A request that frees the server's resources: closing a session, deleting a mask, cancelling a job."""
    return method == "DELETE" or (method == "POST" and path.startswith("/jobs/") and path.endswith("/cancel"))


class _Request:
    """One request under way and the connection it opened (set by :meth:`_EarlyAnswer.connect` on its thread)."""

    def __init__(self, owner: _Requests) -> None:
        self.owner = owner
        self.connection: http.client.HTTPConnection | None = None
        self.aborted = False

    def shut(self) -> None:
        """Shut the connection's socket down (both ways): a thread blocked sending or reading on it returns at once. The
        plain socket's shutdown, also under TLS: SSLSocket.shutdown drops its TLS object, which the sending thread is
        using."""
        sock = getattr(self.connection, "sock", None)
        if sock is not None:
            with contextlib.suppress(OSError):
                socket.socket.shutdown(sock, socket.SHUT_RDWR)


class _Requests:
    """A client's requests under way (any thread) and whether the client was aborted (:meth:`LiverSAMClient.abort`)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._under_way: set[_Request] = set()
        self.aborted = False

    def begin(self, method: str, path: str) -> _Request | None:
        """A new request's record; None when the client was aborted and the request frees nothing on the server."""
        with self._lock:
            if self.aborted and not _releases(method, path):
                return None
            request = _Request(self)
            self._under_way.add(request)
            return request

    def attach(self, request: _Request, connection: http.client.HTTPConnection) -> None:
        with self._lock:
            request.connection = connection
            aborted = request.aborted
        if aborted:  # aborted while it connected
            request.shut()

    def end(self, request: _Request) -> None:
        with self._lock:
            self._under_way.discard(request)

    def abort(self) -> int:
        with self._lock:
            self.aborted = True
            stopped = list(self._under_way)
            for request in stopped:
                request.aborted = True
        for request in stopped:
            request.shut()
        return len(stopped)


#: The request the current thread is sending (set by ``LiverSAMClient._request``): its connection registers with it.
_CURRENT = threading.local()


#: How a connection the server closed during a large upload fails: a reset or broken pipe over HTTP; over HTTPS the
#: TLS layer reports the closed connection (SSLEOFError, an SSLError) and the server's early answer cannot be read.
_SEND_ERRORS = (ConnectionResetError, BrokenPipeError, ssl.SSLError)


class _EarlyAnswer:
    """An HTTP(S) connection that still reads the server's answer after the server stopped reading the request body
    and closed the connection: a server refuses an upload before reading it (503, its memory budget is full; 413, too
    large), and with urllib's ``Connection: close`` the rest of the body is sent into a closed connection. urllib's own
    connection raises that send error (BrokenPipeError, ConnectionResetError) and the server's message is lost; this
    one reads the answer, which the system still holds (Linux does), and raises the send error only when there is
    none."""

    _send_error: OSError | None = None

    def connect(self) -> None:
        super().connect()  # type: ignore[misc]
        request = getattr(_CURRENT, "request", None)
        if request is not None:  # a LiverSAMClient request: abort() can shut this connection down
            request.owner.attach(request, self)

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._send_error = None
        try:
            super().request(*args, **kwargs)  # type: ignore[misc]
        except (BrokenPipeError, ConnectionResetError) as error:
            self._send_error = error

    def getresponse(self) -> http.client.HTTPResponse:
        try:
            return super().getresponse()  # type: ignore[misc]
        except (OSError, http.client.HTTPException):
            if self._send_error is not None:
                raise self._send_error from None
            raise


class _EarlyAnswerHTTPConnection(_EarlyAnswer, http.client.HTTPConnection):
    pass


class _EarlyAnswerHandler(urllib.request.HTTPHandler):
    def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
        return super().do_open(_EarlyAnswerHTTPConnection, req, **kwargs)


_HANDLERS: list[Any] = [_EarlyAnswerHandler]
if hasattr(http.client, "HTTPSConnection") and hasattr(urllib.request, "HTTPSHandler"):  # Python built with ssl

    class _EarlyAnswerHTTPSConnection(_EarlyAnswer, http.client.HTTPSConnection):
        pass

    class _EarlyAnswerHTTPSHandler(urllib.request.HTTPSHandler):
        def do_open(self, http_class: Any, req: urllib.request.Request, **kwargs: Any) -> Any:
            return super().do_open(_EarlyAnswerHTTPSConnection, req, **kwargs)

    _HANDLERS.append(_EarlyAnswerHTTPSHandler)
#: urllib's default opener (proxies from the environment, redirects, HTTP errors) with those connections
_OPENER = urllib.request.build_opener(*_HANDLERS)
#: the same without proxies, for a server on this computer: Python sends even 127.0.0.1 through an ``http_proxy``
#: from the environment unless ``no_proxy`` names it (a hospital network's proxy then got the local server's
#: requests, and its token, and the start timed out)
_DIRECT_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), *_HANDLERS)


def is_loopback_url(url: str) -> bool:
    """True when ``url``'s host is this computer (``localhost``, 127.0.0.0/8, ``::1``)."""
    host = (urllib.parse.urlsplit(url).hostname or "").lower()
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _opener_for(url: str) -> urllib.request.OpenerDirector:
    return _DIRECT_OPENER if is_loopback_url(url) else _OPENER


def _error_message(body: bytes) -> str:
    try:
        data = json.loads(body.decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace")[:500]
    detail = data.get("detail") if isinstance(data, dict) else data
    return detail if isinstance(detail, str) else json.dumps(detail)[:500]


def _without_usage(text: str) -> str:
    """A server's stderr without argparse's usage block before its error line (an option the server refused: the
    error says which and what to give; the usage lines only push it out of the module's status line)."""
    lines = text.splitlines()
    start = next((n for n, line in enumerate(lines) if line.startswith("usage: ")), None)
    error = next((n for n, line in enumerate(lines) if ": error: " in line and start is not None and n > start), None)
    if start is None or error is None:
        return text
    return "\n".join(lines[:start] + lines[error:])


# --- a local server process ----------------------------------------------------------------------------
# The folder of a local server's token file. `liversam serve` removes it (when empty) as it deletes the token, so
# that a starter killed outright (a Slicer crash: its clean-up never runs) leaves nothing in the temporary folder.
LOCAL_SERVER_FOLDER_PREFIX = "liversam-server-"
#: How long :meth:`LocalServerProcess.stop` waits for a killed server to end (it ends at once, unless the kernel holds
#: it in uninterruptible sleep, e.g. in a GPU driver) before it leaves it to the operating system.
KILLED_WAIT_S = 2.0
_log = logging.getLogger(__name__)


class LocalServerProcess:
    """Start ``<python> -m liversam serve --port 0 --token-file F`` on this machine and stop it again.

    ``python``: an interpreter whose environment has the ``liversam`` package (``[server]`` extra);
    ``extra_args``: more ``liversam serve`` options (``--device``, ``--accelerate``, ...). :meth:`start`
    waits up to ``startup_timeout`` seconds for the health check; if the process dies first, the error
    carries the tail of its stderr. Use as a context manager or call :meth:`stop`.
    """

    URL_PATTERN = re.compile(r"listening on (http://\S+)")

    def __init__(self, python: str = sys.executable, extra_args: Sequence[str] = (), startup_timeout: float = 60.0,
                 env: dict[str, str] | None = None, cwd: str | None = None) -> None:
        self.python = python
        self.extra_args = list(extra_args)
        self.startup_timeout = float(startup_timeout)
        self.env = env
        self.cwd = cwd
        self.url: str | None = None
        self.token: str | None = None
        self.process: subprocess.Popen | None = None
        self._folder: str | None = None
        self._stderr_tail: collections.deque = collections.deque(maxlen=40)
        self._stdout_lines: list[str] = []
        self._url_found = threading.Event()

    def start(self) -> LiverSAMClient:
        """Start the server and return a client connected to it (URL and token from the process)."""
        if self.process is not None and self.process.poll() is None:
            return self.client()
        self._folder = tempfile.mkdtemp(prefix=LOCAL_SERVER_FOLDER_PREFIX)
        token_file = os.path.join(self._folder, f"token-{secrets.token_hex(4)}")
        try:
            self._launch(token_file)
            return self._wait_until_ready(token_file)
        except BaseException:  # start-up failed or was interrupted (Ctrl-C): leave no server and no token folder
            self.stop()
            raise

    def _launch(self, token_file: str) -> None:
        # --exit-with-stdin: the server ends with the program that started it even when that program crashes or is
        # killed (its stop at exit never runs then): this process holds the pipe that is the server's input
        command = [self.python, "-m", "liversam", "serve", "--host", "127.0.0.1", "--port", "0",
                   "--token-file", token_file, "--exit-with-stdin", *self.extra_args]
        flags = getattr(subprocess, "CREATE_NO_WINDOW", 0) if sys.platform == "win32" else 0
        try:
            self.process = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.PIPE,
                env=self.env, cwd=self.cwd, creationflags=flags, text=True, encoding="utf-8", errors="replace",
            )
        except OSError as exc:
            raise ServerUnavailable(f"cannot start the LiverSAM server with '{self.python}': {exc}") from None
        # the readers get the process itself: a failed start-up may already have cleared self.process
        threading.Thread(target=self._read_stdout, args=(self.process,), daemon=True).start()
        threading.Thread(target=self._read_stderr, args=(self.process,), daemon=True).start()

    def _wait_until_ready(self, token_file: str) -> LiverSAMClient:
        """A client once the server answers its health check; ServerUnavailable if it exits or times out."""
        process = self.process  # stop() from another thread clears self.process meanwhile
        assert process is not None
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process is not process:
                raise ServerUnavailable("the LiverSAM server was stopped while it started")
            if process.poll() is not None:
                time.sleep(0.2)  # let the readers collect the last lines
                raise ServerUnavailable(
                    f"the LiverSAM server exited with code {process.returncode} while starting:\n"
                    + _without_usage(self.stderr_tail())
                )
            if self._url_found.is_set() and os.path.isfile(token_file):
                with open(token_file, encoding="utf-8") as handle:
                    self.token = handle.read().strip()
                try:
                    self.client().health()
                    return self.client()
                except ServerUnavailable:
                    pass
            time.sleep(0.1)
        raise ServerUnavailable(
            f"the LiverSAM server did not answer within {self.startup_timeout:.0f} s:\n" + self.stderr_tail()
        )

    def client(self, timeout: float = 30.0) -> LiverSAMClient:
        if self.url is None:
            raise ServerUnavailable("the LiverSAM server is not running; call start() first")
        return LiverSAMClient(self.url, self.token, timeout)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stderr_tail(self) -> str:
        return "".join(self._stderr_tail).rstrip() or "(no output on stderr)"

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the server (terminate, then kill after ``timeout`` s) and delete its token file. Never raises for a
        process that does not end even when killed (uninterruptible sleep in a driver): it is left to the operating
        system after :data:`KILLED_WAIT_S`, with a warning (module cleanup and Slicer's exit call this)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(max(0.0, timeout))
            except subprocess.TimeoutExpired:
                process.kill()
                try:
                    process.wait(KILLED_WAIT_S)  # a killed process ends at once, unless the kernel holds it
                except subprocess.TimeoutExpired:
                    _log.warning("the LiverSAM server (PID %s) has not ended %.0f s after it was killed; it ends when "
                                 "the operating system lets it", process.pid, KILLED_WAIT_S)  # fmt: skip
        if process is not None and process.stdin is not None:
            with contextlib.suppress(OSError):
                process.stdin.close()
        if self._folder and os.path.isdir(self._folder):
            for name in os.listdir(self._folder):
                try:
                    os.remove(os.path.join(self._folder, name))
                except OSError:
                    pass
            try:
                os.rmdir(self._folder)
            except OSError:
                pass
        self._folder = None

    def __enter__(self) -> LiverSAMClient:
        return self.start()

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()

    def _read_stdout(self, process: subprocess.Popen) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._stdout_lines.append(line)
            match = self.URL_PATTERN.search(line)
            if match and not self._url_found.is_set():
                self.url = match.group(1)
                self._url_found.set()

    def _read_stderr(self, process: subprocess.Popen) -> None:
        assert process.stderr is not None
        for line in process.stderr:
            self._stderr_tail.append(line)
