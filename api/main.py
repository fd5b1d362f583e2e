"""The FastAPI application: :func:`create_app` and its lifespan.

Examples:
    Serve the API alone on a database made by ``prop-stream init --demo``::

        PROP_STREAM_API_DB=demo.duckdb uvicorn --factory api.main:create_app

    ``prop-stream serve`` builds it with the service's connection, the evaluator
    loop's latest metrics and its readiness::

        app = create_app(
            settings=settings,
            conn=conn,
            metrics=loop.metrics,
            evaluator_ready=loop.ready.is_set,
        )
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from api import errors
from api.cache import RuntimeCache
from api.core.config import ApiSettings, get_settings
from api.core.security import SessionCache
from api.db import Database
from api.deps import AppState
from api.hot import HotReads
from api.limits import BodyLimit, public_routes
from api.routes import admin, challenges, health, programs, purchase
from api.telemetry import RequestTelemetry
from prop_stream.evaluator import LatestMetrics
from prop_stream.store import Connection, PhaseRegistry, connect, is_postgres
from prop_stream.supervisor import Supervisor
from prop_stream.telemetry import ServiceMetrics

logger = logging.getLogger(__name__)

TITLE = "prop-stream"


def create_app(
    *,
    settings: ApiSettings | None = None,
    conn: Connection | None = None,
    metrics: LatestMetrics | None = None,
    evaluator_ready: Callable[[], bool] | None = None,
    phases: PhaseRegistry | None = None,
    checks: Callable[[], Mapping[str, str]] | None = None,
    telemetry: ServiceMetrics | None = None,
    supervisor: Supervisor | None = None,
    admin_token: str | None = None,
    api_routes: bool = True,
) -> FastAPI:
    """Build the API.

    Long-lived resources are made in the lifespan, not here: the database is
    opened (unless ``conn`` is given), the runtime cache loaded, and a task keeps
    the cache in sync with the store.

    Args:
        settings: The settings (default: :func:`get_settings`, from the
            environment); routes read them from ``app.state.settings``.
        conn: An open store connection to use (``serve`` passes the service's);
            the API borrows cursors from it and never closes it. Without one the
            lifespan opens ``settings.db`` and closes it at shutdown.
        metrics: The latest metrics an evaluator loop keeps current
            (``EvaluatorLoop.metrics``). Without one the API loads its own from
            ``metrics_latest`` at start-up.
        evaluator_ready: Whether the evaluator runs, for ``/readyz`` (e.g.
            ``loop.ready.is_set``); None when this process runs no evaluator.
        phases: The running engine (``serve`` passes the loop): purchases
            register their first phase with it after the commit, cancels remove
            it. None when this process runs no evaluator.
        checks: The process's readiness by part for ``/readyz``
            (``Supervisor.checks``); without it ``evaluator_ready`` decides.
        telemetry: The process's metrics for ``/metrics`` (a new one if None:
            HTTP metrics only).
        supervisor: Owns the cache sync as a component (``cache``) when given;
            without one an asyncio task keeps the cache in sync.
        admin_token: Enables the admin routes (``/admin/...``) for this token.
        api_routes: Serve the API; False serves ``/healthz``, ``/readyz`` and
            ``/metrics`` only, with no runtime cache (``serve --role
            evaluator|jobs``).

    Returns:
        The application.
    """

    def current_settings() -> ApiSettings:
        return settings if settings is not None else get_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        config = current_settings()
        owned = conn is None
        db = Database(conn if conn is not None else connect(config.db), owned=owned)
        # On PostgreSQL metrics_latest is where the evaluators of other
        # processes commit (the `api` role; the other members of a group): the
        # cache reads their rows from the metric feed, from its first load on.
        with db.cursor() as cur:
            shared = is_postgres(cur)
        latest = metrics
        if latest is None:
            latest = LatestMetrics()
            if not shared:
                with db.cursor() as cur:
                    latest.load(cur)
        cache = RuntimeCache(db, latest, reload_metrics=shared)
        loaded = cache.load() if api_routes else 0
        app.state.runtime = AppState(
            db=db,
            cache=cache,
            sessions=SessionCache(
                ttl_s=config.session_cache_ttl_s,
                negative_ttl_s=config.session_negative_ttl_s,
                max_size=config.session_cache_size,
            ),
            evaluator_ready=evaluator_ready,
            telemetry=metrics_of_app,
            phases=phases,
            checks=checks,
            admin_token=admin_token,
        )
        logger.info(
            "api: %d challenges, %d latest metrics in memory", loaded, len(latest)
        )
        interval = config.cache_sync_interval_s
        sync: asyncio.Task[None] | None = None
        sync_lock = threading.Lock()
        if not api_routes:
            pass  # the probes read no cache: nothing to keep in sync
        elif supervisor is not None and interval > 0:
            supervisor.add("cache", lambda: CacheSync(cache, interval), start=True)
        else:
            sync = asyncio.create_task(_sync_forever(cache, interval, sync_lock))
        try:
            yield
        finally:
            if sync is not None:
                sync.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sync
                # A cancelled task leaves its thread running: wait for a sync
                # in flight before the database closes under it.
                await asyncio.to_thread(sync_lock.acquire)
            elif supervisor is not None:
                await asyncio.to_thread(supervisor.remove, "cache")
            app.state.runtime = None
            cache.close()
            db.close()

    config = current_settings()
    metrics_of_app = telemetry if telemetry is not None else ServiceMetrics()
    app = FastAPI(
        title=TITLE,
        summary="Runtime endpoints of prop-trading challenges for the terminal.",
        lifespan=lifespan,
        docs_url="/docs" if config.docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if config.docs else None,
        # Starlette's trailing-slash redirect builds an absolute URL from the
        # Host header: a path with a stray slash is a 404 instead.
        redirect_slashes=False,
    )
    # Settings live on the app, not in ``dependency_overrides``: any override
    # makes FastAPI rebuild every dependency's signature on every request, which
    # halved the hot route's throughput (docs/benchmarks.md, "Runtime API").
    app.state.settings = config
    errors.install(app)
    routers = (
        (
            health.router,
            admin.router,
            programs.router,
            challenges.router,
            purchase.router,
            purchase.payers_router,
        )
        if api_routes
        else (health.router,)
    )
    for router in routers:
        app.include_router(router)
    # The body limit and the session before any body (api/limits.py); a request
    # without a body costs it one header scan.
    app.add_middleware(
        BodyLimit,
        max_body_bytes=config.max_body_bytes,
        public_routes=public_routes(
            [*app.router.routes, *(r for router in routers for r in router.routes)]
        ),
    )
    # GET /prop/challenges/{id} answered from memory before anything but the
    # telemetry (api/hot.py); everything it can't answer, a request with a
    # body included, goes on unchanged.
    if config.hot_reads and api_routes:
        app.add_middleware(HotReads)
    # Added last, so outermost: it sees every answer, hot reads included.
    app.add_middleware(
        RequestTelemetry, metrics=metrics_of_app, access_log_enabled=config.access_log
    )
    return app


class CacheSync:
    """The runtime cache's sync with the store, as a supervised component.

    Args:
        cache: The cache.
        interval: Seconds between two syncs.
    """

    def __init__(self, cache: RuntimeCache, interval: float) -> None:
        self._cache = cache
        self._interval = interval
        self._stop = threading.Event()

    def run(self, stop: threading.Event) -> None:
        """Sync every ``interval`` seconds until stopped; a fault is raised."""
        while not (stop.wait(self._interval) or self._stop.is_set()):
            self._cache.sync()

    def stop(self) -> None:
        """Return from :meth:`run` soon."""
        self._stop.set()


async def _sync_forever(
    cache: RuntimeCache, interval: float, lock: threading.Lock
) -> None:
    if interval <= 0:
        return

    def sync() -> None:
        with lock:
            cache.sync()

    while True:
        await asyncio.sleep(interval)
        try:
            await asyncio.to_thread(sync)
        except Exception:
            logger.exception("api: runtime cache sync failed")
