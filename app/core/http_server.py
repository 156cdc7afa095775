"""The HTTP server the service runs under: uvicorn, configured from the Settings. `run.py`, the
tests' live servers and the benchmark all start it from here, so what they run is what is
deployed."""

from typing import Any

import uvicorn

from app.core.config import Settings


def server_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """`app`: the ASGI app or its import string. `overrides`: more uvicorn.Config arguments."""
    options: dict[str, Any] = {
        "host": settings.HOST,
        "port": settings.PORT,
        "log_level": settings.LOG_LEVEL.lower(),
        # uvicorn believes X-Forwarded-For from loopback unless told otherwise: a client on
        # this host could then say it is anyone. Only the configured proxies are believed.
        "proxy_headers": bool(settings.FORWARDED_ALLOW_IPS),
        "forwarded_allow_ips": settings.FORWARDED_ALLOW_IPS or [],
        **overrides,
    }
    return uvicorn.Config(app, **options)
