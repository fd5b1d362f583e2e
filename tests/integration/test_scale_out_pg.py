"""Issue 9's acceptance test: the scale-out deployment, at scale, on one machine.

Real Kafka (the shared broker), a real PostgreSQL (``scripts/pg-local``, a fresh
database), real processes: one ``serve --role api`` and one ``--role jobs`` take
300 purchases over HTTP (two-step and one-step programs, two customers), and
three ``serve --role evaluator`` processes in one consumer group judge ~50k ticks
on a 6-partition topic. The ticks come in stages, because a next phase's account
only exists once its previous phase passed (its id comes from the store's
sequence, in whatever order the evaluators commit their passes):

1. every purchased challenge's first phase (120 ticks over five days each):
   about half pass, the rest fail (overall or daily loss) or keep running;
2. the phases those passes opened, read from the store, on accounts that mostly
   live in another partition than the phase that passed (asserted);
3. the funded phases the second-phase passes opened.

During stage 1 one evaluator is SIGKILLed mid-stream and another is SIGSTOPped
past the session timeout; it is SIGCONTinued in stage 2 (its late commit must be
refused: ``commit fenced`` in its log) and a fourth evaluator joins. When every
stored position has reached its partition's end, the store equals the backtest
command run over every stage's ticks with every phase the store opened: breaches
and daily snapshots in every column, row for row; ``metrics_latest`` (one row per
judged account: equity, balance, HWM, day-start equity, trading days); each
phase's status and end; each challenge's status; and the deposits: one
``initial_deposit`` ledger row per opened phase (each purchase's first phase, and
the next phase of every phase the backtest passed, started at the backtest's pass
instant), of the phase's ``initial_balance``, none doubled, every challenge
account's balance equal to its ledger.

The evaluators stage their partitions' ticks for the archive in a shared
directory (``PROP_STREAM_ARCHIVE_DIR``); moved at the end, the archive holds
every produced tick once, each partition's in its own stream and files.
"""

from __future__ import annotations

import json
import math
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import polars as pl
import psycopg
import pytest
from kafka import KafkaConsumer
from kafka.structs import TopicPartition
from replay_support import assert_matches_backtest, stored_outputs
from service_process import ServiceProcess, run_prop_stream

from integration.conftest import TopicFactory
from prop_stream.kafka.produce import partition_of
from prop_stream.kafka.source import dlq_topic_for
from prop_stream.store import connect, cursor
from prop_stream.store.archive import TickArchiver

pytestmark = pytest.mark.integration

PARTITIONS = 6
SESSION_TIMEOUT_MS = 6_000
#: The demo programs (``prop_stream/store/demo.py``): 1 two-step, 2 one-step.
TWO_STEP, ONE_STEP = 1, 2
PURCHASES = 300
CUSTOMERS = ("alice@example.com", "bob@example.com")
#: Ticks per phase in each stage, spread over five days.
TICKS_PER_PHASE = (120, 110, 40)
SPAN = timedelta(days=5)
#: The ticks lie days after the purchases (a phase needs 3-4 trading days):
#: the evaluators accept ticks up to 30 days ahead of their clock.
CLOCK_SKEW_S = 30 * 24 * 3600
PURCHASE_ACTIVE = 3
CHALLENGE_ACTIVE, CHALLENGE_PASSED, CHALLENGE_FAILED = 1, 2, 3
EVALUATION = 0


