"""The built-in demo tick source: a deterministic trading simulator.

Every tracked phase account trades in **cycles**: a position is open for the first
70% of a cycle (equity drifts from the balance toward the trade's result, with
noise), then closed (the balance takes the result, equity equals balance) until the
next cycle. Each account has its own cycle length, volatility and drift, so some
accounts pass, some warn, some breach.

Everything is a pure function of the seed, the account, its phase start and the
**demo clock**: batch ``n`` covers demo time ``[epoch + n·S, epoch + (n+1)·S)``
and holds every tick of every tracked account in that span (each account ticks
every ``tick_us``, at its own offset), and no tick before the account's phase
start. The position is ``{"batch": n, "epoch_us": ..., "tick_us": ...}``, so after
a restart :meth:`DemoSource.seek` replays exactly the same batches.

In real-time mode a batch is handed out only once the wall clock has passed its
end, so the demo clock never runs ahead of the wall clock. A phase registered at
run time with ``started_at`` = now therefore never misses a tick it would get on a
replay. After a stop the demo clock lags the wall clock, and batches come as fast
as the loop takes them until it has caught up.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
import polars as pl

from prop_stream.evaluator.sources import EMPTY_TICKS, TickSource
from prop_stream.rules import TICK_SCHEMA, PhaseSpec
from prop_stream.store.progress import Position

_OPEN_SHARE: Final = 0.7
_U64: Final = np.uint64
_MASK: Final = (1 << 64) - 1

U64Array = npt.NDArray[np.uint64]
F64Array = npt.NDArray[np.float64]
I64Array = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class DemoConfig:
    """How the demo source simulates.

    Attributes:
        seed: Seed of every random choice.
        rate: Ticks per second over all accounts, used to set each account's
            tick interval when the source first starts (kept in its position
            afterwards, so a replay is exact whatever the accounts are then).
        batch_ms: Demo time one batch spans, in milliseconds.
        realtime: Hand a batch out only once the wall clock has passed its end.
        epoch: Start of the demo clock (default: the wall clock at first start).
        cycle_s: Mean length of a trade cycle in demo seconds.
    """

    seed: int = 7
    rate: float = 1_000.0
    batch_ms: int = 200
    realtime: bool = True
    epoch: datetime | None = None
    cycle_s: float = 180.0


def _mix(x: U64Array) -> U64Array:
    """splitmix64's finalizer: a counter-based hash, wrapping on purpose."""
    z = x + _U64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> _U64(30))) * _U64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> _U64(27))) * _U64(0x94D049BB133111EB)
    return z ^ (z >> _U64(31))


def _unit(x: U64Array) -> F64Array:
    """Hash values to floats in (0, 1]."""
    return 1.0 - (x >> _U64(11)).astype(np.float64) * 2.0**-53


def _key(*parts: int) -> U64Array:
    value = 0
    for part in parts:
        value = int(_mix(np.array([(value ^ part) & _MASK], dtype=np.uint64))[0])
    return np.array([value], dtype=np.uint64)


