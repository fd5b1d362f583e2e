"""Settings of the HTTP API.

:class:`ApiSettings` is read from ``PROP_STREAM_API_`` variables through
:func:`get_settings`, read once; tests and ``serve`` pass settings to
:func:`api.main.create_app`, which keeps them on ``app.state.settings`` (routes
read them through ``api.deps.SettingsDep``). There is no module-level instance.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from prop_stream.config import DbTarget

Environment = Literal["development", "test", "production"]


class ApiSettings(BaseSettings):
    """How the API runs.

    Attributes:
        db: The DuckDB file or ``postgresql://`` URL, opened in the lifespan
            when the app is not handed a connection (``serve`` hands it the
            service's).
        environment: ``development``, ``test`` or ``production``.
        session_cache_ttl_s: How long a looked-up session is trusted from memory
            before the database is asked again (never past its expiry). A deleted
            session keeps working for at most this long on a running server.
        session_negative_ttl_s: How long an unknown token is remembered as
            unknown (bounds the database lookups a flood of bad tokens causes).
        session_cache_size: Most sessions (known and unknown) kept in memory.
        cache_sync_interval_s: Seconds between two checks of the store for
            challenges changed by writers that don't refresh the runtime cache
            themselves (0 turns the check off).
        docs: Serve the OpenAPI document and ``/docs``.
        hot_reads: Answer ``GET /prop/challenges/{id}`` from memory ahead of
            FastAPI's routing when it can (``api/hot.py``); off, the route
            answers every request (same answers, about a third of the rate).
        access_log: Write one access-log line per request (``prop_stream.access``).
        max_body_bytes: The largest request body accepted; a larger one is
            refused with ``413`` while it is read (``api/limits.py``).
        request_deadline_s: Seconds a request may take to arrive whole
            (headers and body) from its first byte; a slower client is
            disconnected. Enforced by the server protocol of
            :func:`api.limits.uvicorn_options`.
        max_header_bytes: The most bytes of a request's headers (``431``).
    """

    model_config = SettingsConfigDict(
        env_prefix="PROP_STREAM_API_", frozen=True, extra="forbid"
    )

    db: DbTarget = Path("prop-stream.duckdb")
    environment: Environment = "development"
    session_cache_ttl_s: float = Field(default=60.0, ge=0)
    session_negative_ttl_s: float = Field(default=5.0, ge=0)
    session_cache_size: int = Field(default=100_000, gt=0)
    cache_sync_interval_s: float = Field(default=2.0, ge=0)
    docs: bool = True
    hot_reads: bool = True
    access_log: bool = True
    max_body_bytes: int = Field(default=1024 * 1024, gt=0)
    request_deadline_s: float = Field(default=30.0, gt=0)
    max_header_bytes: int = Field(default=64 * 1024, ge=1024)


@lru_cache
def get_settings() -> ApiSettings:
    """The API settings from the environment, read once.

    Returns:
        The settings.
    """
    return ApiSettings()
