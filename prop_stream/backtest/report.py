"""The backtest's HTML report: outcomes, and each account's equity against its floors.

``prop-stream backtest ... --report`` writes ``DIR/report.html``, one file that
works offline: the plotting library (uPlot, MIT, vendored in ``assets/`` with its
licence) and the data (JSON) are inlined in it.

What is drawn comes from three places:

- the engine's outputs (``accounts``, ``breaches``, ``daily``): statuses, the
  pass or fail instant, breaches, each day's reference equity;
- the rules: the limits ``L_d`` and ``L_m``, the target;
- the ticks, read again: the equity curve, and what the engine keeps only as
  state: which ticks it evaluated, the local day of each, and the high-water
  mark. :func:`derive_floors` computes these with polars as ``rules.md`` defines
  them; the tests check it against the engine's per-tick metrics.

Curves are downsampled for display with LTTB (:func:`lttb_indices`): at most
``points_per_account`` points per account and ``total_points`` over the whole
report, plus the ticks that must be exact (each day's first tick, each breach
tick and the last evaluated tick). Floors, breaches and statistics are computed
on every evaluated tick, before downsampling.
"""

from __future__ import annotations

import html
import json
import math
import re
from collections.abc import Collection, Mapping, Sequence
from datetime import UTC, date, datetime, time, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

import numpy as np
import numpy.typing as npt
import polars as pl

from prop_stream.backtest.run import BacktestTables
from prop_stream.rules import PhaseSpec, validate_rules

#: Curve points per account at most (before the exact ticks are added).
DEFAULT_POINTS_PER_ACCOUNT: Final = 2_000
#: Curve points over all accounts at most (before the exact ticks are added).
DEFAULT_TOTAL_POINTS: Final = 1_000_000
#: Bins of the max-drawdown histogram.
_DRAWDOWN_BINS: Final = 20
_MIN_POINTS: Final = 3  # LTTB keeps the first and last point and one per bucket

_ASSETS: Final = "assets"
_TEMPLATE: Final = "report.html"
_UPLOT_JS: Final = "uPlot.iife.min.js"
_UPLOT_CSS: Final = "uPlot.min.css"

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]


# ------------------------------------------------------------------------- LTTB


def lttb_indices(
    x: FloatArray,
    y: FloatArray,
    offsets: IntArray,
    n_out: IntArray,
) -> IntArray:
    """Largest-triangle-three-buckets over many series at once.

    The series are concatenated: series ``s`` is ``x[offsets[s]:offsets[s+1]]``,
    sorted by ``x``. A series with at most ``n_out[s]`` points is kept whole.
    Otherwise its first and last points are kept, the points between are cut into
    ``n_out[s] - 2`` buckets of (almost) equal count, and from each bucket the
    point that makes the largest triangle with the point chosen in the previous
    bucket and the mean of the next bucket is kept (Steinarsson 2013). Buckets
    are chosen in order, so the work loops once per bucket index, each step
    vectorised over every series: the cost is O(points) plus ``max(n_out)``
    numpy steps, whatever the number of series.

    Args:
        x: The x values of all series, concatenated.
        y: The y values, same length.
        offsets: Start of each series in ``x``, plus ``len(x)`` at the end.
        n_out: Points to keep per series (values below 3 are taken as 3).

    Returns:
        Sorted indices into ``x`` of the kept points.
    """
    lengths = np.diff(offsets)
    n_out = np.maximum(np.asarray(n_out, dtype=np.int64), _MIN_POINTS)
    whole = lengths <= n_out
    keep = [_ranges(offsets[:-1][whole], lengths[whole])]
    series = np.flatnonzero(~whole)
    if series.size:
        keep.append(_lttb_long(x, y, offsets[series], lengths[series], n_out[series]))
    return np.sort(np.concatenate(keep))


def _ranges(starts: IntArray, lengths: IntArray) -> IntArray:
    """Concatenated ``arange(start, start + length)`` for each pair."""
    total = int(lengths.sum())
    if total == 0:
        return np.empty(0, dtype=np.int64)
    shifts = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    out: IntArray = np.arange(total, dtype=np.int64) + shifts
    return out


