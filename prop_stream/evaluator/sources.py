"""Where the evaluator's ticks come from: the :class:`TickSource` interface.

A source hands out batches of ticks in the engine's schema with the position after
each batch, and can be moved back to a position it handed out (a restart replays
from the last engine checkpoint). Sources that make up ticks for the phases being
judged (the demo simulator) also hear about phases coming and going; others ignore
that.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from typing import Final

import polars as pl

from prop_stream.rules import TICK_SCHEMA, PhaseSpec
from prop_stream.store.progress import Position

#: An empty batch in the engine's schema.
EMPTY_TICKS: Final = pl.DataFrame(schema=TICK_SCHEMA)


class TickSource(ABC):
    """A stream of equity ticks with replayable positions."""

    #: The name positions and checkpoints are saved under.
    name: str = "source"

    @abstractmethod
    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        """Wait up to ``timeout`` seconds for up to ``max_records`` ticks.

        Args:
            max_records: Most ticks to return.
            timeout: Longest wait, in seconds.

        Returns:
            The ticks (possibly none) in the engine's schema, in delivery order,
            and the position after them.
        """

    @abstractmethod
    def seek(self, position: Position) -> None:
        """Resume from a position :meth:`poll` returned earlier.

        An empty position means the source's own start.
        """

    def start(self) -> None:  # noqa: B027 - optional hook
        """Fix where a fresh source begins (called before its first checkpoint)."""

    @abstractmethod
    def position(self) -> Position:
        """The position of the next tick :meth:`poll` would return."""

    def deals(self) -> pl.DataFrame | None:
        """The deals of the batch :meth:`poll` just returned; None when none.

        Deals are the second event kind of an account's stream (``rules.md``,
        "Deal rules"); they go to the engine with the batch's ticks. Sources
        without deals keep this default.

        Returns:
            The deal columns (``interfaces.md`` section 5) plus ``before_tick``
            (Int64): the deal was delivered before that row of the batch's
            ticks (non-decreasing; equal values keep the frame's order).
        """
        return None

    def unseen(
        self, ticks: pl.DataFrame, *, before: Position, committed: Position
    ) -> pl.DataFrame:
        """The ticks of the batch just polled that lie at or after ``committed``.

        A restart replays the batches between its engine checkpoint and the
        store's committed position; their ticks are in the tick archive already,
        so the loop archives only what this returns (``docs/store.md``, "The
        tick archive").

        The default suits sources whose replays hand out the very batches they
        handed out before (the demo): a batch polled from at or after
        ``committed`` is kept whole, any other is dropped whole. Sources whose
        batches may be cut differently on a replay (Kafka) look at each tick.

        Args:
            ticks: The batch :meth:`poll` just returned.
            before: The position :meth:`poll` started from.
            committed: The store's committed position.

        Returns:
            The rows of ``ticks`` the store has not committed, in order.
        """
        if reached(before, committed):
            return ticks
        return ticks.clear()

    def unseen_deals(
        self, deals: pl.DataFrame, *, before: Position, committed: Position
    ) -> pl.DataFrame:
        """The deals of the batch just polled that lie at or after ``committed``.

        :meth:`unseen` for the batch's deals (:meth:`deals`), with the same
        default: the whole batch or nothing.

        Args:
            deals: The deals of the batch :meth:`poll` just returned.
            before: The position :meth:`poll` started from.
            committed: The store's committed position.

        Returns:
            The rows of ``deals`` the store has not committed, in order.
        """
        if reached(before, committed):
            return deals
        return deals.clear()

    def healthy(self) -> bool:
        """Whether the source can deliver ticks now (``/readyz``); True by default."""
        return True

    def not_ready(self) -> dict[str, str]:
        """What keeps the source from delivering ticks, by name (``/readyz``).

        Returns:
            Empty when :meth:`healthy`, else ``{"source": "not healthy"}``;
            sources that know more (Kafka: ``kafka``, ``topic``) say more.
        """
        return {} if self.healthy() else {"source": f"{self.name} not healthy"}

    def track(self, spec: PhaseSpec) -> None:  # noqa: B027 - optional hook
        """A phase is being judged from now on (the demo simulates its account).

        Called before the phase's first batch; thread-safe.
        """

    def untrack(self, account_id: int) -> None:  # noqa: B027 - optional hook
        """A phase is no longer judged; thread-safe."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release the source's resources."""


def reached(position: Position, committed: Position) -> bool:
    """Whether ``position`` is at or past ``committed`` in every partition."""
    return all(position.get(key, 0) >= value for key, value in committed.items())


class NoneSource(TickSource):
    """No ticks at all: the service runs its API and jobs but judges nothing."""

    name = "none"

    def __init__(self) -> None:
        self._wake = threading.Event()

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        """Wait ``timeout`` seconds (or until :meth:`close`) and return no ticks."""
        self._wake.wait(timeout)
        return EMPTY_TICKS, {}

    def seek(self, position: Position) -> None:
        """Nothing to move."""

    def position(self) -> Position:
        """Always empty."""
        return {}

    def close(self) -> None:
        """Wake a waiting poll."""
        self._wake.set()
