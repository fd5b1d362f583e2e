"""The interface every sink implements (after quix-streams' ``BaseSink``)."""

from __future__ import annotations

from abc import ABC, abstractmethod

import polars as pl

from prop_stream.rules import Evaluation
from prop_stream.store.progress import EngineCheckpoint, Position


class BaseSink(ABC):
    """Where the evaluator's outputs go.

    The evaluator calls :meth:`setup` once, then for each batch :meth:`add` with the
    engine's :class:`~prop_stream.rules.Evaluation` and the source position after
    the batch, and :meth:`flush` to commit what was added. A flush is atomic: the
    outputs, the position and (when given) an engine checkpoint are all committed,
    or none of them is.
    """

    @abstractmethod
    def setup(self) -> None:
        """Prepare the destination (check its schema, open connections)."""

    @abstractmethod
    def add(
        self,
        evaluation: Evaluation,
        *,
        position: Position,
        ticks: pl.DataFrame | None = None,
        deals: pl.DataFrame | None = None,
        stream: str = "",
    ) -> None:
        """Buffer one batch's outputs.

        Args:
            evaluation: What the engine produced for the batch.
            position: The source position after the batch.
            ticks: The batch's ticks to keep in the archive, committed with the
                outputs (None: keep none); sinks without an archive ignore it.
            deals: The batch's deals to keep in the archive, likewise.
            stream: The archive stream the rows belong to ('' for the single
                evaluator, the partition key for a group member's partition).
        """

    @abstractmethod
    def flush(self, *, checkpoint: EngineCheckpoint | None = None) -> None:
        """Commit everything added since the last flush, atomically.

        Args:
            checkpoint: An engine checkpoint to commit with the outputs; its
                position must be the last position added.

        Raises:
            SinkError: Nothing was committed; the buffer is kept for a retry.
        """

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release what :meth:`setup` acquired."""