def _lttb_long(
    x: FloatArray,
    y: FloatArray,
    starts: IntArray,
    lengths: IntArray,
    n_out: IntArray,
) -> IntArray:
    buckets = n_out - 2
    # Bucket b of a series covers local points [1 + floor(b * every),
    # 1 + floor((b + 1) * every)), every = (length - 2) / buckets: the points
    # strictly between the first and the last, split as evenly as integers allow.
    bucket_series = np.repeat(np.arange(starts.size), buckets)
    first_bucket = np.cumsum(buckets) - buckets
    local_b = np.arange(int(buckets.sum())) - np.repeat(first_bucket, buckets)
    every = (lengths - 2) / buckets
    lo = (
        starts[bucket_series]
        + 1
        + np.floor(local_b * every[bucket_series]).astype(np.int64)
    )
    hi = (
        starts[bucket_series]
        + 1
        + np.floor((local_b + 1) * every[bucket_series]).astype(np.int64)
    )
    last = starts + lengths - 1
    hi[first_bucket + buckets - 1] = last  # no float drift at a series' end
    sizes = hi - lo
    members = _ranges(lo, sizes)
    owner = np.repeat(np.arange(lo.size), sizes)
    mean_x = np.bincount(owner, weights=x[members], minlength=lo.size) / sizes
    mean_y = np.bincount(owner, weights=y[members], minlength=lo.size) / sizes
    # The "next bucket" of a series' last bucket is its last point.
    next_x = np.append(mean_x[1:], 0.0)
    next_y = np.append(mean_y[1:], 0.0)
    ends = first_bucket + buckets - 1
    next_x[ends] = x[last]
    next_y[ends] = y[last]

    chosen = [starts, last]
    prev = starts.copy()
    for b in range(int(buckets.max())):
        active = np.flatnonzero(buckets > b)
        g = first_bucket[active] + b
        pts = _ranges(lo[g], sizes[g])
        seg = np.repeat(np.arange(g.size), sizes[g])
        ax, ay = x[prev[active]][seg], y[prev[active]][seg]
        area = np.abs(
            (ax - next_x[g][seg]) * (y[pts] - ay)
            - (ax - x[pts]) * (next_y[g][seg] - ay)
        )
        seg_starts = np.cumsum(sizes[g]) - sizes[g]
        best = np.maximum.reduceat(area, seg_starts)
        # The first point reaching its bucket's maximum: a stable choice on ties.
        at_max = np.flatnonzero(area == best[seg])
        _, first = np.unique(seg[at_max], return_index=True)
        picked = pts[at_max[first]]
        prev[active] = picked
        chosen.append(picked)
    return np.concatenate(chosen)


# ----------------------------------------------------------------------- floors


def _cents_times_100(value: pl.Expr) -> pl.Expr:
    # rules.md: cent(x) = round_half_even(x * 100) / 100 in binary64. The
    # division is done by _divide_by_100: polars divides a column by a scalar
    # as a multiplication by its reciprocal, which is off by an ulp (a floor
    # of 94899.90000000001 instead of 94899.9).
    return (value * 100.0).round(0, mode="half_to_even")


