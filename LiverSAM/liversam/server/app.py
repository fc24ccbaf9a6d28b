"""``create_app(config)``: the FastAPI application of ``liversam serve`` (routes under ``/v1``)."""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from fastapi import APIRouter, FastAPI, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import InputImageError, LiverSAMError, ModelError, PromptError
from ..geometry import ImageGeometry
from ..preprocess import WindowSettings
from ..volume import CTVolume
from . import binary
from .config import API_PREFIX, ServerConfig
from .jobs import (
    JobNotFound,
    JobStore,
    SessionClosed,
    pipeline_settings,
    propagation_work,
    repropagation_work,
    segment_prompts,
    slice_prompts,
)
from .memory import mb
from .public import ServerStorageError, input_file_error, public_description, public_model_name, public_text
from .schemas import (
    DicomSegRequest,
    Health,
    Info,
    JobResult,
    JobStatus,
    Limits,
    MemoryHeld,
    ModelChoice,
    ModelInfo,
    ModelList,
    OpenPath,
    Planned,
    PredictRequest,
    PrefetchRequest,
    PropagateRequest,
    RepropagateRequest,
    SessionInfo,
)
from .security import SecurityMiddleware
from .sessions import ServerFull, Session, SessionNotFound, SessionStore
from .worker import INTERACTIVE, InferenceWorker

log = logging.getLogger(__name__)


#: GET /v1/models' answer when the registry cannot be read: what is wrong and who can fix it, without the server's paths
REGISTRY_UNREADABLE = (
    "The model registry on the server's machine cannot be read, so its trained models cannot be listed (the model the "
    "server runs is not affected). The server's administrator can fix or delete that file: the server's log names it "
    "and the error ($LIVERSAM_HOME/models/registry.json, by default ~/.liversam/models/registry.json)."
)


