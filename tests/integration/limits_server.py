"""Serve the API as ``prop-stream serve`` configures uvicorn, without an evaluator.

``python tests/integration/limits_server.py PORT``: the app of
:func:`api.main.create_app` (settings from ``PROP_STREAM_API_*``) under
``uvicorn.Config(..., **api.limits.uvicorn_options(settings))``, the one call the
composition root (``api/serve.py``) makes. The HTTP limit tests measure this
process alone (its memory, its connections), with no evaluator loop beside it.
"""

from __future__ import annotations

import sys

import uvicorn

from api.core.config import get_settings
from api.limits import uvicorn_options
from api.main import create_app


def main(port: int) -> None:
    """Serve on 127.0.0.1:``port`` until SIGINT/SIGTERM."""
    settings = get_settings()
    config = uvicorn.Config(
        create_app(settings=settings),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
        lifespan="on",
        **uvicorn_options(settings),
    )
    uvicorn.Server(config).run()


if __name__ == "__main__":
    main(int(sys.argv[1]))
