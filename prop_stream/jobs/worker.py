"""The job worker: the outbox's fee withdrawals, deposits and refunds, each once.

It sits beside the evaluator, above the store (``prop_stream.jobs`` imports
``prop_stream.store``, never the other way). The service runs it in a thread::

    worker = JobWorker(cursor(conn), phases=loop, on_change=refresh)
    thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)

Each job is applied by :func:`prop_stream.store.job_worker.apply_job` in one
transaction: the balance update, the ledger row keyed by the job id and the job's
``done`` mark commit together. A worker that dies before the commit leaves the
job pending and the money where it was; the next run applies it once. A ledger row
that exists already (however it got there) makes the job a no-op that is only
marked. DuckDB conflicts (the API cancelling the same purchase, a purchase on the
same payer) roll the attempt back and retry it.

After a commit the worker tells the engine to stop judging the phases of a
cancelled challenge (``phases.remove_phase``) and reports the challenges that
changed (``on_change``, e.g. the API's ``RuntimeCache.refresh``).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from prop_stream.store.db import Connection, run_in_transaction, transaction
from prop_stream.store.job_worker import activate_purchases, apply_job
from prop_stream.store.jobs import Job, JobOutcome, pending_jobs, record_attempt
from prop_stream.store.lifecycle import PhaseRegistry

logger = logging.getLogger(__name__)

#: Seconds between two looks at the outbox when it was empty.
DEFAULT_POLL_INTERVAL_S: Final = 0.2


@dataclass(slots=True)
class WorkerStats:
    """Counters of a worker since it started.

    Attributes:
        applied: Jobs whose money moved.
        already_applied: Jobs found in the ledger and only marked.
        failed: Jobs that failed (a withdrawal without money).
        cancelled: Jobs dropped because their purchase or challenge had ended.
        deferred: Deposits put off until their fee is paid.
        errors: Attempts that raised (retried later).
        activated: Purchases moved to ``active``.
    """

    applied: int = 0
    already_applied: int = 0
    failed: int = 0
    cancelled: int = 0
    deferred: int = 0
    errors: int = 0
    activated: int = 0


class JobWorker:
    """Carries out pending outbox jobs.

    Args:
        conn: A store cursor of its own (``store.cursor(conn)``).
        phases: The running engine (``EvaluatorLoop``), told to drop the phases
            of challenges a failed payment cancelled; None when none runs.
        on_change: Called with the ids of challenges whose state changed, after
            the commit (e.g. ``RuntimeCache.refresh``).
        poll_interval_s: Wait between looks at an empty outbox.
        batch_size: Jobs taken per look.
        fault_hook: Tests only: called inside a job's transaction after its money
            moved and before the commit (to kill the worker right there).
        stats: The counters to add to (a supervisor hands each rebuilt worker
            the same one); a new one if None.
        transient: Says whether an error is transient (the supervisor's
            classifier): such an error is raised to the caller, which retries the
            whole worker with a backoff, instead of being recorded against the
            job (a full disk is no fault of the job's).
    """

    def __init__(
        self,
        conn: Connection,
        *,
        phases: PhaseRegistry | None = None,
        on_change: Callable[[Sequence[int]], object] | None = None,
        poll_interval_s: float = DEFAULT_POLL_INTERVAL_S,
        batch_size: int = 100,
        fault_hook: Callable[[Job], object] | None = None,
        stats: WorkerStats | None = None,
        transient: Callable[[BaseException], str | None] | None = None,
    ) -> None:
        self._conn = conn
        self._phases = phases
        self._on_change = on_change
        self._interval = poll_interval_s
        self._batch = batch_size
        self._fault_hook = fault_hook
        self._stop = threading.Event()
        self.stats = stats if stats is not None else WorkerStats()
        self._transient = transient
        #: The exception that ended :meth:`run`, if one did.
        self.error: BaseException | None = None

    def stop(self) -> None:
        """Ask :meth:`run` to return after the current job."""
        self._stop.set()

    def run(self, stop: threading.Event | None = None) -> WorkerStats:
        """Work until ``stop`` (or :meth:`stop`) is set.

        Args:
            stop: Ends the loop when set.

        Returns:
            The counters.
        """
        try:
            while not self._stop.is_set() and not (stop is not None and stop.is_set()):
                if self.run_once() == 0:
                    (stop or self._stop).wait(self._interval)
        except BaseException as exc:
            self.error = exc
            raise
        return self.stats

    def run_once(self) -> int:
        """Apply every job pending now (one batch), then activate purchases.

        Returns:
            How many jobs changed state (0: nothing to do).
        """
        changed: set[int] = set()
        done = 0
        for job in pending_jobs(self._conn, limit=self._batch):
            if self._stop.is_set():
                break
            outcome = self._one(job)
            if outcome is None:
                continue
            if outcome.result != "deferred":
                done += 1
            changed.update(outcome.challenge_ids)
            for account_id in outcome.removed_accounts:
                if self._phases is not None:
                    self._phases.remove_phase(account_id)
        activated = run_in_transaction(
            self._conn,
            lambda c: activate_purchases(c, now=datetime.now(UTC)),
        )
        self.stats.activated += len(activated)
        if changed and self._on_change is not None:
            try:
                self._on_change(sorted(changed))
            except Exception:
                logger.exception("jobs: on_change failed")
        return done + len(activated)

    def _one(self, job: Job) -> JobOutcome | None:
        def work(conn: Connection) -> JobOutcome:
            outcome = apply_job(conn, job_id=job.id, now=datetime.now(UTC))
            if self._fault_hook is not None and outcome.result in ("applied", "failed"):
                self._fault_hook(job)
            return outcome

        try:
            outcome = run_in_transaction(self._conn, work)
        except Exception as exc:
            self.stats.errors += 1
            if self._transient is not None and self._transient(exc) is not None:
                raise
            logger.warning("jobs: job %d (%s) failed: %s", job.id, job.kind, exc)
            try:
                with transaction(self._conn):
                    record_attempt(
                        self._conn, job_id=job.id, error=str(exc), now=datetime.now(UTC)
                    )
            except Exception:
                logger.exception("jobs: could not record the attempt of job %d", job.id)
            return None
        stats = self.stats
        match outcome.result:
            case "applied":
                stats.applied += 1
            case "already_applied":
                stats.already_applied += 1
            case "failed":
                stats.failed += 1
            case "cancelled":
                stats.cancelled += 1
            case "deferred":
                stats.deferred += 1
        return outcome