class Refused(Exception):
    """A request the server refuses with ``status`` and a message naming the problem."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


class ServerState:
    """Everything one server process holds: config, the inference worker, sessions, jobs."""

    def __init__(self, config: ServerConfig, model_loader=None) -> None:
        self.config = config
        self.worker = InferenceWorker(model_loader or self._load_model)
        self.jobs = JobStore(self.worker, config.max_jobs, public=client_text(config))
        self.sessions = SessionStore(config.max_sessions, config.idle_timeout_s, self._evicted,
                                     config.session_memory_bytes, self.jobs.result_masks)
        self.jobs.keep_masks = self.sessions.keep_job_masks  # a job's masks arrive within the budget

    def _load_model(self):
        import torch

        from ..models import load_model

        if self.config.threads > 0:
            torch.set_num_threads(self.config.threads)
        return load_model(self.config.model, device=self.config.device, accelerate=self.config.accelerate)

    def _evicted(self, session: Session) -> None:
        """Forget a closed session's jobs and free its memory (on the session store's release thread)."""
        session.closed = True  # already so (SessionStore marks it as it unlinks it): a job being started is refused
        self.jobs.forget_session(session)
        self.worker.drop_prefetch(session.id)
        session.release()

    def close(self) -> None:
        self.sessions.close_all()
        self.worker.close()


def create_app(config: ServerConfig, model_loader=None) -> FastAPI:
    """The application. ``model_loader()`` -> LoadedModel overrides how the model is loaded (tests)."""
    state = ServerState(config, model_loader)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async def expire_idle_sessions() -> None:  # also when no request comes
            while True:
                await asyncio.sleep(min(60.0, config.idle_timeout_s / 2))
                state.sessions.expire()

        janitor = asyncio.create_task(expire_idle_sessions())
        yield
        janitor.cancel()
        state.close()

    app = FastAPI(title="LiverSAM server", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Liver and liver-tumour segmentation with SAM: sessions, slice prediction, "
                              "propagation jobs. Every endpoint but /v1/health needs 'Authorization: Bearer <token>'.")
    app.state.server = state
    app.add_middleware(SecurityMiddleware, config=config)
    _add_error_handlers(app, config)
    app.include_router(_routes(state), prefix=API_PREFIX)
    _add_security_scheme(app)
    return app


# --- errors --------------------------------------------------------------------------------------------------
def client_text(config: ServerConfig) -> Callable[[str], str]:
    """What a message becomes in the server's answers: without the paths of the server's machine (:func:`public_text`)
    but those under the data roots, which token holders may open; as it is on a loopback server that opens any path
    (``allow_any_path``: its token holders read any file its user can, and a local user is told which file failed)."""
    if config.allow_any_path:
        return lambda text: text
    return lambda text: public_text(text, keep=config.data_roots) or text


def _add_error_handlers(app: FastAPI, config: ServerConfig) -> None:
    """Every error answer is ``{"detail": message}``. A message that may name files of the server's machine (the
    model's, a job's, the core's errors) names them by their file names (:func:`public_text`); only paths under the
    data roots (which token holders may open) are given in full, and every path on a loopback server that opens any
    path (``allow_any_path``: its token holders read any file its user can)."""
    public = client_text(config)

    def answer(status: int, detail: str) -> JSONResponse:
        return JSONResponse({"detail": detail}, status_code=status)

    @app.exception_handler(Refused)
    async def refused(_: Request, exc: Refused):
        return answer(exc.status, exc.detail)

    @app.exception_handler(SessionNotFound)
    @app.exception_handler(SessionClosed)
    @app.exception_handler(JobNotFound)
    async def not_found(_: Request, exc: LookupError):
        return answer(404, str(exc.args[0]))

    @app.exception_handler(ServerFull)
    async def full(_: Request, exc: ServerFull):
        return answer(503, str(exc))

    @app.exception_handler(ModelError)
    async def model_error(_: Request, exc: ModelError):
        # the full message is in the server's log (InferenceWorker logs a load failure once), not repeated per request
        return answer(503, f"the server's model cannot be used: {public(str(exc))}")

    @app.exception_handler(ServerStorageError)
    async def storage_error(_: Request, exc: ServerStorageError):
        return answer(503, str(exc))

    @app.exception_handler(LiverSAMError)
    async def user_error(request: Request, exc: LiverSAMError):
        full = str(exc)
        detail = public(full)
        if detail != full:
            log.info("%s %s: %s", request.method, request.url.path, full)
        return answer(422, detail)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        problems = []
        for error in exc.errors()[:10]:
            where = ".".join(str(p) for p in error.get("loc", ()))
            message = error.get("msg", "invalid")
            if error.get("type") == "json_invalid":
                message = f"malformed JSON ({error.get('ctx', {}).get('error', 'cannot be parsed')})"
            problems.append(f"{where}: {message}")
        return answer(422, "; ".join(problems) or "invalid request")


def _add_security_scheme(app: FastAPI) -> None:
    def openapi():
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schema.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"bearer": []}]
            schema["paths"][f"{API_PREFIX}/health"]["get"]["security"] = []
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


# --- helpers -------------------------------------------------------------------------------------------------
def _numbers(text: str, count: int, what: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        raise Refused(422, f"{what} must be {count} comma-separated numbers, got '{text[:80]}'") from None
    if len(values) != count or not all(math.isfinite(v) for v in values):
        raise Refused(422, f"{what} must be {count} finite comma-separated numbers, got '{text[:80]}'")
    return values


def _geometry(shape: str, spacing: str, origin: str, direction: str | None) -> ImageGeometry:
    dims = _numbers(shape, 3, "shape (nk,nj,ni)")
    if any(d < 1 or d != int(d) for d in dims):
        raise Refused(422, f"shape (nk,nj,ni) must be three positive integers, got '{shape}'")
    nk, nj, ni = (int(d) for d in dims)
    spacing_mm = _numbers(spacing, 3, "spacing (i,j,k mm)")
    if min(spacing_mm) <= 0:
        raise Refused(422, f"spacing (i,j,k mm) must be positive, got '{spacing}'")
    matrix = np.asarray(_numbers(direction, 9, "direction (3x3 row-major)") if direction else np.eye(3)).reshape(3, 3)
    if abs(np.linalg.det(matrix)) < 1e-6:
        raise Refused(422, "direction (3x3 row-major) is singular; give the i, j, k axis directions as columns")
    return ImageGeometry((ni, nj, nk), tuple(spacing_mm), tuple(_numbers(origin, 3, "origin (LPS mm)")), matrix)


def _session_info(session: Session) -> SessionInfo:
    g = session.volume.geometry
    return SessionInfo(
        session_id=session.id, shape_kji=list(g.shape_kji), spacing_mm=list(g.spacing_mm),
        origin_lps=list(g.origin_lps), direction_lps=[float(v) for v in g.direction_lps.ravel()],
        dtype=str(session.volume.array_kji.dtype), window_level=session.window.level,
        window_width=session.window.width, masks=sorted(session.masks), cached_slices=session.cached_slices,
        source=session.volume.source, reoriented_from=(session.volume.metadata or {}).get("reoriented_from"),
        resampled=bool((session.volume.metadata or {}).get("dicom_resampled")),
    )


def _window(level: float | None, width: float | None) -> WindowSettings:
    level = 40.0 if level is None else level
    width = 400.0 if width is None else width
    if not (math.isfinite(level) and math.isfinite(width)) or width <= 0:
        raise Refused(422, f"window level {level} / width {width}: both finite, width > 0")
    return WindowSettings(level=level, width=width)


def _read_axial_ct(path: Path, series_uid: str | None, allow_non_ct: bool, series_number: int | None,
                   dicom_series=None, resample_irregular: bool = False) -> CTVolume:
    """``read_ct``, and a CT stored in sagittal or coronal slices put on its axial slices (as ``liversam segment``, the
    Slicer module and the web app segment it; ``metadata["reoriented_from"]`` says so). The reordered copy is made
    while the read's second copy is still counted in the budget, and the file's array is dropped with it.
    ``dicom_series``: the series :func:`_ct_size` found for a DICOM ``path``; ``resample_irregular``: an irregular DICOM
    series (missing slices, gantry tilt) is resampled onto a regular grid instead of refused."""
    from ..axial_orientation import reorient_to_axial
    from ..ct_io import read_ct

    volume, reorientation = reorient_to_axial(
        read_ct(path, series_uid, allow_non_ct, series_number, dicom_series=dicom_series,
                resample_irregular=resample_irregular))
    if reorientation is not None:
        log.info("%s is stored in %s slices: the session holds its axial slices %s (voxels reordered, none resampled)",
                 path, reorientation.input_plane, "x".join(map(str, reorientation.axial_geometry.size_ijk)))
    return volume


async def _read_body(request: Request, expected: int, what: str) -> np.ndarray:
    """The body as ``expected`` bytes (a uint8 array), written straight into one buffer as it arrives: no copy
    of a CT afterwards (twice its size in memory, and a second of the event loop for a 1 GB float32 CT)."""
    body = np.empty(expected, dtype=np.uint8)  # pages are touched (resident) only as the data comes
    received = 0
    try:
        async for chunk in request.stream():
            end = received + len(chunk)
            if end > expected:
                raise Refused(422, f"{what}: the body has more than {expected} bytes, expected exactly {expected}")
            body[received:end] = np.frombuffer(chunk, dtype=np.uint8)
            received = end
    except ClientDisconnect:  # the client went away mid-upload: nothing to answer, nothing kept
        raise Refused(400, f"{what}: the client disconnected after {received} of {expected} bytes") from None
    if received != expected:
        raise Refused(422, f"{what}: the body has {received} bytes, expected exactly {expected}")
    return body


def _check_path(config: ServerConfig, text: str) -> Path:
    if "\x00" in text:
        raise Refused(422, "path contains a NUL character")
    if not config.data_roots and not config.allow_any_path:
        raise Refused(403, "opening CTs by path is disabled on this server (not bound to loopback and no "
                           "--data-root given); send the voxels instead, or start it with --data-root DIR")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~name" of a user this machine does not have
        raise Refused(422, f"path '{text}': its '~' names no user of the server's machine; give the full path") from None
    if config.data_roots:
        if not path.is_absolute():
            path = config.data_roots[0] / path
        resolved = _resolved(path, text)
        if not any(resolved == root or root in resolved.parents for root in config.data_roots):
            raise Refused(403, f"path '{text}' lies outside the server's data roots "
                               f"({', '.join(str(r) for r in config.data_roots)}); '..' and links may not leave them")
        return resolved
    if not path.is_absolute():
        raise Refused(422, f"path '{text}' must be absolute (the server's working folder is not yours)")
    return _resolved(path, text)


def _resolved(path: Path, text: str) -> Path:
    """``path.resolve()``; a symbolic link loop in it (pathlib's RuntimeError) or a path the file system refuses to
    look up is the client's path, told as the client gave it (``text``), not a 500."""
    try:
        return path.resolve()
    except RuntimeError:
        raise Refused(422, f"path '{text}' holds a symbolic link loop (a link that leads back to itself): fix the "
                           "link on the server, or give the path of the file itself") from None
    except OSError as exc:
        raise input_file_error(exc, f"the path '{text}'", "Give another path.") from exc


def _rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), None elsewhere."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


