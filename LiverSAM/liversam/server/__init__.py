"""``liversam serve``: the LiverSAM core behind an HTTP API (FastAPI + uvicorn) for every front end.

One process holds the model (loaded on first use), the embedding caches and one session per CT; one
inference thread runs every model call (interactive predictions first, then jobs, then background
pre-encoding). See docs/SERVER.md for the API and the security model. Nothing here runs at import.

- :mod:`.config`   - :class:`ServerConfig` (limits, tokens, model) and token helpers
- :mod:`.security` - bearer-token and body-size middleware
- :mod:`.binary`   - masks and volumes on the wire (packed bits, raw voxels)
- :mod:`.schemas`  - the pydantic request / answer models (the OpenAPI schema)
- :mod:`.worker`   - the inference thread that owns the model
- :mod:`.sessions` - bounded (in number and memory), owned, expiring CT sessions, freed on a release thread
- :mod:`.memory`   - the sessions' memory budget: its default from the machine's memory, what a session holds
- :mod:`.budgeted_cache` - a session's embedding cache that keeps within that budget
- :mod:`.jobs`     - propagation and re-propagation jobs (progress, cancel) on the core pipeline
- :mod:`.app`      - ``create_app(config)``: the FastAPI application
"""

from __future__ import annotations

__all__ = ["ServerConfig", "create_app"]


def __getattr__(name: str):  # lazy: importing the package imports neither FastAPI nor torch
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(name)