class _Account:
    """One simulated account: its parameters and a cache of its balance walk."""

    __slots__ = (
        "_balances",
        "_base_j",
        "_rng",
        "account_id",
        "cycle_us",
        "drift",
        "initial",
        "key",
        "open_us",
        "seed",
        "started_us",
        "volatility",
        "wobble",
    )

    def __init__(self, seed: int, spec: PhaseSpec, cycle_s: float) -> None:
        self.seed = seed
        self.account_id = spec.account_id
        self.started_us = _micros(spec.started_at)
        self.initial = float(spec.rules["initial_balance"])
        params = np.random.default_rng([seed, spec.account_id & _MASK, 1])
        self.cycle_us = max(1_000_000, round(cycle_s * 1e6 * params.uniform(0.6, 1.6)))
        self.open_us = round(self.cycle_us * _OPEN_SHARE)
        self.volatility = 0.0015 * params.uniform(0.5, 2.0)
        self.drift = params.uniform(-0.00002, 0.00008)
        self.wobble = self.initial * self.volatility * 0.6
        self.key = _key(seed, spec.account_id & _MASK)
        self._reset()

    def _reset(self) -> None:
        self._rng = np.random.default_rng([self.seed, self.account_id & _MASK, 2])
        self._base_j = 0
        self._balances = [self.initial]

    def balances(self, j0: int, j1: int) -> F64Array:
        """Balances at the start of cycles ``j0 ..= j1``."""
        if j0 < self._base_j:
            self._reset()
        while self._base_j + len(self._balances) <= j1:
            pnl = self.initial * self._rng.normal(self.drift, self.volatility)
            self._balances.append(round(self._balances[-1] + pnl, 2))
        # Keep memory bounded: a later batch never asks for an earlier cycle
        # unless the source is moved back (then the walk is recomputed).
        drop = j0 - self._base_j
        if drop > 0:
            del self._balances[:drop]
            self._base_j = j0
        start = j0 - self._base_j
        return np.array(self._balances[start : start + j1 - j0 + 1])