@dataclass(frozen=True)
class CTSize:
    """What opening a CT will hold, known before its voxels are read: ``ct_bytes`` once open, ``reading_bytes`` more
    while it is read (the reader's second copy); ``dicom_series`` is the DICOM series found (then read as found)."""

    voxels: int
    ct_bytes: int
    reading_bytes: int
    dicom_series: tuple | None = None


def _ct_size(path: Path, series_uid: str | None, allow_non_ct: bool, series_number: int | None,
             resample_irregular: bool = False) -> CTSize | None:
    """The :class:`CTSize` of the CT at ``path`` from headers only: an image file's header, or the DICOM series
    ``read_ct`` would read from a folder or one of its files (an irregular one, with ``resample_irregular``, on the grid
    it is resampled onto). None when the headers cannot tell (``read_ct`` then gives the proper error). A DICOM series
    that cannot be read raises read_ct's error."""
    from ..ct_io import has_image_suffix
    from ..image_integrity import DICOM, sniff_image_format

    if path.is_dir() or (path.is_file() and not has_image_suffix(path) and sniff_image_format(path) == DICOM):
        from ..dicom_series import find_series, read_size, resampled_read_size, sort_series

        chosen = find_series(path, series_uid, series_number, allow_non_ct)  # its errors are read_ct's
        voxels, ct_bytes, reading_bytes = read_size(chosen[1])
        if resample_irregular and voxels:
            sorted_series = sort_series(chosen[1], chosen[0])  # headers only (already read)
            if not sorted_series.regular:
                voxels, ct_bytes, reading_bytes = resampled_read_size(sorted_series)
        return CTSize(voxels, ct_bytes, reading_bytes, chosen) if voxels else None
    header = _ct_header(path)
    if header is None:
        return None
    return CTSize(header[0], header[0] * header[1], header[0] * header[1])


