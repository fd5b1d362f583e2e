"""One supervisor owns the service's long-running components.

A *component* (the evaluator loop, the outbox job worker, the API's cache sync,
the risk mirror) runs in a thread of its own. The supervisor builds it through a
factory, runs it, and decides what happens when it raises:

- a **transient** fault (the classifier names a reason: disk full, database
  locked, broker away, topic missing, connection lost) is retried: one log line
  per retry, an exponential backoff (``initial_backoff_s`` doubling up to
  ``max_backoff_s``), a *fresh* component from the factory each time (the
  evaluator rebuilds its engine from the store's checkpoint and replays, so a
  batch that failed to commit is judged again, once), and ``/readyz`` naming the
  component and the reason until the new one says it is ready;
- anything else is **fatal**: it is logged once with its traceback,
  ``on_fatal`` is called (``serve`` stops its HTTP server, so no purchase is
  taken with a dead component) and, should the process not have exited
  ``fatal_exit_s`` seconds later, it is ended with exit status
  :data:`EXIT_FATAL` so that a process manager restarts it.

``/readyz`` and ``/metrics`` read :meth:`Supervisor.not_ready` and
:meth:`Supervisor.restarts` (``docs/operations.md``).

Examples:
    >>> sup = Supervisor(classify=transient_reason, on_fatal=server_exit)
    >>> sup.add("jobs", lambda: JobWorker(cursor(conn)))
    >>> sup.start()
    >>> sup.not_ready()      # {} when every component runs
    >>> sup.stop(timeout_s=60)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final, Protocol, runtime_checkable

logger = logging.getLogger(__name__)

#: The exit status of a process ended because a component died for good.
EXIT_FATAL: Final = 1
#: A component that ran this long before it failed starts its backoff afresh.
HEALTHY_RUN_S: Final = 60.0


@runtime_checkable
class Component(Protocol):
    """What the supervisor runs: a blocking ``run`` and a ``stop`` from outside."""

    def run(self, stop: threading.Event) -> object:
        """Work until ``stop`` is set; raise on a fault."""

    def stop(self) -> None:
        """Ask :meth:`run` to return soon (called from another thread)."""


@runtime_checkable
class Readiness(Protocol):
    """A component that can say whether it is doing its job yet."""

    def not_ready(self) -> Mapping[str, str]:
        """What is not ready (``{"kafka": "no broker ..."}``); empty when all is."""


Classifier = Callable[[BaseException], "str | None"]


@dataclass(slots=True)
class _Slot:
    name: str
    factory: Callable[[], Component]
    current: Component | None = None
    thread: threading.Thread | None = None
    fault: str | None = None
    retries: int = 0
    restarts: int = 0
    dead: str | None = None
    started_at: float = 0.0
    stopping: threading.Event = field(default_factory=threading.Event)


class Supervisor:
    """Runs components in threads; retries transient faults, ends the process on others.

    Args:
        classify: Returns a short reason when an exception is transient (worth a
            retry), None when it is fatal.
        on_fatal: Called once, from the dying component's thread, when a
            component failed for good (e.g. ``server.should_exit = True``).
        initial_backoff_s: The first retry's delay.
        max_backoff_s: The longest delay between two retries.
        fatal_exit_s: After a fatal fault, how long the process may take to exit
            on its own before :func:`os._exit` ends it (None: never force it).
    """

    def __init__(
        self,
        *,
        classify: Classifier,
        on_fatal: Callable[[], object] | None = None,
        initial_backoff_s: float = 0.5,
        max_backoff_s: float = 30.0,
        fatal_exit_s: float | None = 8.0,
    ) -> None:
        self._classify = classify
        self._on_fatal = on_fatal
        self._initial = initial_backoff_s
        self._max = max_backoff_s
        self._fatal_exit_s = fatal_exit_s
        self._slots: dict[str, _Slot] = {}
        self._fatal_lock = threading.Lock()
        #: ``(component, exception)`` of the first fatal fault, if one happened.
        self.fatal: tuple[str, BaseException] | None = None

    # --------------------------------------------------------------- set-up

    def add(
        self, name: str, factory: Callable[[], Component], *, start: bool = False
    ) -> None:
        """Own a component from now on.

        Args:
            name: The component's name in logs, ``/readyz`` and ``/metrics``.
            factory: Builds a fresh component (called at start and per retry).
            start: Start it now (for components added after :meth:`start`).
        """
        if name in self._slots:
            raise ValueError(f"a component named {name!r} is supervised already")
        slot = _Slot(name, factory)
        self._slots[name] = slot
        if start:
            self._launch(slot)

    def start(self) -> None:
        """Start every component added so far."""
        for slot in self._slots.values():
            if slot.thread is None:
                self._launch(slot)

    def component(self, name: str) -> Component | None:
        """The component running under ``name`` now (None between two runs)."""
        slot = self._slots.get(name)
        return slot.current if slot is not None else None

    # --------------------------------------------------------------- reading

    def checks(self) -> dict[str, str]:
        """Each component's state for ``/readyz``: ``"ok"`` or why it is not ready.

        A component is not ready while it waits for a retry (the fault's
        reason), before it first says it is ready (``starting``), and after a
        fatal fault. A running component that implements :class:`Readiness`
        names its own problems (the evaluator's ``kafka`` or ``topic``).
        """
        out: dict[str, str] = {}
        for slot in self._slots.values():
            if slot.dead is not None:
                out[slot.name] = slot.dead
                continue
            if slot.fault is not None:
                out[slot.name] = slot.fault
                continue
            current = slot.current
            if current is None:
                out[slot.name] = "starting"
                continue
            out[slot.name] = "ok"
            if isinstance(current, Readiness):
                try:
                    out.update(current.not_ready())
                except Exception as exc:  # a failing probe means "not ready"
                    out[slot.name] = f"readiness probe failed: {exc}"
        return out

    def not_ready(self) -> dict[str, str]:
        """The entries of :meth:`checks` that are not ``"ok"``."""
        return {name: why for name, why in self.checks().items() if why != "ok"}

    def restarts(self) -> dict[str, int]:
        """How many times each component was rebuilt after a transient fault."""
        return {slot.name: slot.restarts for slot in self._slots.values()}

    # --------------------------------------------------------------- stopping

    def stop(self, timeout_s: float = 60.0) -> None:
        """Ask every component to stop and wait for their threads.

        Args:
            timeout_s: The longest wait for all of them together.
        """
        slots = list(self._slots.values())
        for slot in slots:
            self._signal_stop(slot)
        deadline = time.monotonic() + timeout_s
        for slot in slots:
            self._join(slot, deadline)

    def remove(self, name: str, timeout_s: float = 10.0) -> None:
        """Stop one component, wait for it and forget it (e.g. at an app's shutdown).

        Args:
            name: The component.
            timeout_s: The longest wait for its thread.
        """
        slot = self._slots.pop(name, None)
        if slot is None:
            return
        self._signal_stop(slot)
        self._join(slot, time.monotonic() + timeout_s)

    def _signal_stop(self, slot: _Slot) -> None:
        slot.stopping.set()
        current = slot.current
        if current is not None:
            try:
                current.stop()
            except Exception:  # stopping one must not keep the rest running
                logger.exception("%s: stop failed", slot.name)

    @staticmethod
    def _join(slot: _Slot, deadline: float) -> None:
        if slot.thread is None or slot.thread is threading.current_thread():
            return
        slot.thread.join(max(0.0, deadline - time.monotonic()))
        if slot.thread.is_alive():
            logger.warning("%s: still running after the stop timeout", slot.name)

    # --------------------------------------------------------------- internals

    def _launch(self, slot: _Slot) -> None:
        slot.thread = threading.Thread(
            target=self._supervise,
            args=(slot,),
            name=f"prop-stream-{slot.name}",
            daemon=True,
        )
        slot.thread.start()

    def _supervise(self, slot: _Slot) -> None:
        delay = self._initial
        while not slot.stopping.is_set():
            slot.started_at = time.monotonic()
            try:
                slot.current = slot.factory()
                # A fault is over once a fresh component is built; readiness
                # (starting, kafka, topic, ...) is the component's to say now.
                if slot.fault is not None:
                    logger.info(
                        "%s: running again after %d %s",
                        slot.name,
                        slot.retries,
                        "retry" if slot.retries == 1 else "retries",
                    )
                slot.fault = None
                slot.current.run(slot.stopping)
            except BaseException as exc:
                reason = self._classify(exc) if isinstance(exc, Exception) else None
                if reason is None:
                    self._die(slot, exc)
                    return
                if slot.stopping.is_set():
                    return
                if time.monotonic() - slot.started_at >= HEALTHY_RUN_S:
                    delay = self._initial
                slot.retries += 1
                slot.restarts += 1
                slot.fault = reason
                logger.warning(
                    "%s: %s; retry %d in %.1f s", slot.name, reason, slot.retries, delay
                )
                self._retire(slot)
                if slot.stopping.wait(delay):
                    return
                delay = min(self._max, delay * 2)
                continue
            return

    def _retire(self, slot: _Slot) -> None:
        current, slot.current = slot.current, None
        if current is not None:
            try:
                current.stop()
            except Exception:  # a broken component may fail to stop; it's gone
                logger.debug("%s: stop after a fault failed", slot.name, exc_info=True)

    def _die(self, slot: _Slot, exc: BaseException) -> None:
        slot.dead = f"failed: {type(exc).__name__}: {exc}"
        logger.critical(
            "%s: failed and will not be retried; the process exits",
            slot.name,
            exc_info=(type(exc), exc, exc.__traceback__),
        )
        self._retire(slot)
        with self._fatal_lock:
            first = self.fatal is None
            if first:
                self.fatal = (slot.name, exc)
        if not first:
            return
        if self._on_fatal is not None:
            try:
                self._on_fatal()
            except Exception:
                logger.exception("on_fatal failed")
        if self._fatal_exit_s is not None:
            timer = threading.Timer(self._fatal_exit_s, _force_exit)
            timer.daemon = True
            timer.start()


def _force_exit() -> None:
    logger.critical("the process did not stop in time after a fatal fault; exiting")
    logging.shutdown()
    os._exit(EXIT_FATAL)
