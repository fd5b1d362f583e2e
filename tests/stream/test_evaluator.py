"""The evaluator loop over the demo source: restart, backtest agreement, lifecycle."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from replay_support import (
    assert_matches_backtest,
    deals_file,
    demo_backtest_inputs,
    stored_outputs,
)

from prop_stream.backtest import run_backtest
from prop_stream.evaluator import (
    DemoConfig,
    DemoSource,
    EvaluatorLoop,
    LatestMetrics,
    NoneSource,
)
from prop_stream.rules import PhaseSpec
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    Connection,
    ProgramIn,
    ProgramPhaseIn,
    connect,
    create_program,
    cursor,
    customer_id_by_email,
    init_database,
    latest_checkpoint,
    load_position,
    open_account,
    phase_spec,
    query_frame,
    start_challenge,
    transaction,
)

START = datetime(2026, 1, 5, tzinfo=UTC)
#: Five demo accounts ticking once a demo minute, 20 demo minutes per batch.
DEMO = DemoConfig(
    seed=11, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=START
)
BATCHES = 120  # 40 demo hours: two Prague days and a bit
CHECKPOINT_EVERY = 10


@dataclass
class Service:
    """A loop over a database, as a test drives it."""

    conn: Connection
    loop: EvaluatorLoop
    source: DemoSource

    def close(self) -> None:
        self.conn.close()


def _service(path: Path | str, *, kept: int = 5, config: DemoConfig = DEMO) -> Service:
    conn = connect(path)
    source = DemoSource(config)
    loop = EvaluatorLoop(
        cursor(conn),
        source,
        DuckDBSink(cursor(conn), source=source.name, checkpoints_kept=kept),
        checkpoint_every=CHECKPOINT_EVERY,
        poll_timeout_s=0.05,
    )
    return Service(conn, loop, source)


def _fresh_db(path: Path | str) -> Path | str:
    init_database(path, demo=True, now=START)
    return path


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("uninterrupted") / "prop.duckdb"
    _fresh_db(path)
    service = _service(path)
    stats = service.loop.run(max_batches=BATCHES)
    assert stats.batches == BATCHES
    service.close()
    return path


@pytest.fixture(scope="module")
def expected(uninterrupted: Path) -> dict[str, pl.DataFrame]:
    conn = connect(uninterrupted, read_only=True)
    out = stored_outputs(conn)
    conn.close()
    return out


def test_evaluator_demo_run_produces_breaches_snapshots_and_transitions(
    expected: dict[str, pl.DataFrame],
) -> None:
    assert expected["breaches"].height > 0
    assert set(expected["breaches"]["severity"]) == {"warning", "critical"}
    days = expected["daily"].group_by("account_id").len()["len"].to_list()
    assert len(days) == 5
    assert max(days) >= 2
    assert expected["history"].height >= 5 * BATCHES // 2
    assert expected["latest"].height == 5
    assert "failed" in set(expected["phases"]["status"])


@pytest.mark.parametrize(
    ("crash_after", "rewind"),
    [(75, 0), (75, 2), (33, 0), (CHECKPOINT_EVERY * 4, 0)],
    ids=["mid-interval", "older-checkpoint", "early", "right-after-checkpoint"],
)
def test_evaluator_restart_from_checkpoint_equals_uninterrupted_run(
    tmp_path: Path, expected: dict[str, pl.DataFrame], crash_after: int, rewind: int
) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    first = _service(path)
    first.loop.run(max_batches=crash_after, checkpoint_on_exit=False)  # a crash
    first.close()
    if rewind:
        conn = connect(path)
        conn.execute(
            "DELETE FROM engine_checkpoints WHERE id IN (SELECT id FROM "
            "engine_checkpoints ORDER BY id DESC LIMIT ?)",
            [rewind],
        )
        conn.close()

    second = _service(path)
    second.loop.start()
    restored = second.loop.stats.batch_seq
    assert restored == crash_after // CHECKPOINT_EVERY * CHECKPOINT_EVERY - (
        rewind * CHECKPOINT_EVERY
    )
    assert second.loop.stats.restored_from is not None
    second.loop.run(max_batches=BATCHES - restored)
    assert second.loop.stats.batch_seq == BATCHES
    got = stored_outputs(second.conn)
    second.close()
    for name, frame in expected.items():
        assert got[name].equals(frame), name


def test_evaluator_on_postgres_with_a_crash_equals_the_duckdb_run(
    pg_url: str, expected: dict[str, pl.DataFrame]
) -> None:
    # The same demo ticks through the same loop, stored in PostgreSQL, with a
    # crash mid-interval and a restart from the stored checkpoint: the rows equal
    # the uninterrupted DuckDB run's, value for value.
    path = _fresh_db(pg_url)
    first = _service(path)
    first.loop.run(max_batches=75, checkpoint_on_exit=False)
    first.close()
    second = _service(path)
    second.loop.start()
    assert second.loop.stats.batch_seq == 70
    second.loop.run(max_batches=BATCHES - 70)
    got = stored_outputs(second.conn)
    second.close()
    for name, frame in expected.items():
        assert got[name].columns == frame.columns, name
        assert got[name].to_dicts() == frame.to_dicts(), name


def test_evaluator_demo_run_matches_backtest(
    tmp_path: Path, uninterrupted: Path, expected: dict[str, pl.DataFrame]
) -> None:
    rules_file, ticks, _ = demo_backtest_inputs(
        uninterrupted,
        tmp_path,
        config=DEMO,
        batches=BATCHES,
        active_only=False,
    )
    # The demo source trades in deals too: the backtest judges them with the ticks.
    run_backtest(rules_file, ticks, tmp_path / "out", deals=deals_file(ticks))

    assert_matches_backtest(expected, tmp_path / "out")

    accounts_out = pl.read_parquet(tmp_path / "out" / "accounts.parquet")
    stored_status = expected["phases"].filter(pl.col("account_id").is_not_null())
    status = dict(zip(accounts_out["account_id"], accounts_out["status"], strict=True))
    ended = dict(
        zip(accounts_out["account_id"], accounts_out["status_ts"], strict=True)
    )
    for row in stored_status.iter_rows(named=True):
        assert status[row["account_id"]] == row["status"]
        assert ended[row["account_id"]] == row["ended_at"]


def test_evaluator_failed_phase_fails_its_challenge(
    expected: dict[str, pl.DataFrame],
) -> None:
    failed = expected["phases"].filter(pl.col("status") == "failed")
    assert failed.height
    challenges = expected["challenges"].filter(
        pl.col("id").is_in(failed["challenge_id"].implode())
    )
    assert set(challenges["status"]) == {3}
    critical = expected["breaches"].filter(pl.col("action") == "phase_failed")
    for row in failed.iter_rows(named=True):
        ts = critical.filter(pl.col("account_id") == row["account_id"])["ts"]
        assert ts.len() >= 1
        assert set(ts) == {row["ended_at"]}
    assert challenges["ended_at"].to_list() == [
        failed.filter(pl.col("challenge_id") == cid)["ended_at"].item()
        for cid in challenges["id"]
    ]


def test_evaluator_keeps_latest_metrics_in_memory(uninterrupted: Path) -> None:
    conn = connect(uninterrupted, read_only=True)
    table = query_frame(conn, "SELECT * FROM metrics_latest ORDER BY account_id")
    metrics = LatestMetrics()
    metrics.load(conn)
    conn.close()
    assert len(metrics) == table.height
    for row in table.iter_rows(named=True):
        cached = metrics.get(row["account_id"])
        assert cached is not None
        assert dict(cached) == row


def test_evaluator_memory_metrics_follow_each_commit(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    service = _service(path)
    for _ in range(3):
        assert service.loop.run_once()
        table = query_frame(service.conn, "SELECT * FROM metrics_latest")
        for row in table.iter_rows(named=True):
            assert dict(service.loop.metrics.snapshot()[row["account_id"]]) == row
    service.close()


EASY = ProgramIn(
    name="easy",
    price=Decimal("1.00"),
    currency="USD",
    phases=(
        ProgramPhaseIn(
            name="Evaluation",
            phase_type=0,
            account_group="DEMO",
            rules={"initial_balance": 10_000, "profit_target": 0.001},
        ),
    ),
)


def _start_easy_challenge(
    conn: Connection, started_at: datetime, program_in: ProgramIn = EASY
) -> PhaseSpec:
    with transaction(conn):
        program = create_program(conn, program=program_in)
        bob = customer_id_by_email(conn, email="bob@example.com")
        account = open_account(conn, customer_id=bob, account_group="DEMO")
        challenge = start_challenge(
            conn,
            customer_id=bob,
            program_id=program,
            account_id=account,
            started_at=started_at,
        )
    return phase_spec(conn, challenge_id=challenge, phase_index=0)


def _wait(predicate: object, timeout: float = 30.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_evaluator_picks_up_a_phase_registered_while_running(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    service = _service(path)
    stop = threading.Event()
    thread = threading.Thread(target=service.loop.run, args=(stop,))
    thread.start()
    try:
        service.loop.ready.wait(10)
        writer = cursor(service.conn)
        spec = _start_easy_challenge(writer, START + timedelta(hours=1))
        service.loop.register_phase(spec)

        def passed() -> bool:
            row = writer.execute(
                "SELECT status FROM challenges WHERE id = ?", [int(spec.challenge_id)]
            ).fetchone()
            return row == (2,)

        _wait(passed)
        assert service.loop.metrics.get(spec.account_id) is not None
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    assert service.loop.error is None
    assert service.loop.stats.transitions >= 1
    assert spec.account_id not in service.loop.engine  # ended phases are dropped
    phase = writer.execute(
        "SELECT status, ended_at IS NOT NULL FROM challenge_phases "
        "WHERE account_id = ?",
        [spec.account_id],
    ).fetchone()
    assert phase == ("passed", True)
    service.close()


EASY_TWO_STEP = ProgramIn(
    name="easy two-step",
    price=Decimal("1.00"),
    currency="USD",
    phases=(
        EASY.phases[0],
        ProgramPhaseIn(
            name="Funded",
            phase_type=1,
            account_group="REAL",
            rules={"initial_balance": 10_000, "max_total_loss": 0.5},
            profit_split=Decimal("0.8"),
        ),
    ),
)


def test_evaluator_judges_the_next_phase_after_a_pass(tmp_path: Path) -> None:
    # Passing the evaluation phase opens the funded phase on a REAL account in the
    # same commit; the loop registers it and the next batches judge it.
    path = _fresh_db(tmp_path / "prop.duckdb")
    service = _service(path)
    stop = threading.Event()
    thread = threading.Thread(target=service.loop.run, args=(stop,))
    thread.start()
    try:
        service.loop.ready.wait(10)
        writer = cursor(service.conn)
        spec = _start_easy_challenge(writer, START + timedelta(hours=1), EASY_TWO_STEP)
        challenge = int(spec.challenge_id)
        service.loop.register_phase(spec)

        def funded_account() -> int | None:
            row = writer.execute(
                "SELECT account_id FROM challenge_phases WHERE challenge_id = ? "
                "AND phase_index = 1 AND status = 'active'",
                [challenge],
            ).fetchone()
            return None if row is None else int(row[0])

        _wait(lambda: funded_account() is not None)
        funded = funded_account()
        assert funded is not None
        _wait(lambda: service.loop.metrics.get(funded) is not None)
    finally:
        stop.set()
        thread.join(30)
    assert service.loop.error is None
    status = writer.execute(
        "SELECT status FROM challenges WHERE id = ?", [challenge]
    ).fetchone()
    assert status == (2,)  # passed: its last evaluation phase passed
    group = writer.execute(
        "SELECT account_group FROM trading_accounts WHERE account_id = ?", [funded]
    ).fetchone()
    assert group == ("REAL",)
    service.close()


def test_evaluator_remove_phase_stops_judging_it(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    service = _service(path)
    service.loop.run(max_batches=2)
    account = service.source.tracked()[0]
    service.loop.remove_phase(account)
    service.loop.run(max_batches=2)
    assert account not in service.loop.engine
    assert account not in service.source.tracked()
    assert service.loop.metrics.get(account) is None
    service.close()


def test_evaluator_graceful_stop_commits_a_final_checkpoint(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    service = _service(path)
    stop = threading.Event()
    thread = threading.Thread(target=service.loop.run, args=(stop,))
    thread.start()
    _wait(lambda: service.loop.stats.batches >= 5)
    stop.set()
    thread.join(30)
    assert not thread.is_alive()
    stats = service.loop.stats
    checkpoint = latest_checkpoint(service.conn, source="demo")
    assert checkpoint is not None
    assert checkpoint.batch_seq == stats.batch_seq
    assert checkpoint.position["batch"] == stats.batch_seq
    assert load_position(service.conn, source="demo") == checkpoint.position
    history = service.conn.execute("SELECT max(ts) FROM metric_history").fetchone()
    assert history is not None
    assert history[0] is not None
    service.close()


def test_evaluator_with_none_source_idles_and_stops(tmp_path: Path) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    conn = connect(path)
    loop = EvaluatorLoop(
        cursor(conn),
        NoneSource(),
        DuckDBSink(cursor(conn), source="none"),
        poll_timeout_s=0.05,
    )
    thread = threading.Thread(target=loop.run)
    thread.start()
    assert loop.ready.wait(10)
    time.sleep(0.2)
    loop.stop()
    thread.join(10)
    assert not thread.is_alive()
    assert loop.stats.batches == 0
    assert len(loop.engine) == 5
    assert latest_checkpoint(conn, source="none") is not None
    conn.close()


# ----------------------------------------------------------------- demo source


def _spec(account: int, started_at: datetime = START) -> PhaseSpec:
    return PhaseSpec(
        account_id=account,
        challenge_id="c",
        phase_index=0,
        started_at=started_at,
        rules={"initial_balance": 100_000},
    )


def test_demo_source_replays_a_batch_exactly_after_seek() -> None:
    source = DemoSource(DEMO)
    for account in (1, 2, 3):
        source.track(_spec(account))
    batches = [source.poll(10_000, 0.1) for _ in range(6)]
    position_after_2 = batches[1][1]
    again = DemoSource(DEMO)
    for account in (3, 1, 2):
        again.track(_spec(account))
    again.seek(position_after_2)
    for ticks, position in batches[2:]:
        replay, replay_position = again.poll(10_000, 0.1)
        assert replay.equals(ticks)
        assert replay_position == position
    assert source.ticks(range(6)).equals(pl.concat([t for t, _ in batches]))


def test_demo_source_ticks_of_an_account_ignore_the_others() -> None:
    alone = DemoSource(DEMO)
    alone.track(_spec(7))
    crowd = DemoSource(DEMO)
    for account in (5, 6, 7, 8):
        crowd.track(_spec(account))
    alone.start()
    crowd.seek(alone.position())
    mine = crowd.ticks(range(10)).filter(pl.col("account_id") == 7)
    assert mine.equals(alone.ticks(range(10)))


def test_demo_source_simulates_trading_activity() -> None:
    source = DemoSource(DEMO)
    source.track(_spec(1))
    ticks = source.ticks(range(BATCHES))
    open_ = ticks.filter(pl.col("equity") != pl.col("balance")).height
    assert 0 < open_ < ticks.height  # positions open and close
    assert ticks["balance"].n_unique() > 10  # closed trades move the balance
    assert ticks["ts"].is_sorted()


def test_demo_source_skips_ticks_before_the_phase_start() -> None:
    source = DemoSource(DEMO)
    late_start = START + timedelta(hours=2, minutes=5)
    source.track(_spec(1, late_start))
    ticks = source.ticks(range(12))
    assert ticks.height
    first = ticks["ts"].min()
    assert isinstance(first, datetime)
    assert late_start <= first < late_start + timedelta(minutes=1)
    assert ticks["balance"][0] == 100_000.0  # the walk starts at the phase start


def test_demo_source_realtime_waits_for_the_wall_clock() -> None:
    now = [START.timestamp()]
    source = DemoSource(
        DemoConfig(batch_ms=1_000, realtime=True, epoch=START, rate=10),
        clock=lambda: now[0],
    )
    source.track(_spec(1))
    ticks, position = source.poll(1_000, 0.01)
    assert ticks.height == 0
    assert position["batch"] == 0
    now[0] += 1.0
    ticks, position = source.poll(1_000, 0.01)
    assert ticks.height == 10
    assert position["batch"] == 1


#: The loop of these tests in a process of its own, printing each committed batch.
_WORKER = textwrap.dedent(
    f"""
    import sys, time
    from datetime import datetime, UTC
    from prop_stream.evaluator import DemoConfig, DemoSource, EvaluatorLoop
    from prop_stream.sinks import DuckDBSink
    from prop_stream.store import connect, cursor

    start = datetime(2026, 1, 5, tzinfo=UTC)
    config = DemoConfig(seed={DEMO.seed}, rate={DEMO.rate!r},
        batch_ms={DEMO.batch_ms}, realtime=False, epoch=start)
    conn = connect(sys.argv[1])
    loop = EvaluatorLoop(cursor(conn), DemoSource(config),
        DuckDBSink(cursor(conn), source="demo", checkpoints_kept=5),
        checkpoint_every={CHECKPOINT_EVERY})
    loop.start()
    while loop.stats.batch_seq < int(sys.argv[2]):
        loop.run_once()
        print(loop.stats.batch_seq, flush=True)
    time.sleep(600)
    """
)


@pytest.mark.integration
def test_evaluator_sigkill_restart_equals_uninterrupted_run(
    tmp_path: Path, expected: dict[str, pl.DataFrame]
) -> None:
    path = _fresh_db(tmp_path / "prop.duckdb")
    proc = subprocess.Popen(  # noqa: S603 - this interpreter, our own script
        [sys.executable, "-c", _WORKER, str(path), str(BATCHES)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            if int(line) >= 57:
                break
        os.kill(proc.pid, signal.SIGKILL)  # wherever it is, maybe mid-commit
        proc.wait(30)
    finally:
        proc.stdout.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL

    service = _service(path)
    service.loop.start()
    restored = service.loop.stats.batch_seq
    assert restored >= 50
    service.loop.run(max_batches=BATCHES - restored)
    got = stored_outputs(service.conn)
    service.close()
    for name, frame in expected.items():
        assert got[name].equals(frame), name


def test_evaluator_demo_deals_are_judged_with_the_ticks(tmp_path: Path) -> None:
    service = _service(_fresh_db(tmp_path / "prop.duckdb"))
    stats = service.loop.run(max_batches=30)
    assert stats.deals > 0
    assert stats.deals_judged + sum(stats.deals_skipped.values()) == stats.deals
    assert stats.deals_judged > 0
    latest = query_frame(
        service.conn, "SELECT open_lots, open_positions FROM metrics_latest"
    )
    service.close()
    assert latest.height
    assert latest["open_lots"].null_count() == 0
    assert latest["open_positions"].null_count() == 0
