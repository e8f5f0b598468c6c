"""Runs the API under uvicorn (uvloop, HTTP/1.1 via httptools when installed, else h11)."""

from __future__ import annotations

import logging

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
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # Quiet by default; an access log would hold paths (codes), never tokens.
        access_log=False,
        log_level=settings.base.log_level.lower(),
        server_header=False,
    )