def _ct_header(path: Path) -> tuple[int, int] | None:
    """(voxel count, bytes per voxel) a CT file declares (header only), or None for folders / unreadable headers."""
    if not path.is_file():
        return None
    import SimpleITK as sitk

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
        one_voxel = sitk.Image([1] * reader.GetDimension(), reader.GetPixelID(), reader.GetNumberOfComponents())
    except RuntimeError:
        return None  # read_ct gives the proper error
    return int(np.prod(reader.GetSize())), sitk.GetArrayViewFromImage(one_voxel).nbytes


def _memory_held(state: ServerState) -> MemoryHeld:
    held = state.sessions.held()
    return MemoryHeld(budget_mb=mb(state.config.session_memory_bytes), held_mb=mb(held.total), ct_mb=mb(held.ct),
                      embeddings_mb=mb(held.embeddings), masks_mb=mb(held.masks))


# --- routes ---------------------------------------------------------------------------------------------------
def _routes(state: ServerState) -> APIRouter:  # noqa: C901 - one place that lists the API
    config = state.config
    router = APIRouter()

    def owner(request: Request) -> str:
        return request.state.owner

    async def run_interactive(fn):
        return await asyncio.wrap_future(state.worker.submit(fn, INTERACTIVE))

    def check_voxels(count: int, what: str) -> None:
        if count > config.max_voxels:
            raise Refused(413, f"{what} has {count} voxels; this server accepts at most {config.max_voxels} "
                               "(liversam serve --max-voxels); crop or resample the CT")

    @router.get("/health", response_model=Health, tags=["server"], summary="Liveness (no token needed)")
    def health() -> Health:
        return Health(status="ok", service="liversam", version=__version__)

    @router.get("/info", response_model=Info, tags=["server"])
    def info() -> Info:
        model = state.worker.model
        backend = decoder = precision = device = None
        if model is not None:
            from ..acceleration import current_backend, current_decoder_backend

            backend, decoder = current_backend(model), current_decoder_backend(model)
            precision = str(getattr(model.encoder_override, "precision", "fp32"))
            device = str(model.device)
        queued, running = state.jobs.counts()
        open_path = "roots" if config.data_roots else ("any" if config.allow_any_path else "disabled")
        return Info(
            version=__version__,
            model=ModelInfo(name=public_model_name(model.name if model is not None else config.model), loaded=model is not None,
                            device=device or config.device, encoder_backend=backend, decoder_backend=decoder,
                            precision=precision, accelerate=config.accelerate,
                            error=state.worker.model_error and client_text(config)(state.worker.model_error)),
            sessions=len(state.sessions), jobs_queued=queued, jobs_running=running, worker=state.worker.state,
            rss_mb=_rss_mb(), memory=_memory_held(state),
            limits=Limits(max_sessions=config.max_sessions, max_voxels=config.max_voxels,
                          idle_timeout_s=config.idle_timeout_s, cache_mb_per_session=config.cache_mb,
                          max_json_bytes=config.max_json_bytes, max_volume_bytes=config.max_voxels * 4,
                          open_path=open_path, session_memory_mb=mb(config.session_memory_bytes)),
        )

    @router.get("/models", response_model=ModelList, tags=["server"],
                summary="The models this server's machine can load (built-in and registered)")
    def models() -> ModelList:
        """What a front end offers for ``liversam serve --model NAME``: the built-in models and the ones trained with
        LiverSAMTrain and registered on this machine (read now: a model registered after the server started is
        listed). No file path of the server's machine is given (:func:`public_description`); an unreadable registry
        answers 503 saying so (its path and error go to the server's log)."""
        from ..models.registry import available_models

        try:
            listed = available_models()
        except Exception as exc:  # not JSON, not a list of entries, unreadable: the server's own model is fine
            log.error("GET /models: the model registry cannot be read: %s", exc)
            raise Refused(503, REGISTRY_UNREADABLE) from None
        return ModelList(current=public_model_name(config.model), models=[
            ModelChoice(name=m.name, description=public_description(m.description), kind=m.kind, available=m.available)
            for m in listed
        ])  # fmt: skip

    # --- sessions --------------------------------------------------------------------------------------------
    @router.post("/sessions", response_model=SessionInfo, status_code=201, tags=["sessions"],
                 summary="Open a CT sent as raw voxels",
                 openapi_extra=binary.binary_body("voxels [k, j, i] in C order, little-endian int16 or float32"))
    async def open_volume(
        request: Request,
        shape: str = Query(..., max_length=64, description="array shape 'nk,nj,ni'"),
        spacing: str = Query(..., max_length=128, description="'si,sj,sk' voxel size in mm"),
        origin: str = Query(..., max_length=128, description="'x,y,z' LPS mm of voxel (0,0,0)"),
        dtype: str = Query("int16", pattern="^(int16|float32)$"),
        direction: str | None = Query(None, max_length=512, description="9 values, row-major, columns = i,j,k axes (LPS)"),
        window_level: float | None = None,
        window_width: float | None = None,
    ) -> SessionInfo:
        geometry = _geometry(shape, spacing, origin, direction)
        check_voxels(int(np.prod(geometry.shape_kji)), f"the CT {geometry.shape_kji}")
        window = _window(window_level, window_width)
        voxel = binary.VOXEL_DTYPES[dtype]
        nbytes = int(np.prod(geometry.shape_kji)) * voxel.itemsize
        # room before the upload (no overshoot), held back in the budget while the body arrives: another open, a mask
        # or a cache deciding meanwhile counts it (given back once it has arrived, or not: add() then counts the CT)
        room = state.sessions.make_room(nbytes, reserve=nbytes)
        try:
            await asyncio.wrap_future(room)
            data = await _read_body(request, nbytes, f"a {dtype} CT of shape {list(geometry.shape_kji)}")
        finally:
            state.sessions.unreserve(nbytes)
        array = np.frombuffer(data, dtype=voxel).reshape(geometry.shape_kji)
        if dtype == "float32":
            bad = int(np.count_nonzero(~np.isfinite(array)))
            if bad:
                raise Refused(422, f"the CT has {bad} NaN or infinite voxels; replace them (e.g. with -1024 HU) first")
        volume = CTVolume(array.astype(array.dtype.newbyteorder("="), copy=False), geometry, source="upload")
        return _session_info(state.sessions.add(owner(request), volume, window, config.cache_mb))

    @router.post("/sessions/open-path", response_model=SessionInfo, status_code=201, tags=["sessions"],
                 summary="Open a CT file or DICOM folder on the server's machine")
    async def open_path(request: Request, body: OpenPath) -> SessionInfo:
        path = _check_path(config, body.path)
        what = f"the CT '{body.path}'"
        advice = "Ask for it to be made readable by the server's user, or give another path; then open it again."
        try:
            if not path.exists():
                raise Refused(422, f"CT not found on the server: '{body.path}'")
        except OSError as exc:  # a folder above it that may not be searched
            raise input_file_error(exc, what, advice) from exc
        window = _window(body.window_level, body.window_width)
        try:  # a file unreadable, or vanished between listing and reading its header: the client's, not a bug
            size = await run_in_threadpool(_ct_size, path, body.series_uid, body.allow_non_ct, body.series_number,
                                           body.resample_irregular)
        except OSError as exc:
            raise input_file_error(exc, what, advice) from exc
        reading = 0  # what reading the CT holds: the CT, and read_ct's second copy of it until it returns
        room = None
        if size is not None:
            check_voxels(size.voxels, f"'{body.path}'")
            # held back in the budget from the moment room is made until the CT is read: another open, a mask or a
            # cache deciding meanwhile counts it (given back below, also when reading fails or the client is gone)
            reading = size.ct_bytes + size.reading_bytes
            room = state.sessions.make_room(size.ct_bytes, transient=size.reading_bytes, reserve=reading)
        from ..ct_io import check_hounsfield_units, check_not_label_mask

        try:
            if room is not None:
                await asyncio.wrap_future(room)  # before reading it
            volume = await run_in_threadpool(_read_axial_ct, path, body.series_uid, body.allow_non_ct,
                                             body.series_number, size.dicom_series if size else None,
                                             body.resample_irregular)
        except LiverSAMError:
            raise
        except OSError as exc:
            raise input_file_error(exc, what, advice) from exc
        except (ValueError, RuntimeError) as exc:
            raise InputImageError(f"'{body.path}' cannot be read as a CT: {exc}") from exc
        finally:  # (run_in_threadpool returns, also on a cancelled request, only once read_ct has)
            if reading:
                state.sessions.unreserve(reading)
        if not body.allow_non_ct:
            for check in (check_not_label_mask, check_hounsfield_units):
                await run_in_threadpool(check, volume, "if this really is a CT, send allow_non_ct: true")
        check_voxels(int(volume.array_kji.size), f"'{body.path}'")
        return _session_info(state.sessions.add(owner(request), volume, window, config.cache_mb))

    @router.get("/sessions/{session_id}", response_model=SessionInfo, tags=["sessions"])
    def session_info(request: Request, session_id: str) -> SessionInfo:
        return _session_info(state.sessions.get(session_id, owner(request)))

    @router.delete("/sessions/{session_id}", status_code=204, tags=["sessions"],
                   summary="Close a session: cancel its jobs, free its CT, embeddings and masks")
    async def close_session(request: Request, session_id: str) -> Response:
        await asyncio.wrap_future(state.sessions.remove(session_id, owner(request)))  # freed off the event loop
        return Response(status_code=204)

    @router.put("/sessions/{session_id}/masks/{name}", status_code=204, tags=["sessions"],
                summary="Store a mask [k, j, i] (packed bits or uint8) under a name",
                openapi_extra=binary.binary_body("mask [k, j, i]: numpy.packbits (default) or one uint8 per voxel"))
    async def upload_mask(request: Request, session_id: str, name: str,
                          encoding: str = Query("packbits", pattern="^(packbits|uint8)$")) -> Response:
        session = state.sessions.get(session_id, owner(request))
        if not (0 < len(name) <= 64) or not all(c.isalnum() or c in " _.-" for c in name):
            raise Refused(422, f"mask name '{name[:80]}': use 1-64 letters, digits, space, '_', '.', '-'")
        shape = session.volume.geometry.shape_kji
        what = f"mask '{name}' of session '{session_id}'"
        # room as an open makes it (idle sessions evicted, else 503), before the body is read, and again as it is kept
        await asyncio.wrap_future(state.sessions.make_room_for_masks(session, {name: int(np.prod(shape))}, what))
        data = await _read_body(request, binary.mask_nbytes(shape, encoding), f"a {encoding} mask of shape {list(shape)}")
        mask = binary.unpack_mask(data, shape, encoding)
        del data
        await asyncio.wrap_future(state.sessions.add_masks(session, {name: mask}, what))
        return Response(status_code=204)

    @router.delete("/sessions/{session_id}/masks/{name}", status_code=204, tags=["sessions"],
                   summary="Forget a stored mask (its memory is freed; a job started with it keeps it until it ends)")
    def delete_mask(request: Request, session_id: str, name: str) -> Response:
        session = state.sessions.get(session_id, owner(request))
        if not state.sessions.drop_mask(session, name):
            raise Refused(404, f"mask '{name[:80]}' is not in session '{session_id}' (masks: "
                               f"{', '.join(sorted(session.masks)) or 'none'})")
        return Response(status_code=204)

    @router.post("/sessions/{session_id}/export/dicom-seg", tags=["sessions"], response_class=Response,
                 summary="Session masks as a DICOM SEG referencing the CT's DICOM series (a download)",
                 responses={200: {"content": {"application/dicom": {}}, "description": "the DICOM SEG file"}})
    async def export_dicom_seg(request: Request, session_id: str, body: DicomSegRequest) -> Response:
        from .dicom_export import OWN_SERIES_ADVICE, dicom_seg_bytes, session_reference, session_segments

        session = state.sessions.get(session_id, owner(request))
        segments = session_segments(session, body.segments)
        series_uid = body.series_uid
        if (session.volume.metadata or {}).get("dicom_resampled"):
            raise Refused(422, "this session's CT is an irregular DICOM series resampled onto a regular grid "
                               "(resample_irregular): its slices are not the series' images, so no DICOM SEG can "
                               "reference them. Export the masks as .seg.nrrd or a labelmap instead")
        what, advice = "the DICOM series this session was read from", OWN_SERIES_ADVICE
        if body.reference_dicom is not None:
            reference: str | Path | list[str] = _check_path(config, body.reference_dicom)
            what = f"the reference DICOM '{body.reference_dicom}'"
            advice = ("Ask for it to be made readable by the server's user, or give another reference_dicom; then "
                      "export again. Nothing was written.")
            try:
                if not Path(reference).exists():
                    raise Refused(422, f"reference DICOM folder not found on the server: '{body.reference_dicom}'")
            except OSError as exc:  # a folder above it that may not be searched
                raise input_file_error(exc, what, advice) from exc
        else:
            own = session_reference(session)
            if own is None:
                raise Refused(422, "this session was not read from a DICOM series on the server; give "
                                   "reference_dicom (the CT's DICOM folder on the server) to write a DICOM SEG")
            reference, series_uid = own[0], series_uid or own[1]
        model = state.worker.model  # (the SEG names the model: not by a path of the server's machine)
        model_name = public_model_name(model.name if model is not None else config.model)
        data = await run_in_threadpool(dicom_seg_bytes, session, segments, reference, series_uid, model_name,
                                       body.series_description, what, advice)
        return Response(data, media_type="application/dicom",
                        headers={"Content-Disposition": 'attachment; filename="liversam-seg.dcm"'})

    # --- interactive -----------------------------------------------------------------------------------------
    @router.post("/sessions/{session_id}/predict", tags=["interactive"], response_class=Response,
                 summary="Segment one slice from boxes and points (IJK) -> packed-bit mask [j, i]",
                 responses=binary.binary_answer("mask [j, i], numpy.packbits; X-LiverSAM-Score: the model's IoU"))
    async def predict(request: Request, session_id: str, body: PredictRequest) -> Response:
        session = state.sessions.get(session_id, owner(request))
        prompts = slice_prompts(body, session.volume.geometry)
        prediction = await run_interactive(lambda model: session.predictor(model).predict(body.k, prompts))
        return binary.mask_response(prediction.mask_ji, {"X-LiverSAM-Score": f"{prediction.score:.6f}"})

    @router.post("/sessions/{session_id}/prefetch", response_model=Planned, status_code=202, tags=["interactive"],
                 summary="Encode the slices around k in the background (replaces the previous plan)")
    def prefetch(request: Request, session_id: str, body: PrefetchRequest) -> Planned:
        from ..acceleration.prefetch import neighbour_order

        session = state.sessions.get(session_id, owner(request))
        nk = session.volume.num_slices
        if not 0 <= body.k < nk:
            raise Refused(422, f"prefetch: slice k={body.k} is outside the volume (k 0..{nk - 1})")
        plan = [k for k in neighbour_order(body.k, body.radius, nk) if not session.is_cached(k)]

        def embed(model, k: int) -> None:
            if not session.closed:
                session.predictor(model).embedding(k)

        state.worker.plan_prefetch(session.id, embed, plan)
        return Planned(planned=plan)

    # --- jobs -------------------------------------------------------------------------------------------------
    @router.post("/sessions/{session_id}/jobs/propagate", response_model=JobStatus, status_code=202, tags=["jobs"],
                 summary="Segment (and propagate) segments from their prompts, as `liversam segment` does")
    def start_propagation(request: Request, session_id: str, body: PropagateRequest) -> JobStatus:
        session = state.sessions.get(session_id, owner(request))
        segments = segment_prompts(body.segments, body.coordinate_system, session.volume.geometry, session.masks)
        names = {s.name for s in segments}
        containers = {s.inside: session.masks[s.inside] for s in segments if s.inside and s.inside not in names}
        settings = pipeline_settings(body.settings, segments)
        job = state.jobs.start(session, owner(request), "propagate",
                               lambda job: propagation_work(job, segments, settings, containers))
        return JobStatus(**job.status())

    @router.post("/sessions/{session_id}/jobs/repropagate", response_model=JobStatus, status_code=202, tags=["jobs"],
                 summary="Fix slices with new prompts and re-propagate only what the fix affects")
    def start_repropagation(request: Request, session_id: str, body: RepropagateRequest) -> JobStatus:
        session = state.sessions.get(session_id, owner(request))
        seg = segment_prompts([body.segment.model_copy(update={"inside": None})], body.coordinate_system,
                              session.volume.geometry, session.masks)[0]
        for k in body.fix_slices:
            if k not in seg.slices:
                raise PromptError(f"fix slice k={k} carries none of segment '{seg.name}''s prompts "
                                  f"(prompted slices: {sorted(seg.slices)}); add the fix's prompts to the segment")
        existing_name = body.existing or seg.name
        for what, name in (("existing", existing_name), ("container", body.container)):
            if name is not None and name not in session.masks:
                raise Refused(422, f"{what} mask '{name}' is not in the session (masks: "
                                   f"{', '.join(sorted(session.masks)) or 'none'}); upload it or run a propagation first")
        container = session.masks[body.container] if body.container else None
        existing = session.masks[existing_name]
        if body.settings.crf:
            raise Refused(422, "settings.crf: a re-propagation fixes slices without the dense CRF; run a propagate "
                               "job to refine a segment with it")
        settings = pipeline_settings(body.settings)
        job = state.jobs.start(session, owner(request), "repropagate", lambda job: repropagation_work(
            job, seg, list(body.fix_slices), existing, container, settings))
        return JobStatus(**job.status())

    @router.get("/jobs/{job_id}", response_model=JobStatus, tags=["jobs"])
    def job_status(request: Request, job_id: str) -> JobStatus:
        return JobStatus(**state.jobs.get(job_id, owner(request)).status())

    @router.post("/jobs/{job_id}/cancel", response_model=JobStatus, tags=["jobs"],
                 summary="Cancel a job; a cancelled job writes nothing")
    def cancel_job(request: Request, job_id: str) -> JobStatus:
        job = state.jobs.get(job_id, owner(request))
        state.jobs.cancel(job)
        return JobStatus(**job.status())

    def finished(request: Request, job_id: str):
        job = state.jobs.get(job_id, owner(request))
        if job.released:
            raise Refused(410, f"job '{job_id}' is done, but its result was released to save memory: the server keeps "
                               f"the results of each session's last {state.jobs.keep_results} jobs (fewer, those of replaced "
                               "masks, when its memory budget is full); fetch a result "
                               f"when its job finishes. The masks it wrote are in the session (GET /v1/sessions/"
                               f"{job.session.id}) unless a later job replaced them")
        if job.state != "done" or job.output is None:
            why = {"queued": "is still queued", "running": "is still running", "cancelled": "was cancelled; nothing "
                   "was written", "failed": f"failed: {job.error}"}.get(job.state, job.state)
            raise Refused(409, f"job '{job_id}' {why}; there is no result")
        return job

    @router.get("/jobs/{job_id}/result", response_model=JobResult, tags=["jobs"],
                summary="Segments, review report and lesion table of a finished job (masks: see /masks)")
    def job_result(request: Request, job_id: str) -> JobResult:
        job = finished(request, job_id)
        out = job.output
        voxel_ml = out.result.geometry.voxel_volume_mm3 / 1000.0
        segments = [{"name": s.name, "label": s.label, "color": list(s.color), "voxels": int(s.mask_kji.sum()),
                     "volume_ml": round(float(s.mask_kji.sum()) * voxel_ml, 3),
                     "computed_slices": out.computed.get(s.name, [])} for s in out.result.segments]
        labelmap_dtype = "uint8" if max((s.label for s in out.result.segments), default=0) < 256 else "uint16"
        return JobResult(job_id=job.id, segments=segments, review=out.review, lesions=out.lesions,
                         labelmap_dtype=labelmap_dtype)

    @router.get("/jobs/{job_id}/masks/{segment}", tags=["jobs"], response_class=Response,
                responses=binary.binary_answer("mask [k, j, i], numpy.packbits"))
    def job_mask(request: Request, job_id: str, segment: str) -> Response:
        job = finished(request, job_id)
        try:
            return binary.mask_response(job.output.result.segment(segment).mask_kji)
        except KeyError:
            names = ", ".join(s.name for s in job.output.result.segments)
            raise Refused(404, f"job '{job_id}' has no segment '{segment[:64]}' (segments: {names})") from None

    @router.get("/jobs/{job_id}/labelmap", tags=["jobs"], response_class=Response,
                responses=binary.binary_answer("labelmap [k, j, i], uint8 or uint16 (X-LiverSAM-Dtype)"))
    def job_labelmap(request: Request, job_id: str) -> Response:
        return binary.array_response(finished(request, job_id).output.result.to_labelmap())

    return router


__all__ = ["ServerState", "create_app"]
