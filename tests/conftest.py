"""Shared test setup: hypothesis profiles and runners for the engine and reference.

Both runners return a :class:`reference.Outcome`, the final tables of a run, so tests
compare the Rust engine and the plain-Python reference with ``==``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Collection, Sequence
from typing import TypeVar

import polars as pl
import pytest
from hypothesis import HealthCheck, settings
from pg_support import pg_server, pg_url, store_db  # noqa: F401 - fixtures for every test
from reference import (
    BreachRow,
    Counts,
    DailyRow,
    MetricRow,
    Outcome,
    Output,
    PhaseRow,
    Tick,
    TransitionRow,
    run_reference,
    split_batches,
)

from prop_stream import Evaluation, PhaseSpec, RuleEngine
from prop_stream.rules import Grouping

settings.register_profile(
    "ci",
    max_examples=200,
    deadline=None,
    database=None,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=30)
settings.register_profile("long", parent=settings.get_profile("ci"), max_examples=3000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: ``run(phases, ticks) -> Outcome``: one implementation of the rules.
Runner = Callable[[Sequence[PhaseSpec], Sequence[Tick]], Outcome]

TS_COLUMNS = ("ts", "resolved_ts", "status_ts")

RowT = TypeVar("RowT")


def ticks_frame(ticks: Sequence[Tick]) -> pl.DataFrame:
    """A tick batch in the engine's schema (``ts`` as UTC microseconds)."""
    frame = pl.DataFrame(
        {
            "account_id": [t[0] for t in ticks],
            "ts": [t[1] for t in ticks],
            "equity": [t[2] for t in ticks],
            "balance": [t[3] for t in ticks],
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Int64,
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    )
    return frame.with_columns(pl.col("ts").cast(pl.Datetime("us", "UTC")))


def _rows(frame: pl.DataFrame, cls: type[RowT]) -> list[RowT]:
    """Rows of ``frame`` as ``cls`` dataclasses; timestamps become microseconds."""
    names = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]  # cls is a dataclass
    missing = [name for name in names if name not in frame.columns]
    assert not missing, f"engine output lacks {missing}; has {frame.columns}"
    frame = frame.select(
        pl.col(name).dt.epoch("us")
        if name in TS_COLUMNS and frame.schema[name] != pl.Int64
        else pl.col(name)
        for name in names
    )
    return [cls(**row) for row in frame.iter_rows(named=True)]


def engine_output(ev: Evaluation) -> Output:
    """One ``process`` call's outputs as the reference's :class:`Output`."""
    return Output(
        breaches=_rows(ev.breaches, BreachRow),
        daily={(r.account_id, r.day): r for r in _rows(ev.daily, DailyRow)},
        metrics={r.account_id: r for r in _rows(ev.metrics, MetricRow)},
        transitions=_rows(ev.transitions, TransitionRow),
        counts=Counts(**dataclasses.asdict(ev.counts)),
    )


def run_engine(
    phases: Sequence[PhaseSpec],
    ticks: Sequence[Tick],
    batches: Sequence[int] | None = None,
    restore_before: Collection[int] = (),
    grouping: Grouping = "auto",
) -> Outcome:
    """Run the engine over ``ticks`` and fold its outputs into an :class:`Outcome`.

    Args:
        phases: The phases to register, in order.
        ticks: The ticks, in delivery order.
        batches: Batch sizes, as :func:`reference.split_batches` takes them.
        restore_before: Batch indexes before which the engine is snapshotted and
            replaced by ``RuleEngine.restore`` of the snapshot.
        grouping: The engine's ``grouping`` (outputs must not depend on it).
    """
    engine = RuleEngine(grouping=grouping)
    for spec in phases:
        engine.register(spec)
    outcome = Outcome()
    for index, batch in enumerate(split_batches(ticks, batches or ())):
        if index in restore_before:
            engine = RuleEngine.restore(engine.snapshot(), grouping=grouping)
        outcome.apply(engine_output(engine.process(ticks_frame(batch))))
    outcome.phases = {r.account_id: r for r in _rows(engine.phases(), PhaseRow)}
    return outcome


def _run_reference(phases: Sequence[PhaseSpec], ticks: Sequence[Tick]) -> Outcome:
    return run_reference(phases, ticks)


def _run_engine(phases: Sequence[PhaseSpec], ticks: Sequence[Tick]) -> Outcome:
    return run_engine(phases, ticks)


RUNNERS: dict[str, Runner] = {"engine": _run_engine, "reference": _run_reference}


@pytest.fixture(params=sorted(RUNNERS))
def run(request: pytest.FixtureRequest) -> Runner:
    """Each implementation in turn: worked examples must hold for both."""
    return RUNNERS[request.param]


@pytest.fixture(scope="session")
def engine_runner() -> Callable[..., Outcome]:
    """:func:`run_engine`, with batches and snapshot/restore points."""
    return run_engine