class DemoSource(TickSource):
    """Simulated equity ticks for every tracked phase account.

    Args:
        config: The simulation's settings.
        clock: Wall clock in seconds (tests pass a fake one).
    """

    name = "demo"

    def __init__(
        self,
        config: DemoConfig | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config or DemoConfig()
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._accounts: dict[int, _Account] = {}
        self._batch = 0
        self._epoch_us: int | None = None
        self._tick_us: int | None = None
        self._span_us = self._config.batch_ms * 1000

    @property
    def config(self) -> DemoConfig:
        """The simulation's settings."""
        return self._config

    def track(self, spec: PhaseSpec) -> None:
        """Simulate the phase's account from its ``started_at`` on."""
        account = _Account(self._config.seed, spec, self._config.cycle_s)
        with self._lock:
            self._accounts[spec.account_id] = account

    def untrack(self, account_id: int) -> None:
        """Stop simulating an account."""
        with self._lock:
            self._accounts.pop(account_id, None)

    def tracked(self) -> list[int]:
        """The accounts simulated, in order."""
        with self._lock:
            return sorted(self._accounts)

    def seek(self, position: Position) -> None:
        """Resume at a batch; an empty position restarts the demo clock."""
        with self._lock:
            if not position:
                self._batch, self._epoch_us, self._tick_us = 0, None, None
                return
            self._batch = int(position["batch"])
            self._epoch_us = int(position["epoch_us"])
            self._tick_us = int(position["tick_us"])

    def position(self) -> Position:
        """``{"batch", "epoch_us", "tick_us"}`` (empty before the first start)."""
        with self._lock:
            return self._position()

    def _position(self) -> dict[str, int]:
        if self._epoch_us is None or self._tick_us is None:
            return {}
        return {
            "batch": self._batch,
            "epoch_us": self._epoch_us,
            "tick_us": self._tick_us,
        }

    def start(self) -> None:
        """Fix the demo clock and tick interval if no position set them."""
        with self._lock:
            self._start()

    def _start(self) -> None:
        if self._epoch_us is None:
            epoch = self._config.epoch
            now = epoch.timestamp() if epoch is not None else self._clock()
            self._epoch_us = int(now) * 1_000_000
        if self._tick_us is None:
            accounts = max(1, len(self._accounts))
            self._tick_us = max(1_000, round(accounts * 1e6 / self._config.rate))

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        """The next batch once it is due (at once unless real-time).

        A demo batch is never split: ``max_records`` is not applied.
        """
        with self._lock:
            self._start()
            assert self._epoch_us is not None  # noqa: S101 - set by _start
            due = (self._epoch_us + (self._batch + 1) * self._span_us) / 1e6
        if self._config.realtime:
            wait = due - self._clock()
            if wait > 0:
                self._wake.wait(min(wait, timeout))
                if self._clock() < due:
                    return EMPTY_TICKS, self.position()
        with self._lock:
            ticks = self._generate(self._batch, list(self._accounts.values()))
            self._batch += 1
            return ticks, self._position()

    def ticks(self, batches: Iterable[int]) -> pl.DataFrame:
        """The ticks of some batches for the accounts tracked now, in order.

        Does not move the source; with the same tracked accounts, clock and
        batches it returns exactly what :meth:`poll` hands out.
        """
        with self._lock:
            self._start()
            accounts = list(self._accounts.values())
            frames = [self._generate(n, accounts) for n in batches]
        return pl.concat([EMPTY_TICKS, *frames], how="vertical")

    def dump(self, path: str | Path, batches: Iterable[int]) -> Path:
        """Write :meth:`ticks` to a Parquet file (a backtest's ``--ticks``).

        Args:
            path: The file to write.
            batches: The batches to include.

        Returns:
            The path written.
        """
        path = Path(path)
        self.ticks(batches).write_parquet(path)
        return path

    def close(self) -> None:
        """Wake a poll waiting for its batch."""
        self._wake.set()

    def _generate(self, batch: int, accounts: list[_Account]) -> pl.DataFrame:
        assert self._epoch_us is not None  # noqa: S101 - set by _start
        assert self._tick_us is not None  # noqa: S101 - set by _start
        epoch, tick = self._epoch_us, self._tick_us
        lo = epoch + batch * self._span_us
        hi = lo + self._span_us
        ids: list[I64Array] = []
        times: list[I64Array] = []
        equities: list[F64Array] = []
        balances: list[F64Array] = []
        for account in sorted(accounts, key=lambda a: a.account_id):
            offset = int(account.key[0] % _U64(tick))
            start = max(lo, account.started_us)
            k0 = math.ceil((start - epoch - offset) / tick)
            k1 = math.ceil((hi - epoch - offset) / tick)
            if k1 <= k0:
                continue
            ts = epoch + offset + tick * np.arange(k0, k1, dtype=np.int64)
            ts = ts[ts >= start]
            if not ts.size:
                continue
            equity, balance = _walk(account, ts, max(epoch, account.started_us))
            ids.append(np.full(ts.size, account.account_id, dtype=np.int64))
            times.append(ts)
            equities.append(equity)
            balances.append(balance)
        if not ids:
            return EMPTY_TICKS
        all_ts = np.concatenate(times)
        all_ids = np.concatenate(ids)
        order = np.lexsort((all_ids, all_ts))
        return pl.DataFrame(
            {
                "account_id": all_ids[order],
                "ts": pl.Series(all_ts[order]).cast(TICK_SCHEMA["ts"]),
                "equity": np.concatenate(equities)[order],
                "balance": np.concatenate(balances)[order],
            }
        )


def _walk(account: _Account, ts: I64Array, anchor_us: int) -> tuple[F64Array, F64Array]:
    """Equity and balance of an account at the given times (µs)."""
    since = ts - anchor_us
    cycle = since // account.cycle_us
    j0, j1 = int(cycle[0]), int(cycle[-1])
    walk = account.balances(j0, j1 + 1)
    start = walk[cycle - j0]
    end = walk[cycle - j0 + 1]
    u = (since - cycle * account.cycle_us) / account.open_us
    open_ = u < 1.0
    noise = _unit(_mix(account.key ^ ts.astype(np.uint64)))
    angle = _unit(_mix(account.key + _U64(1) ^ ts.astype(np.uint64)))
    z = np.sqrt(-2.0 * np.log(noise)) * np.cos(2.0 * np.pi * angle)
    shape = np.sqrt(np.clip(u * (1.0 - u), 0.0, None))
    floating = (end - start) * np.minimum(u, 1.0) + account.wobble * shape * z
    equity = np.where(open_, np.round(start + floating, 2), end)
    balance = np.where(open_, start, end)
    return equity, balance


def _micros(value: datetime) -> int:
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