def _divide_by_100(frame: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    """IEEE division by 100 of each column (null stays null)."""
    return frame.with_columns(
        pl.Series(name, frame[name].to_numpy() / 100.0, nan_to_null=True)
        for name in names
    )


def _rules_frame(specs: Sequence[PhaseSpec]) -> pl.DataFrame:
    rows = []
    for spec in specs:
        rules = validate_rules(spec.rules)
        hours, minutes = str(rules["day_rollover"]).split(":")
        rollover = int(hours) * 60 + int(minutes)
        rows.append(
            {
                "account_id": spec.account_id,
                "started_at": spec.started_at.astimezone(UTC),
                "initial_balance": float(_number(rules["initial_balance"])),
                "profit_target": _optional(rules["profit_target"]),
                "max_daily_loss": _optional(rules["max_daily_loss"]),
                "daily_reference": str(rules["daily_reference"]),
                "daily_loss_base": str(rules["daily_loss_base"]),
                "max_total_loss": _optional(rules["max_total_loss"]),
                "total_loss_mode": str(rules["total_loss_mode"]),
                "timezone": str(rules["timezone"]),
                # Day d ends at local (d + 1) 00:00 - shift (rules.md, calendar.rs).
                "shift_minutes": (1440 - rollover) % 1440,
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "account_id": pl.Int64,
            "started_at": pl.Datetime("us", "UTC"),
            "initial_balance": pl.Float64,
            "profit_target": pl.Float64,
            "max_daily_loss": pl.Float64,
            "daily_reference": pl.String,
            "daily_loss_base": pl.String,
            "max_total_loss": pl.Float64,
            "total_loss_mode": pl.String,
            "timezone": pl.String,
            "shift_minutes": pl.Int64,
        },
    )


def _number(value: object) -> float:
    if isinstance(value, int | float):
        return float(value)
    raise TypeError(f"expected a number, got {value!r}")


def _optional(value: object) -> float | None:
    return None if value is None else _number(value)


def _local_day(frame: pl.DataFrame) -> pl.Series:
    """The trading day of each tick, as the engine's ``DayClock.locate``.

    First the wall-clock guess: the date of the local time plus the shift. Near
    a DST change the guess can be a day off when the rollover falls in the gap
    or fold, so each tick is then checked against the exact boundaries of its
    guessed day and the one before (few distinct days: computed in Python).
    """
    # polars converts to one time zone per expression: one pass per zone in use.
    guess = pl.Series("day", [None] * frame.height, dtype=pl.Date)
    for zone in frame["timezone"].unique().to_list():
        mask = frame["timezone"] == zone
        part = frame.filter(mask).select(
            (
                pl.col("ts").dt.convert_time_zone(zone).dt.replace_time_zone(None)
                + pl.duration(minutes=pl.col("shift_minutes"))
            ).dt.date()
        )
        guess = guess.scatter(np.flatnonzero(mask.to_numpy()), part.to_series())
    keyed = frame.select("timezone", "shift_minutes", "ts").with_columns(day=guess)
    combos = keyed.select("timezone", "shift_minutes", "day").unique()
    bounds = pl.DataFrame(
        [
            {
                "timezone": zone,
                "shift_minutes": shift,
                "day": day,
                "_prev_end": _day_end(zone, shift, day - timedelta(days=1)),
                "_end": _day_end(zone, shift, day),
            }
            for zone, shift, day in combos.iter_rows()
        ],
        schema={
            "timezone": pl.String,
            "shift_minutes": pl.Int64,
            "day": pl.Date,
            "_prev_end": pl.Datetime("us", "UTC"),
            "_end": pl.Datetime("us", "UTC"),
        },
    )
    return (
        keyed.join(
            bounds,
            on=["timezone", "shift_minutes", "day"],
            how="left",
            maintain_order="left",
        )
        .select(
            pl.when(pl.col("ts") >= pl.col("_end"))
            .then(pl.col("day") + pl.duration(days=1))
            .when(pl.col("ts") < pl.col("_prev_end"))
            .then(pl.col("day") - pl.duration(days=1))
            .otherwise(pl.col("day"))
            .alias("day")
        )
        .to_series()
    )


def _day_end(zone: str, shift_minutes: int, day: date) -> datetime:
    """When ``day`` ends, as the engine's ``DayClock::day_end``.

    That is the first instant whose local wall time is at or after
    ``(day + 1) 00:00 - shift``.
    """
    tz = ZoneInfo(zone)
    wall = datetime.combine(day + timedelta(days=1), time()) - timedelta(
        minutes=shift_minutes
    )
    # Inside a DST gap the wall time does not exist: the first valid minute after
    # it is the transition itself (zones change offset on whole minutes).
    for minutes in range(2 * 1440):
        candidate = wall + timedelta(minutes=minutes)
        for fold in (0, 1):  # in a fold, fold=0 is the earlier instant
            instant = candidate.replace(tzinfo=tz, fold=fold).astimezone(UTC)
            if instant.astimezone(tz).replace(tzinfo=None) == candidate:
                return instant
    return wall.replace(tzinfo=UTC)


def derive_floors(
    ticks: pl.LazyFrame | pl.DataFrame,
    specs: Sequence[PhaseSpec],
    tables: BacktestTables,
) -> pl.DataFrame:
    """The evaluated ticks with the day, hwm, floors and target the engine used.

    The engine keeps these only as state; this recomputes them from the ticks,
    the rules and the engine's outputs (``rules.md``, Definitions):

    - evaluated ticks: those at or after ``started_at``, in (``account_id``,
      ``ts``) order with ties in input order, the first ``accounts.ticks`` of
      each account (later ones came after the phase ended);
    - the local day: the date of the local wall time shifted by the rollover,
      checked against the exact day boundaries near DST changes;
    - ``D`` from that day's row of ``daily``, ``L_d``, ``F_d = cent(D - L_d)``;
    - ``hwm``: ``initial_balance``; ``trailing`` raises it to each tick's equity
      (the tick's own included), ``trailing_eod`` to the last equity of each
      ended day; ``R_m``, ``L_m``, ``F_m = cent(R_m - L_m)``;
    - the target ``T = cent(initial_balance * (1 + profit_target))``.

    Args:
        ticks: The run's ticks (the four engine columns), in input order.
        specs: The phases of the rules file.
        tables: The run's outputs.

    Returns:
        One row per evaluated tick, sorted by account and time: ``account_id,
        ts, equity, balance, day, daily_limit, daily_floor, hwm, overall_limit,
        overall_floor, target, initial_balance``; floors are null where their
        rule is off.
    """
    rules = _rules_frame(specs)
    # Evaluated ticks lie in [started_at, status_ts]: filtering on that before
    # the sort drops the late ticks and most of those after a phase ended.
    bounds = tables.accounts.join(
        rules.select("account_id", "started_at"), on="account_id"
    ).select("account_id", "started_at", "status_ts", "ticks")
    evaluated = (
        ticks.lazy()
        .select("account_id", "ts", "equity", "balance")
        # Ties in ts keep input order through the row index: with it as the
        # last sort key, no step needs polars' (slower) order-keeping variants.
        .with_row_index("_row")
        .join(bounds.lazy(), on="account_id", how="inner")
        .filter(
            (pl.col("ts") >= pl.col("started_at"))
            & (pl.col("status_ts").is_null() | (pl.col("ts") <= pl.col("status_ts")))
        )
        .sort(["account_id", "ts", "_row"])
        # Ticks at the ending tick's ts that came after it were not evaluated.
        .filter(pl.int_range(pl.len()).over("account_id") < pl.col("ticks"))
        .select("account_id", "ts", "equity", "balance")
        .collect()
    )
    frame = evaluated.join(rules, on="account_id", how="left", maintain_order="left")
    frame = frame.with_columns(_local_day(frame))
    daily = tables.daily.select(
        "account_id", "day", "daily_start_equity", "daily_start_balance"
    )
    frame = frame.join(
        daily, on=["account_id", "day"], how="left", maintain_order="left"
    )

    ref = pl.col("daily_reference")
    reference = (
        pl.when(ref == "day_start_balance")
        .then(pl.col("daily_start_balance"))
        .when(ref == "day_start_max")
        .then(pl.max_horizontal("daily_start_equity", "daily_start_balance"))
        .otherwise(pl.col("daily_start_equity"))
    )
    base = (
        pl.when(pl.col("daily_loss_base") == "day_start")
        .then(pl.col("_reference"))
        .otherwise(pl.col("initial_balance"))
    )
    closes = (
        frame.group_by("account_id", "day", maintain_order=True)
        .agg(pl.col("equity").last().alias("_close"))
        .with_columns(
            _eod_hwm=pl.max_horizontal(
                pl.col("_close").cum_max().shift(1).over("account_id"),
                pl.lit(-math.inf),
            )
        )
        .drop("_close")
    )
    mode = pl.col("total_loss_mode")
    hwm = pl.max_horizontal(
        pl.col("initial_balance"),
        pl.when(mode == "trailing")
        .then(pl.col("equity").cum_max().over("account_id"))
        .when(mode == "trailing_eod")
        .then(pl.col("_eod_hwm"))
        .otherwise(pl.col("initial_balance")),
    )
    overall_reference = (
        pl.when(mode == "static")
        .then(pl.col("initial_balance"))
        .otherwise(
            pl.min_horizontal(
                pl.col("hwm"), pl.col("initial_balance") + pl.col("overall_limit")
            )
        )
    )
    return (
        frame.join(closes, on=["account_id", "day"], how="left", maintain_order="left")
        .with_columns(
            _reference=reference,
            hwm=hwm,
            overall_limit=pl.col("max_total_loss") * pl.col("initial_balance"),
        )
        .with_columns(daily_limit=pl.col("max_daily_loss") * base)
        .with_columns(
            daily_floor=_cents_times_100(pl.col("_reference") - pl.col("daily_limit")),
            overall_floor=_cents_times_100(overall_reference - pl.col("overall_limit")),
            target=_cents_times_100(
                pl.col("initial_balance") * (1.0 + pl.col("profit_target"))
            ),
        )
        .pipe(_divide_by_100, ["daily_floor", "overall_floor", "target"])
        .select(
            "account_id",
            "ts",
            "equity",
            "balance",
            "day",
            "daily_limit",
            "daily_floor",
            "hwm",
            "overall_limit",
            "overall_floor",
            "target",
            "initial_balance",
        )
    )


# ------------------------------------------------------------------------- data


def report_data(
    specs: Sequence[PhaseSpec],
    ticks: Sequence[pl.LazyFrame | pl.DataFrame],
    tables: BacktestTables,
    *,
    points_per_account: int = DEFAULT_POINTS_PER_ACCOUNT,
    total_points: int = DEFAULT_TOTAL_POINTS,
    baseline: tuple[Sequence[PhaseSpec], BacktestTables] | None = None,
    compare: Collection[int] = (),
) -> dict[str, Any]:
    """Everything the report shows, as a JSON-ready dict.

    Args:
        specs: The phases of the rules file.
        ticks: The run's ticks in input order, in parts that each hold all the
            ticks of their accounts (one part, or hash partitions by account).
        tables: The run's outputs.
        points_per_account: Curve points per account at most.
        total_points: Curve points over all accounts at most.
        baseline: Another run over the same ticks (its phases and outputs):
            for the accounts in ``compare`` its floors are drawn too
            (``old_daily_floor``, ``old_overall_floor``), its outcome shown
            (``old_status``, ``old_end``), and the curve runs to the later of
            the two runs' last evaluated ticks (``prop-stream whatif``).
        compare: The accounts drawn with ``baseline``'s floors.

    Returns:
        ``summary`` (counts, failures by rule, days to fail, max drawdown
        histogram), ``accounts`` (one entry per phase, with its downsampled
        curve, floors and breaches) and ``limits`` (the point bounds used).
    """
    if points_per_account < _MIN_POINTS or total_points < _MIN_POINTS:
        raise ValueError(f"point bounds must be at least {_MIN_POINTS}")
    accounts = tables.accounts
    with_ticks = int((accounts["ticks"] > 0).sum())
    budget = max(
        _MIN_POINTS, min(points_per_account, total_points // max(1, with_ticks))
    )
    entries = {
        row["account_id"]: _account_entry(row) for row in _account_rows(specs, tables)
    }
    breaches = tables.breaches.with_columns(
        pl.col("ts").dt.epoch("ms").alias("ms")
    ).select(
        "account_id", "ts", "ms", "rule", "severity", "action", "threshold", "actual"
    )
    compared = frozenset(compare) if baseline is not None else frozenset()
    if baseline is not None:
        for row in (
            baseline[1]
            .accounts.filter(pl.col("account_id").is_in(list(compared)))
            .iter_rows(named=True)
        ):
            entry = entries.get(row["account_id"])
            if entry is not None:
                entry["old_status"] = row["status"]
                entry["old_end"] = _ms(row["status_ts"])
    for part in ticks:
        floors = derive_floors(part, specs, tables)
        if baseline is not None and compared:
            floors = _with_baseline(
                floors, derive_floors(part, baseline[0], baseline[1]), compared
            )
        if floors.height:
            _add_curves(entries, floors, breaches, budget)
    listed = [entries[row["account_id"]] for row in accounts.iter_rows(named=True)]
    return {
        "generated": datetime.now(UTC).isoformat(timespec="seconds"),
        "limits": {
            "points_per_account": budget,
            "total_points": total_points,
        },
        "summary": _summary(listed, tables),
        "accounts": listed,
    }


def _with_baseline(
    floors: pl.DataFrame, old: pl.DataFrame, compare: Collection[int]
) -> pl.DataFrame:
    """``floors`` with another run's floors beside them, for ``compare``.

    Both runs evaluate the same ticks from the same start in the same order, so
    the k-th evaluated tick of an account is the same tick in both: they are
    joined on (account, k), and the curve runs on to the later end.
    """
    index = pl.int_range(pl.len()).over("account_id").alias("_k")
    old = (
        old.filter(pl.col("account_id").is_in(list(compare)))
        .with_columns(index)
        .select(
            "account_id",
            "_k",
            *(pl.col(c).alias(f"_old_{c}") for c in _SHARED_COLUMNS),
            pl.col("daily_floor").alias("old_daily_floor"),
            pl.col("overall_floor").alias("old_overall_floor"),
        )
    )
    return (
        floors.with_columns(index)
        .join(old, on=["account_id", "_k"], how="full", coalesce=True)
        .with_columns(pl.coalesce(c, f"_old_{c}").alias(c) for c in _SHARED_COLUMNS)
        .sort("account_id", "_k")
        .drop("_k", *(f"_old_{c}" for c in _SHARED_COLUMNS))
    )


#: Columns that are the tick's, whichever run evaluated it.
_SHARED_COLUMNS: Final = ("ts", "equity", "balance", "day", "initial_balance")


def _account_rows(
    specs: Sequence[PhaseSpec], tables: BacktestTables
) -> list[dict[str, Any]]:
    started = {spec.account_id: spec.started_at.astimezone(UTC) for spec in specs}
    rules = {spec.account_id: validate_rules(spec.rules) for spec in specs}
    rows = []
    for row in tables.accounts.iter_rows(named=True):
        rule_set = rules[row["account_id"]]
        ib = _number(rule_set["initial_balance"])
        target = _optional(rule_set["profit_target"])
        rows.append(
            {
                **row,
                "started_at": started[row["account_id"]],
                "initial_balance": ib,
                # Same rounding as the engine (rules.md): ties to even at the cent.
                "target": None
                if target is None
                else round(ib * (1.0 + target) * 100) / 100,
            }
        )
    return rows


def _ms(value: datetime | None) -> int | None:
    if value is None:
        return None
    delta = value.astimezone(UTC) - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _account_entry(row: Mapping[str, Any]) -> dict[str, Any]:
    return {
        # A string: JavaScript numbers hold integers exactly only up to 2**53.
        "id": str(row["account_id"]),
        "challenge": row["challenge_id"],
        "phase": row["phase_index"],
        "status": row["status"],
        "start": _ms(row["started_at"]),
        "end": _ms(row["status_ts"]),
        "ticks": row["ticks"],
        "initial_balance": row["initial_balance"],
        "target": row["target"],
        "max_drawdown": None,
        "t0": None,
        "t": [],
        "equity": [],
        "daily_floor": None,
        "overall_floor": None,
        "breaches": [],
    }


def _add_curves(
    entries: Mapping[int, dict[str, Any]],
    floors: pl.DataFrame,
    breaches: pl.DataFrame,
    budget: int,
) -> None:
    floors = floors.with_row_index("_i").with_columns(
        _ms=pl.col("ts").dt.epoch("ms"),
        _drawdown=(
            pl.max_horizontal(
                pl.col("initial_balance"), pl.col("equity").cum_max().over("account_id")
            )
            - pl.col("equity")
        )
        / pl.col("initial_balance"),
    )
    ids = floors["account_id"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]]).astype(np.int64)
    offsets = np.append(starts, len(ids)).astype(np.int64)
    x = floors["ts"].dt.epoch("us").to_numpy().astype(np.float64)
    y = floors["equity"].to_numpy().astype(np.float64)
    picked = lttb_indices(x, y, offsets, np.full(starts.size, budget, dtype=np.int64))
    # Ticks drawn exactly whatever the downsampling: each day's first tick (the
    # daily floor steps there) and the tick of each breach (the last evaluated
    # tick at its ts, as the engine judged ties in input order).
    day_first = floors.filter(
        pl.col("day")
        != pl.col("day").shift(1).over("account_id").fill_null(pl.date(1, 1, 1))
    )["_i"]
    marked = (
        breaches.join(
            floors.select("account_id", "ts", "_i", "equity"), on=["account_id", "ts"]
        )
        .group_by("account_id", "ts", "rule", "action", maintain_order=True)
        .agg(pl.all().last())
    )
    mask = np.zeros(floors.height, dtype=bool)
    mask[picked] = True
    mask[day_first.to_numpy()] = True
    mask[marked["_i"].to_numpy()] = True
    shown = floors.filter(pl.Series(mask))
    drawdown = floors.group_by("account_id").agg(pl.col("_drawdown").max())
    for account_id, value in drawdown.iter_rows():
        entries[account_id]["max_drawdown"] = round(float(value), 6)
    _fill_points(entries, shown)
    for row in marked.iter_rows(named=True):
        entries[row["account_id"]]["breaches"].append(
            {
                "t": row["ms"],
                "rule": row["rule"],
                "severity": row["severity"],
                "action": row["action"],
                "equity": row["equity"],
                "threshold": row["threshold"],
                "actual": row["actual"],
            }
        )


def _fill_points(entries: Mapping[int, dict[str, Any]], shown: pl.DataFrame) -> None:
    # Whole columns go to Python lists once; each account takes slices of them
    # (per-account polars calls cost more than the data at 20k accounts).
    if shown.height == 0:
        return
    ids = shown["account_id"].to_numpy()
    ms = shown["_ms"].to_numpy()
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.append(starts[1:], ids.size)
    first = np.zeros(ids.size, dtype=bool)
    first[starts] = True
    relative = (ms - np.repeat(ms[starts], ends - starts)).tolist()
    equity = np.round(shown["equity"].to_numpy(), 2).tolist()
    steps = {
        name: _steps(shown[name].to_numpy(), first, starts)
        for name in (
            "daily_floor",
            "overall_floor",
            "old_daily_floor",
            "old_overall_floor",
        )
        if name in shown.columns
    }
    for a, (start, end) in enumerate(zip(starts.tolist(), ends.tolist(), strict=True)):
        entry = entries[int(ids[start])]
        entry["t0"] = int(ms[start])
        entry["t"] = relative[start:end]
        entry["equity"] = equity[start:end]
        for name, per_account in steps.items():
            entry[name] = per_account[a]


def _steps(
    values: FloatArray, first: npt.NDArray[np.bool_], starts: IntArray
) -> list[list[list[float | None]] | None]:
    """Per account, ``[[i, value], ...]`` at each point ``i`` where a floor changes.

    Floors are step functions: most points repeat the previous value, so only
    the changes are written (None where the rule is off: the floor is null).
    """
    values = np.asarray(values, dtype=np.float64)
    previous = np.roll(values, 1)
    # NaN never equals itself: a run of NaNs (a what-if run that had ended) is
    # one change, not one per point.
    same = (values == previous) | (np.isnan(values) & np.isnan(previous))
    changed = first | ~same
    at = np.flatnonzero(changed)
    position = at - np.repeat(
        starts, np.diff(np.searchsorted(at, np.append(starts, values.size)))
    )
    pairs = np.column_stack([position, np.round(values[at], 2)]).tolist()
    bounds = np.searchsorted(at, np.append(starts, values.size)).tolist()
    out: list[list[list[float | None]] | None] = []
    for a, start in enumerate(starts.tolist()):
        if np.isnan(values[start]):
            out.append(None)
        else:
            # NaN (JSON null) where one run of a what-if had ended: a gap.
            out.append(
                [
                    [int(i), v if v == v else None]
                    for i, v in pairs[bounds[a] : bounds[a + 1]]
                ]
            )
    return out


def _summary(
    accounts: Sequence[Mapping[str, Any]], tables: BacktestTables
) -> dict[str, Any]:
    status = tables.accounts["status"]
    failing = tables.breaches.filter(pl.col("action") == "phase_failed")
    by_rule = (
        failing.group_by("rule")
        .agg(pl.len())
        .sort(["len", "rule"], descending=[True, False])
    )
    days: dict[int, int] = {}
    for entry in accounts:
        if entry["status"] == "failed" and entry["end"] is not None:
            day = (entry["end"] - entry["start"]) // 86_400_000
            days[day] = days.get(day, 0) + 1
    drawdowns = [e["max_drawdown"] for e in accounts if e["max_drawdown"] is not None]
    return {
        "accounts": tables.accounts.height,
        "passed": int((status == "passed").sum()),
        "failed": int((status == "failed").sum()),
        "active": int((status == "active").sum()),
        "breaches": tables.breaches.height,
        "failures_by_rule": [
            {"rule": rule, "count": count} for rule, count in by_rule.iter_rows()
        ],
        "days_to_fail": [{"day": d, "count": days[d]} for d in sorted(days)],
        "max_drawdown": _histogram(drawdowns),
    }


def _histogram(values: Sequence[float]) -> list[dict[str, float | int]]:
    if not values:
        return []
    top = max(values)
    width = top / _DRAWDOWN_BINS if top > 0 else 1.0
    counts = [0] * _DRAWDOWN_BINS
    for value in values:
        counts[min(_DRAWDOWN_BINS - 1, int(value / width))] += 1
    return [
        {"from": round(i * width, 6), "to": round((i + 1) * width, 6), "count": count}
        for i, count in enumerate(counts)
    ]


# ------------------------------------------------------------------------- HTML


def render_report(data: Mapping[str, Any], title: str = "prop-stream backtest") -> str:
    """The report page: template, uPlot and the data in one HTML document.

    Args:
        data: What :func:`report_data` returns.
        title: The page title.

    Returns:
        The HTML text.
    """
    assets = resources.files("prop_stream.backtest").joinpath(_ASSETS)
    template = assets.joinpath(_TEMPLATE).read_text(encoding="utf-8")
    # `</` inside a script element would end it; JSON allows `<\/` for `</`.
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace(
        "</", "<\\/"
    )
    replacements = {
        "__TITLE__": html.escape(title),
        "/*__UPLOT_CSS__*/": assets.joinpath(_UPLOT_CSS).read_text(encoding="utf-8"),
        "__DATA__": payload,
        "/*__UPLOT_JS__*/": assets.joinpath(_UPLOT_JS).read_text(encoding="utf-8"),
    }
    missing = [marker for marker in replacements if marker not in template]
    if missing:
        raise RuntimeError(f"report template lacks {', '.join(missing)}")
    # One pass over the template: a marker inside text already put in (the data
    # is user text) is never replaced.
    pattern = "|".join(re.escape(marker) for marker in replacements)
    return re.sub(pattern, lambda m: replacements[m.group(0)], template)


def write_report(
    path: Path,
    specs: Sequence[PhaseSpec],
    ticks: Sequence[pl.LazyFrame],
    tables: BacktestTables,
    *,
    max_rows_in_memory: int,
    points_per_account: int = DEFAULT_POINTS_PER_ACCOUNT,
    total_points: int = DEFAULT_TOTAL_POINTS,
    baseline: tuple[Sequence[PhaseSpec], BacktestTables] | None = None,
    compare: Collection[int] = (),
    title: str = "prop-stream backtest",
) -> Path:
    """Write ``report.html`` for a finished run.

    The ticks are read again. Above ``max_rows_in_memory`` rows they are read in
    hash partitions by account, one partition in memory at a time, as the run
    itself does.

    Args:
        path: The file to write (replaced atomically).
        specs: The phases of the rules file.
        ticks: The run's ticks as scanned (four engine columns), in input order.
        tables: The run's outputs.
        max_rows_in_memory: Rows to hold in memory at once.
        points_per_account: Curve points per account at most.
        total_points: Curve points over all accounts at most.
        baseline: As :func:`report_data`'s.
        compare: As :func:`report_data`'s.
        title: The page title.

    Returns:
        ``path``.
    """
    frame = (
        pl.concat(list(ticks), how="vertical")
        if ticks
        else pl.LazyFrame(
            schema={
                "account_id": pl.Int64,
                "ts": pl.Datetime("us", "UTC"),
                "equity": pl.Float64,
                "balance": pl.Float64,
            }
        )
    )
    # Rows of the accounts in the rules: what the report holds in memory.
    rows = int(tables.accounts["ticks"].sum()) + int(
        tables.accounts["late_ticks"].sum()
    )
    parts = max(1, math.ceil(rows / max_rows_in_memory))
    pieces: list[pl.LazyFrame] = (
        [frame]
        if parts == 1
        else [
            frame.filter(pl.col("account_id").hash(seed=0) % parts == part)
            for part in range(parts)
        ]
    )
    data = report_data(
        specs,
        pieces,
        tables,
        points_per_account=points_per_account,
        total_points=total_points,
        baseline=baseline,
        compare=compare,
    )
    page = render_report(data, title)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(page, encoding="utf-8")
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