def _until(
    condition: Callable[[], bool],
    timeout_s: float,
    what: str,
    detail: Callable[[], str] | None = None,
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            more = f"\n{detail()}" if detail is not None else ""
            pytest.fail(f"timed out waiting for {what}{more}")
        time.sleep(0.5)


def _rows(url: str, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description is not None else []


# ------------------------------------------------------------------ ticks


def _outcome(challenge_id: int, phase_index: int, funded: bool) -> str:
    """Which path a phase's equity takes (a spread of passes, failures, the rest)."""
    if funded:
        return ("fail_total", "wobble")[challenge_id % 2]
    slot = (challenge_id * 7 + phase_index * 3) % 20
    if slot < 11:
        return "pass"
    if slot < 14:
        return "fail_total"
    if slot < 17:
        return "fail_daily"
    return "wobble"


def _path(outcome: str, x: float, i: int, target: float) -> float:
    """Equity over the initial balance at ``x`` in [0, 1] (tick ``i``)."""
    if outcome == "pass":
        # Past the target after four of the five days: passes once days suffice.
        return 1 + (target + 0.012) * x
    if outcome == "fail_total":
        return 1 - 0.12 * x
    if outcome == "fail_daily":
        # A 6.5 % drop within a few hours, a third of the way in.
        return 1 + 0.01 * x - (0.065 if i >= 40 else 0.016 * max(0, i - 36))
    return 1 + 0.02 * math.sin(2 * math.pi * 3 * x)


def _stage_ticks(
    phases: list[tuple[Any, ...]], start: datetime, per_phase: int
) -> pl.DataFrame:
    """Ticks from ``start`` for phases ``(account, challenge, index, rules)``."""
    step = SPAN / per_phase
    rows: dict[str, list[Any]] = {
        "account_id": [],
        "ts": [],
        "equity": [],
        "balance": [],
    }
    for account, challenge, index, rules in phases:
        initial = float(rules["initial_balance"])
        target = rules.get("profit_target")
        outcome = _outcome(int(challenge), int(index), target is None)
        # Accounts tick at different seconds, so the stream interleaves them.
        offset = timedelta(seconds=int(account) % 97)
        for i in range(per_phase):
            level = _path(outcome, i / (per_phase - 1), i, float(target or 0.0))
            balance = round(initial * level, 2)
            rows["account_id"].append(int(account))
            rows["ts"].append(start + offset + step * i)
            # An open position on odd ticks: equity and balance part a little.
            rows["equity"].append(balance + (7.5 if i % 2 else 0.0))
            rows["balance"].append(balance)
    frame = pl.DataFrame(
        rows,
        schema={
            "account_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    )
    return frame.sort("ts", "account_id")


def _after(ticks: pl.DataFrame) -> datetime:
    """An hour past the last tick: the next stage starts there."""
    last = ticks["ts"].max()
    assert isinstance(last, datetime)
    return last + timedelta(hours=1)


def _active_phases(url: str, index: int) -> list[tuple[Any, ...]]:
    return _rows(
        url,
        "SELECT account_id, challenge_id, phase_index, rules::jsonb FROM "
        "challenge_phases WHERE status = 'active' AND phase_index = %s "
        "AND account_id IS NOT NULL AND challenge_id IN "
        "(SELECT id FROM challenges WHERE purchase_id IS NOT NULL) "
        "ORDER BY account_id",
        [index],
    )


# -------------------------------------------------------------- purchases


def _buy_challenges(url: str, api: str) -> list[int]:
    """300 purchases over HTTP (alternating customers and programs): challenges."""
    tokens = []
    for email in CUSTOMERS:
        made = run_prop_stream(["session", email, "--db", url])
        assert made.returncode == 0, made.stderr
        token = made.stdout.strip()
        payers = httpx.get(
            f"{api}/prop/payer-accounts",
            params={"program_id": TWO_STEP},
            headers={"Authorization": f"Bearer {token}"},
            timeout=30,
        )
        assert payers.status_code == 200, payers.text
        payer = int(payers.json()["items"][0]["account_id"])
        tokens.append((token, payer))
    # Enough money for 150 fees each (the top-up is no ledger movement).
    _rows(
        url,
        "UPDATE trading_accounts SET balance = 100000 WHERE account_id = ANY(%s)",
        [[payer for _, payer in tokens]],
    )

    def buy(n: int) -> int:
        token, payer = tokens[n % 2]
        program = ONE_STEP if n % 5 == 4 else TWO_STEP
        answer = httpx.post(
            f"{api}/prop/purchases",
            json={"program_id": program, "payer_account_id": payer},
            headers={"Authorization": f"Bearer {token}", "Idempotency-Key": f"k{n}"},
            timeout=60,
        )
        assert answer.status_code == 201, answer.text
        return int(answer.json()["challenge_id"])

    with ThreadPoolExecutor(max_workers=6) as pool:
        return list(pool.map(buy, range(PURCHASES)))


# ---------------------------------------------------------------- the test


def test_purchases_passes_across_partitions_kill_pause_and_join_equal_the_backtest(
    tmp_path: Path, pg_url: str, kafka_bootstrap: str, topic_factory: TopicFactory
) -> None:
    done = run_prop_stream(["init", "--db", pg_url, "--demo"])
    assert done.returncode == 0, done.stderr
    topic = topic_factory(partitions=PARTITIONS)
    group = f"group-{topic}"
    archive_root = tmp_path / "shared-archive"
    procs: list[ServiceProcess] = []

    def service(
        role: str, *extra: str, env: dict[str, str] | None = None
    ) -> ServiceProcess:
        where = tmp_path / f"{role}-{len(procs)}"
        where.mkdir()
        proc = ServiceProcess(
            ["serve", "--db", pg_url, "--role", role, "--port", "0", *extra],
            where,
            env={"PROP_STREAM_LOG_FORMAT": "json", **(env or {})},
        )
        procs.append(proc)
        return proc

    def evaluator() -> ServiceProcess:
        return service(
            "evaluator",
            "--source", "kafka", "--kafka-bootstrap", kafka_bootstrap,
            "--topic", topic, "--group", group,
            env={
                "PROP_STREAM_KAFKA_SESSION_TIMEOUT_MS": str(SESSION_TIMEOUT_MS),
                "PROP_STREAM_CHECKPOINT_EVERY": "5",
                "PROP_STREAM_MAX_BATCH_RECORDS": "2000",
                "PROP_STREAM_MAX_CLOCK_SKEW": str(CLOCK_SKEW_S),
                # The archive's shared directory: each member stages its
                # partitions' ticks in their own streams.
                "PROP_STREAM_ARCHIVE_DIR": str(archive_root),
            },
        )  # fmt: skip

    files: list[Path] = []

    def produce(frame: pl.DataFrame) -> None:
        path = tmp_path / f"ticks{len(files)}.parquet"
        frame.write_parquet(path)
        files.append(path)
        sent = run_prop_stream(
            ["produce", str(path), "--kafka-bootstrap", kafka_bootstrap,
             "--topic", topic],
            timeout_s=300,
        )  # fmt: skip
        assert sent.returncode == 0, sent.stderr

    def stored() -> dict[str, int]:
        return {
            str(key): int(offset)
            for key, offset in _rows(
                pg_url,
                "SELECT partition, next_offset FROM source_offsets "
                "WHERE source = 'kafka'",
            )
        }

    consumer = KafkaConsumer(bootstrap_servers=kafka_bootstrap)

    def at_end(timeout_s: float) -> None:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        ends = {
            f"{topic}:{tp.partition}": int(o)
            for tp, o in consumer.end_offsets(tps).items()
            if o
        }
        _until(
            lambda: {k: v for k, v in stored().items() if k in ends} == ends,
            timeout_s,
            "every stored position at its partition's end",
            lambda: (
                f"stored {sorted(stored().items())}\nends {sorted(ends.items())}\n"
                + "\n".join(
                    f"[{n}] {line[:400]}"
                    for n, proc in enumerate(procs)
                    for line in proc.lines()
                    if '"level": "INFO"' not in line and "GET /" not in line
                )[-8000:]
            ),
        )

    evaluators: list[ServiceProcess] = []
    try:
        api = service("api")
        service("jobs")
        evaluators += [evaluator() for _ in range(3)]
        for proc in procs:
            proc.wait_ready()
        challenges = _buy_challenges(pg_url, api.url or "")
        assert len(set(challenges)) == PURCHASES
        # The jobs process withdraws every fee and deposits every first phase.
        _until(
            lambda: _rows(
                pg_url, "SELECT count(*) FROM purchases WHERE status = %s",
                [PURCHASE_ACTIVE],
            ) == [(PURCHASES,)],
            180,
            "every purchase active",
        )  # fmt: skip
        latest_start = _rows(pg_url, "SELECT max(started_at) FROM challenge_phases")
        start = latest_start[0][0].replace(microsecond=0) + timedelta(minutes=1)

        # Stage 1, in two halves around a SIGKILL; a SIGSTOP in the second.
        first = _active_phases(pg_url, 0)
        assert len(first) == PURCHASES
        stage = _stage_ticks(first, start, TICKS_PER_PHASE[0])
        half = stage.height // 2
        produce(stage.slice(0, half))
        _until(lambda: bool(stored()), 120, "a first committed batch")
        killed, paused, steady = evaluators

        def assignments() -> int:
            return sum(
                f"consumer group {group}: assigned" in line for line in steady.lines()
            )

        before = assignments()
        killed.signal(signal.SIGKILL)
        killed.wait(30)  # and close its pipes
        # Past the session timeout the group gives the dead member's away.
        _until(
            lambda: assignments() > before,
            SESSION_TIMEOUT_MS / 1000 * 10,
            "a rebalance without the killed member",
        )
        produce(stage.slice(half))
        before = assignments()
        paused.signal(signal.SIGSTOP)
        _until(
            lambda: assignments() > before,
            SESSION_TIMEOUT_MS / 1000 * 10,
            "a rebalance without the paused member",
        )
        at_end(300)

        # Stage 2: the phases the passes opened, some in other partitions.
        opened = _active_phases(pg_url, 1)
        assert len(opened) >= 100, len(opened)
        home = {
            int(c): int(a)
            for a, c, _ in _rows(
                pg_url,
                "SELECT account_id, challenge_id, phase_index FROM challenge_phases "
                "WHERE phase_index = 0",
            )
        }
        moved = [
            row
            for row in opened
            if partition_of(int(row[0]), PARTITIONS)
            != partition_of(home[int(row[1])], PARTITIONS)
        ]
        assert len(moved) >= len(opened) // 2, (len(moved), len(opened))
        produce(_stage_ticks(opened, _after(stage), TICKS_PER_PHASE[1]))
        paused.signal(signal.SIGCONT)
        evaluators.append(evaluator())
        evaluators[-1].wait_ready()
        at_end(300)
        paused.wait_for_line(lambda line: "commit fenced" in line, 60)

        # Stage 3: the funded phases the second passes opened.
        funded = _active_phases(pg_url, 2)
        assert funded
        produce(
            _stage_ticks(funded, _after(pl.read_parquet(files[-1])), TICKS_PER_PHASE[2])
        )
        at_end(300)
        # Every deposit the passes queued is applied.
        _until(
            lambda: _rows(
                pg_url, "SELECT count(*) FROM jobs WHERE status <> 'done'"
            ) == [(0,)],
            120,
            "every job done",
        )  # fmt: skip
        # No tick was a dead letter: the accounts the passes opened were known
        # at their first tick, on whichever member owns their partition.
        dlq = dlq_topic_for(topic)
        dlq_parts = consumer.partitions_for_topic(dlq)
        ends = consumer.end_offsets([TopicPartition(dlq, p) for p in dlq_parts])
        assert sum(ends.values()) == 0, ends
    finally:
        consumer.close()
        for proc in procs:
            if proc.proc.poll() is None:
                proc.signal(signal.SIGCONT)
                proc.stop(90)
            else:
                proc.kill()
    for n, proc in enumerate(procs):
        if proc is not evaluators[0]:  # the SIGKILLed one
            assert "Traceback" not in "".join(proc.lines()), n

    _assert_equals_backtest(pg_url, tmp_path, files)
    _assert_archived_once(pg_url, archive_root, topic, files)


def _assert_archived_once(url: str, root: Path, topic: str, files: list[Path]) -> None:
    # Every produced tick once, whoever was killed, paused or fenced; each
    # partition's ticks in its own stream and files.
    ticks = pl.concat([pl.read_parquet(f) for f in files])
    conn = connect(url)
    try:
        streams = conn.execute(
            "SELECT stream FROM archive_streams WHERE next_tick_seq > 0"
        ).fetchall()
        assert {row[0] for row in streams} <= {
            f"{topic}:{n}" for n in range(PARTITIONS)
        }
        moved = TickArchiver(cursor(conn), None, root=root).archive_once()
        assert moved.rows == ticks.height
    finally:
        conn.close()
    archived = pl.read_parquet(root / "ticks" / "**" / "*.parquet")
    order = ["account_id", "ts", "equity", "balance"]
    got = archived.select(order).sort(order)
    assert got.equals(ticks.select(order).cast(got.schema).sort(order))
    names = [p.name for p in (root / "ticks").rglob("part-*.parquet")]
    assert names
    assert all(name.startswith(f"part-{topic}_") for name in names)


# ------------------------------------------------------------- comparison


def _assert_equals_backtest(url: str, root: Path, files: list[Path]) -> None:
    """The store equals the backtest of every tick with every phase it opened."""
    columns = (
        "account_id", "challenge_id", "phase_index", "phase_type", "status",
        "started_at", "ended_at", "rules",
    )  # fmt: skip
    phases = [
        dict(zip(columns, row, strict=True))
        for row in _rows(
            url,
            "SELECT account_id, challenge_id, phase_index, phase_type, status, "
            "started_at, ended_at, rules::jsonb FROM challenge_phases "
            "WHERE challenge_id IN "
            "(SELECT id FROM challenges WHERE purchase_id IS NOT NULL) "
            "ORDER BY challenge_id, phase_index",
        )
    ]
    evaluations: dict[int, int] = {}  # challenge -> its last evaluation phase
    for row in phases:
        if row["phase_type"] == EVALUATION:
            evaluations[row["challenge_id"]] = row["phase_index"]
    started = [row for row in phases if row["account_id"] is not None]
    rules = root / "rules.json"
    accounts_in = [
        {
            "account_id": int(row["account_id"]),
            "challenge_id": str(row["challenge_id"]),
            "phase_index": int(row["phase_index"]),
            "started_at": row["started_at"].isoformat(),
            "rules": row["rules"],
        }
        for row in started
    ]
    rules.write_text(json.dumps({"accounts": accounts_in}))
    ticks = root / "all-ticks.parquet"
    pl.concat([pl.read_parquet(f) for f in files]).write_parquet(ticks)
    out = root / "backtest"
    done = run_prop_stream(
        ["backtest", "--rules", str(rules), "--ticks", str(ticks), "--out", str(out)],
        timeout_s=300,
    )
    assert done.returncode == 0, done.stderr
    conn = connect(url, read_only=True)
    try:
        got = stored_outputs(conn, history=False)
    finally:
        conn.close()

    # Breaches and daily snapshots: every column, row for row (nothing doubled).
    assert_matches_backtest(got, out)
    accounts = pl.read_parquet(out / "accounts.parquet").sort("account_id")
    assert accounts.height == len(started)
    assert accounts["ticks"].min() > 0  # type: ignore[operator]  # every phase judged
    # metrics_latest: one row per judged account, the backtest's final state.
    latest = got["latest"].sort("account_id")
    assert latest["account_id"].to_list() == accounts["account_id"].to_list()
    for column in ("equity", "balance", "hwm", "daily_start_equity", "trading_days"):
        assert latest[column].cast(pl.Float64).to_list() == (
            accounts[column].cast(pl.Float64).to_list()
        ), column

    # Phases: each status and end is the backtest's, and every pass opened the
    # next phase at the pass's instant.
    outcome = {
        (int(row["challenge_id"]), int(row["phase_index"])): row
        for row in accounts.iter_rows(named=True)
    }
    counts = {"passed": 0, "failed": 0, "active": 0}
    challenge_status: dict[int, int] = {}
    expected_deposits = []
    for row in phases:
        key = (int(row["challenge_id"]), int(row["phase_index"]))
        previous = outcome.get((key[0], key[1] - 1))
        if key[1] > 0 and (previous is None or previous["status"] != "passed"):
            # Never opened: the previous phase did not pass (or never ran).
            assert row["status"] == "pending", (key, row["status"])
            assert row["account_id"] is None, key
            continue
        result = outcome[key]
        counts[result["status"]] += 1
        assert row["status"] == result["status"], (key, row["status"], result)
        assert row["account_id"] == result["account_id"], key
        if result["status"] != "active":
            assert row["ended_at"] == result["status_ts"], key
        if previous is not None:
            assert row["started_at"] == previous["status_ts"], key
        expected_deposits.append(
            (key[0], key[1], int(row["account_id"]),
             Decimal(str(row["rules"]["initial_balance"])))
        )  # fmt: skip
        status = challenge_status.get(key[0], CHALLENGE_ACTIVE)
        if result["status"] == "failed":
            status = CHALLENGE_FAILED
        elif result["status"] == "passed" and key[1] == evaluations[key[0]]:
            status = CHALLENGE_PASSED
        challenge_status[key[0]] = status
    # The spread the ticks were built for: every outcome, at every stage.
    assert min(counts.values()) >= 20, counts
    assert outcome_stages(accounts) == {0, 1, 2}
    stored_challenges = {
        int(c): int(s)
        for c, s in got["challenges"].select("id", "status").iter_rows()
        if int(c) in challenge_status
    }
    assert len(stored_challenges) == PURCHASES
    assert stored_challenges == challenge_status

    # Deposits: one initial deposit per opened phase, the backtest's, applied once.
    deposits = _rows(
        url,
        "SELECT j.challenge_id, j.phase_index, l.account_id, l.amount "
        "FROM ledger_entries AS l JOIN jobs AS j ON j.id = l.job_id "
        "WHERE l.kind = 'initial_deposit' ORDER BY 1, 2",
    )
    assert [tuple(d) for d in deposits] == sorted(expected_deposits)
    fees = _rows(
        url,
        "SELECT count(*), count(DISTINCT purchase_id) FROM ledger_entries "
        "WHERE kind = 'fee_withdrawal'",
    )
    assert fees == [(PURCHASES, PURCHASES)]
    unbalanced = _rows(
        url,
        "SELECT a.account_id, a.balance, sum(l.amount) FROM trading_accounts AS a "
        "JOIN ledger_entries AS l ON l.account_id = a.account_id "
        "WHERE l.kind = 'initial_deposit' GROUP BY a.account_id, a.balance "
        "HAVING a.balance <> sum(l.amount)",
    )
    assert unbalanced == []


def outcome_stages(accounts: pl.DataFrame) -> set[int]:
    """The phase indexes the backtest judged."""
    return set(accounts["phase_index"].unique().to_list())
