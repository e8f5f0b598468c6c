"""Runs the API under uvicorn (uvloop, HTTP/1.1 via httptools when installed, else h11)."""

from __future__ import annotations

import logging
from typing import Any

import uvicorn

from api.app import create_app
from api.config import ApiSettings


def serve(settings: ApiSettings | None = None) -> None:
    settings = settings or ApiSettings()
    settings.base.require_kafka()
    logging.basicConfig(
        level=settings.base.log_level.upper(),
        format='{"time":"%(asctime)s","level":"%(levelname)s","logger":"%(name)s","msg":"%(message)s"}',
    )
    # Several workers need the app by name, each process builds its own from the environment.
    app: Any = create_app(settings) if settings.workers == 1 else "api.app:create_app"
    uvicorn.run(
        app,
        factory=settings.workers > 1,
        workers=settings.workers,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # Quiet by default; an access log would hold paths (codes), never tokens.
        access_log=False,
        log_level=settings.base.log_level.lower(),
        server_header=False,
    )
