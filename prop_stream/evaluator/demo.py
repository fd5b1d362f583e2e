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

import logging
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
from prop_stream.rules import DEAL_SCHEMA, TICK_SCHEMA, PhaseSpec
from prop_stream.store.progress import Position

logger = logging.getLogger(__name__)

#: Shortest interval between two ticks of one account: one per millisecond.
MIN_TICK_US: Final = 1_000
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
        deals: Produce deals besides the ticks.
        hedge_every_s: Demo seconds between two hedge slots.
    """

    seed: int = 7
    rate: float = 1_000.0
    batch_ms: int = 200
    realtime: bool = True
    epoch: datetime | None = None
    cycle_s: float = 180.0
    deals: bool = True
    hedge_every_s: float = 600.0


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
        self._columns: _Table | None = None
        self._batch = 0
        self._epoch_us: int | None = None
        self._tick_us: int | None = None
        self._span_us = self._config.batch_ms * 1000
        self._last_deals: pl.DataFrame | None = None

    @property
    def config(self) -> DemoConfig:
        """The simulation's settings."""
        return self._config

    def track(self, spec: PhaseSpec) -> None:
        """Simulate the phase's account from its ``started_at`` on."""
        account = _Account(self._config.seed, spec, self._config.cycle_s)
        with self._lock:
            self._accounts[spec.account_id] = account
            self._columns = None

    def untrack(self, account_id: int) -> None:
        """Stop simulating an account."""
        with self._lock:
            if self._accounts.pop(account_id, None) is not None:
                self._columns = None

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
            self._tick_us = max(MIN_TICK_US, round(accounts * 1e6 / self._config.rate))
            reached = accounts * 1e6 / self._tick_us
            if reached < self._config.rate * 0.99:
                logger.warning(
                    "demo: %d accounts at one tick per %d us each make %.0f ticks/s, "
                    "not the %.0f asked for (more challenges raise it)",
                    accounts,
                    MIN_TICK_US,
                    reached,
                    self._config.rate,
                )

    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        """The next batch once it is due (at once unless real-time).

        A demo batch is never split: ``max_records`` is not applied.
        """
        with self._lock:
            self._last_deals = None
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
            table = self._table()
            ticks = self._generate(self._batch, table)
            if self._config.deals:
                deals = self._generate_deals(self._batch, table)
                if deals.height:
                    self._last_deals = _with_before_tick(deals, ticks)
            self._batch += 1
            return ticks, self._position()

    def deals(self) -> pl.DataFrame | None:
        """The deals of the batch :meth:`poll` just returned; None when none."""
        with self._lock:
            return self._last_deals

    def deal_rows(self, batches: Iterable[int]) -> pl.DataFrame:
        """The deals of some batches for the accounts tracked now, in order.

        The deal counterpart of :meth:`ticks` (without ``before_tick``): what
        :meth:`poll` hands out, for a backtest's ``--deals``.
        """
        with self._lock:
            self._start()
            table = self._table()
            frames = [self._generate_deals(n, table) for n in batches]
        return pl.concat([_EMPTY_DEALS, *frames], how="vertical")

    def ticks(self, batches: Iterable[int]) -> pl.DataFrame:
        """The ticks of some batches for the accounts tracked now, in order.

        Does not move the source; with the same tracked accounts, clock and
        batches it returns exactly what :meth:`poll` hands out.
        """
        with self._lock:
            self._start()
            table = self._table()
            frames = [self._generate(n, table) for n in batches]
        return pl.concat([EMPTY_TICKS, *frames], how="vertical")

    def dump(
        self,
        path: str | Path,
        batches: Iterable[int],
        *,
        deals: str | Path | None = None,
    ) -> Path:
        """Write :meth:`ticks` to a Parquet file (a backtest's ``--ticks``).

        Args:
            path: The file to write.
            batches: The batches to include.
            deals: Also write :meth:`deal_rows` of the same batches there (a
                backtest's ``--deals``).

        Returns:
            The path written.
        """
        path = Path(path)
        chosen = list(batches)
        self.ticks(chosen).write_parquet(path)
        if deals is not None:
            self.deal_rows(chosen).write_parquet(Path(deals))
        return path

    def close(self) -> None:
        """Wake a poll waiting for its batch."""
        self._wake.set()

    def _table(self) -> _Table:
        if self._columns is None:
            self._columns = _Table(
                sorted(self._accounts.values(), key=lambda a: a.account_id)
            )
        return self._columns

    def _generate(self, batch: int, table: _Table) -> pl.DataFrame:
        """Every tick of batch ``batch``, all accounts at once (numpy, no loop)."""
        assert self._epoch_us is not None  # noqa: S101 - set by _start
        assert self._tick_us is not None  # noqa: S101 - set by _start
        if not table.accounts:
            return EMPTY_TICKS
        epoch, tick = self._epoch_us, self._tick_us
        lo = epoch + batch * self._span_us
        hi = lo + self._span_us
        offset = (table.key % _U64(tick)).astype(np.int64)
        start = np.maximum(lo, table.started_us)
        # Each account ticks at epoch + offset + k·tick; ks of this batch: [k0, k1).
        k0 = -((epoch + offset - start) // tick)
        k1 = -((epoch + offset - hi) // tick)
        counts = np.maximum(k1 - k0, 0)
        total = int(counts.sum())
        if not total:
            return EMPTY_TICKS
        which = np.repeat(np.arange(len(table.accounts)), counts)
        first = np.cumsum(counts) - counts
        ts = (
            epoch + offset[which] + tick * (k0[which] + np.arange(total) - first[which])
        )
        since = ts - np.maximum(epoch, table.started_us)[which]
        cycle_us = table.cycle_us[which]
        cycle = since // cycle_us
        walk, j0 = table.walks(cycle, first, counts)
        rel = cycle - j0[which]
        begin = walk[which, rel]
        finish = walk[which, rel + 1]
        u = (since - cycle * cycle_us) / table.open_us[which]
        open_ = u < 1.0
        key = table.key[which]
        stamp = ts.astype(np.uint64)
        noise = _unit(_mix(key ^ stamp))
        angle = _unit(_mix(key + _U64(1) ^ stamp))
        z = np.sqrt(-2.0 * np.log(noise)) * np.cos(2.0 * np.pi * angle)
        shape = np.sqrt(np.clip(u * (1.0 - u), 0.0, None))
        wobble = table.wobble[which] * shape * z
        floating = (finish - begin) * np.minimum(u, 1.0) + wobble
        ids = table.account_id[which]
        order = np.lexsort((ids, ts))
        return pl.DataFrame(
            {
                "account_id": ids[order],
                "ts": pl.Series(ts[order]).cast(TICK_SCHEMA["ts"]),
                "equity": np.where(open_, np.round(begin + floating, 2), finish)[order],
                "balance": np.where(open_, begin, finish)[order],
            }
        )

    def _generate_deals(self, batch: int, table: _Table) -> pl.DataFrame:
        """Every deal of batch ``batch``, sorted by (ts, account, deal_id)."""
        assert self._epoch_us is not None  # noqa: S101 - set by _start
        if not table.accounts:
            return _EMPTY_DEALS
        lo = self._epoch_us + batch * self._span_us
        return _deals_between(
            table,
            self._config.seed,
            self._epoch_us,
            round(self._config.hedge_every_s * 1e6),
            lo,
            lo + self._span_us,
        )


#: The deal columns (``interfaces.md`` section 5) as polars types.
_DEAL_SCHEMA: Final[dict[str, pl.DataType]] = dict(
    pl.DataFrame(DEAL_SCHEMA.empty_table()).schema
)
_EMPTY_DEALS: Final = pl.DataFrame(schema=_DEAL_SCHEMA)
_SYMBOLS: Final = ("EURUSD", "GBPUSD", "USDJPY", "XAUUSD", "US30")
_PRICES: Final = np.array([1.0850, 1.2650, 148.20, 2030.0, 37500.0])
_HEDGE_SYMBOL: Final = 3  # XAUUSD
#: Deal and position ids of each kind of position start at these.
_MAIN, _SCALP, _SWING, _HEDGE = 0, 1_000_000_000, 2_000_000_000, 3_000_000_000
_SWING_HOLD_US: Final = 3 * 86_400_000_000
_HEDGE_HOLD_US: Final = 120_000_000
_HEDGE_JITTER_US: Final = 20_000_000
_SCALP_HOLD_US: Final = 20_000_000
_KIND_SALT: Final = {"main": 11, "scalp": 12, "swing": 13, "hedge": 14}


def _deals_between(
    table: _Table, seed: int, epoch: int, hedge_us: int, lo: int, hi: int
) -> pl.DataFrame:
    """The deals with ``lo <= ts < hi`` of every position kind (module docs)."""
    base = np.maximum(epoch, table.started_us)
    cycle, open_us = table.cycle_us, table.open_us
    flat = cycle - open_us
    scalp_at = open_us + flat // 4
    scalp_hold = np.minimum(_SCALP_HOLD_US, flat // 2)
    zero = np.zeros_like(cycle)
    parts: list[dict[str, npt.NDArray[np.generic]]] = []
    # (kind, first id, the event's offset in its cycle, entry, chance of a cycle)
    plans = (
        ("main", _MAIN, zero, "in", 1.0),
        ("main", _MAIN, open_us, "out", 1.0),
        ("scalp", _SCALP, scalp_at, "in", 1 / 12),
        ("scalp", _SCALP, scalp_at + scalp_hold, "out", 1 / 12),
        ("swing", _SWING, cycle // 2, "in", 1 / 100),
        ("swing", _SWING, cycle // 2 + _SWING_HOLD_US, "out", 1 / 100),
    )
    for kind, first_id, offset, entry, chance in plans:
        parts.append(
            _slot_events(
                table, seed, kind, first_id, base, cycle, offset, entry, chance, lo, hi
            )
        )
    if hedge_us > 0:
        period = np.full_like(cycle, hedge_us)
        hedge_base = np.full_like(cycle, epoch)
        jitter = (_mix(table.key ^ _U64(0x4EDCE)) % _U64(_HEDGE_JITTER_US)).astype(
            np.int64
        )
        for offset, entry in ((jitter, "in"), (jitter + _HEDGE_HOLD_US, "out")):
            parts.append(
                _slot_events(
                    table,
                    seed,
                    "hedge",
                    _HEDGE,
                    hedge_base,
                    period,
                    offset,
                    entry,
                    0.5,
                    lo,
                    hi,
                )
            )
    frames = [pl.DataFrame(p) for p in parts if len(p["account_id"])]
    if not frames:
        return _EMPTY_DEALS
    frame = pl.concat(frames)
    return frame.sort("ts", "account_id", "deal_id").select(
        pl.col(name).cast(dtype) for name, dtype in _DEAL_SCHEMA.items()
    )


def _slot_events(
    table: _Table,
    seed: int,
    kind: str,
    first_id: int,
    base: I64Array,
    period: I64Array,
    offset: I64Array,
    entry: str,
    chance: float,
    lo: int,
    hi: int,
) -> dict[str, npt.NDArray[np.generic]]:
    """The ``entry`` deals at ``base + j·period + offset`` in ``[lo, hi)``.

    Slot ``j`` (j ≥ 0) of an account holds a position of ``kind`` when its hash
    is below ``chance``; its open must be at or after the phase start. Every
    property of the position (side, symbol, lots, price) is a hash of the seed,
    the account, the kind and ``j``, so its ``in`` and ``out`` deals agree.
    """
    first = -((base + offset - lo) // period)  # ceil((lo - base - offset) / period)
    end = -((base + offset - hi) // period)
    first = np.maximum(first, 0)
    counts = np.maximum(end - first, 0)
    total = int(counts.sum())
    empty: dict[str, npt.NDArray[np.generic]] = {"account_id": np.zeros(0, np.int64)}
    if not total:
        return empty
    which = np.repeat(np.arange(len(table.accounts)), counts)
    starts = np.cumsum(counts) - counts
    j = first[which] + np.arange(total) - starts[which]
    salt = _U64(int(_key(seed, _KIND_SALT[kind])[0]))
    h = _mix(table.key[which] ^ salt ^ _mix(j.astype(np.uint64)))
    keep = _unit(h) <= chance
    ts = base[which] + j * period[which] + offset[which]
    which, j, h, ts = which[keep], j[keep], h[keep], ts[keep]
    if kind == "hedge":
        # A hedge slot before the phase start opens nothing (nor closes).
        open_ts = ts - (_HEDGE_HOLD_US if entry == "out" else 0)
        alive = open_ts >= table.started_us[which]
        which, j, h, ts = which[alive], j[alive], h[alive], ts[alive]
    if not len(ts):
        return empty
    h2 = _mix(h ^ _U64(0x51DE))
    h3 = _mix(h ^ _U64(0x7075))
    symbol_ix = (
        np.full(len(ts), _HEDGE_SYMBOL)
        if kind == "hedge"
        else (h2 % _U64(len(_SYMBOLS))).astype(np.int64)
    )
    lots = (
        np.round(0.1 + _unit(h3) * 2.9, 2) if kind != "hedge" else np.full(len(ts), 0.5)
    )
    price_move = 1.0 + (_unit(_mix(h ^ ts.astype(np.uint64))) - 0.5) * 0.002
    side = np.where(_unit(_mix(h ^ _U64(0x51D3))) < 0.5, "buy", "sell")
    position = first_id + j + 1
    return {
        "account_id": table.account_id[which],
        "ts": ts,
        "deal_id": first_id * 2 + 2 * j + (1 if entry == "in" else 2),
        "position_id": position,
        "symbol": np.array(_SYMBOLS, dtype=object)[symbol_ix],
        "side": side,
        "volume": lots,
        "price": np.round(_PRICES[symbol_ix] * price_move, 5),
        "entry": np.full(len(ts), entry),
    }


def _with_before_tick(deals: pl.DataFrame, ticks: pl.DataFrame) -> pl.DataFrame:
    """``before_tick``: a deal comes before the batch's ticks at its ``ts`` or later.

    The batch's ticks are sorted by ``ts``; per account this is the backtest's
    order (``ts``, a deal before a tick at an equal ``ts``).
    """
    before = ticks["ts"].search_sorted(deals["ts"], side="left")
    return deals.with_columns(before.cast(pl.Int64).alias("before_tick"))


class _Table:
    """The tracked accounts as columns, and the cycle balances last used.

    A batch spans less than a cycle (at least a second) in the usual settings,
    so most accounts need the same two or three balances of their walk as in the
    batch before; only the accounts that moved to another cycle ask their
    :class:`_Account` (a Python call each).
    """

    def __init__(self, accounts: list[_Account]) -> None:
        self.accounts = accounts
        self.account_id = np.array([a.account_id for a in accounts], dtype=np.int64)
        self.started_us = np.array([a.started_us for a in accounts], dtype=np.int64)
        self.key = np.array([int(a.key[0]) for a in accounts], dtype=np.uint64)
        self.cycle_us = np.array([a.cycle_us for a in accounts], dtype=np.int64)
        self.open_us = np.array([a.open_us for a in accounts], dtype=np.int64)
        self.wobble = np.array([a.wobble for a in accounts], dtype=np.float64)
        # Balances at the start of cycles j0, j0 + 1, j0 + 2 of each account.
        self._j0 = np.full(len(accounts), -1, dtype=np.int64)
        self._walk = np.zeros((len(accounts), 3), dtype=np.float64)

    def walks(
        self, cycle: I64Array, first: I64Array, counts: I64Array
    ) -> tuple[F64Array, I64Array]:
        """Each account's cycle balances from its first tick's cycle on.

        Args:
            cycle: The cycle of every tick (grouped by account, in time order).
            first: Index of each account's first tick in ``cycle``.
            counts: Ticks of each account (0: none this batch).

        Returns:
            ``(walk, j0)``: ``walk[i, m]`` is account ``i``'s balance at the start
            of cycle ``j0[i] + m``, for every cycle its ticks fall in and the
            next one.
        """
        has = counts > 0
        last = np.where(has, first + counts - 1, 0)
        j0 = np.where(has, cycle[np.where(has, first, 0)], self._j0)
        j1 = np.where(has, cycle[last], j0)
        width = max(3, int((j1 - j0).max()) + 2)
        walk = np.zeros((len(self.accounts), width), dtype=np.float64)
        stale = has & ((j0 != self._j0) | (j1 - j0 > 1))
        for i in np.flatnonzero(stale).tolist():
            lo, hi = int(j0[i]), int(j1[i])
            values = self.accounts[i].balances(lo, max(hi + 1, lo + 2))
            walk[i, : values.size] = values
            self._j0[i] = lo
            self._walk[i] = values[:3]
        fresh = ~stale
        walk[fresh, :3] = self._walk[fresh]
        return walk, j0


def _micros(value: datetime) -> int:
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds
