"""The scale-out evaluator on one DuckDB store: fencing, rebalances, the switch.

A fake group source plays Kafka: a topic of three partitions (the demo ticks,
each account's in the partition the default partitioner gives its key) and the
group coordinator's rebalance events, which the tests hand out. Every scenario
ends with every partition read to its end and compares the store with the
backtest of the same ticks and with one embedded loop that saw them all.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import polars as pl
import pytest
from kafka.partitioner.default import murmur2
from replay_support import (
    assert_matches_backtest,
    demo_backtest_inputs,
    stored_outputs,
)

from prop_stream.backtest import run_backtest
from prop_stream.evaluator import DemoConfig, DemoSource, EvaluatorLoop
from prop_stream.evaluator import group as group_module
from prop_stream.evaluator.faults import transient_reason
from prop_stream.evaluator.group import FENCED_LOG, GroupEvaluatorLoop
from prop_stream.evaluator.sources import TickSource
from prop_stream.rules import Evaluation, RuleEngine
from prop_stream.sinks import DuckDBSink
from prop_stream.store import (
    Connection,
    ProgramIn,
    ProgramPhaseIn,
    cancel_challenge,
    connect,
    create_program,
    cursor,
    customer_id_by_email,
    init_database,
    open_account,
    start_challenge,
    transaction,
)
from prop_stream.store.partitions import (
    PartitionFencedError,
    check_epoch,
    current_epoch,
    take_epoch,
)
from prop_stream.store.pg import PgConnection
from prop_stream.store.progress import Position

START = datetime(2026, 1, 5, tzinfo=UTC)
# Ticks only: the fake topic carries no deals (deals in group mode are covered
# with a real broker in tests/integration/test_serve_kafka_deals.py's group case).
DEMO = DemoConfig(
    seed=11,
    rate=5 / 60,
    batch_ms=20 * 60_000,
    realtime=False,
    epoch=START,
    deals=False,
)
BATCHES = 120
PARTITIONS = 3
TOPIC = "ticks"
#: Ticks a fake poll hands out per partition (small: many batches, many cuts).
CHUNK = 40


def _partition_of(account_id: int) -> int:
    return int(murmur2(str(account_id).encode()) & 0x7FFFFFFF) % PARTITIONS


class FakeTopic(TickSource):
    """A partitioned topic read like the Kafka source reads it (group or not).

    Args:
        partitions: Each partition's ticks; a row's index is its offset.
    """

    name = "kafka"
    topic = TOPIC

    def __init__(self, partitions: dict[int, pl.DataFrame]) -> None:
        # Not a copy: a test may append ticks to a partition (the topic grows).
        self._data = partitions
        self._live: dict[int, int] = {}
        self._events: list[tuple[str, list[int]]] = []
        self._slices: list[tuple[int, int, int, int]] = []
        self._first: dict[int, int] = {}

    # -- the group coordinator, driven by the test
    def assign(self, *numbers: int) -> None:
        self._events.append(("assigned", list(numbers)))

    def revoke(self, *numbers: int) -> None:
        self._events.append(("revoked", list(numbers)))

    def lose(self, *numbers: int) -> None:
        self._events.append(("lost", list(numbers)))

    def at_end(self, number: int) -> bool:
        """Whether partition ``number`` is live here and read to its end."""
        return self._live.get(number, -1) >= self._data[number].height

    # -- GroupSource
    def rebalance_events(self) -> list[tuple[str, list[int]]]:
        events, self._events = self._events, []
        return events

    def resume_partition(self, partition: int, offset: int | None) -> None:
        self._live[partition] = offset or 0

    def drop_partition(self, partition: int) -> None:
        self._live.pop(partition, None)

    def last_slices(
        self, committed: Mapping[str, int] | None = None
    ) -> list[tuple[int, int, int, int]]:
        out = []
        for number, start, end, _ in self._slices:
            offset = (committed or {}).get(f"{TOPIC}:{number}")
            first = self._first[number]
            skip = 0 if offset is None else max(0, min(end - start, offset - first))
            out.append((number, start, end, start + skip))
        return out

    def last_deals(self) -> dict[int, pl.DataFrame]:
        return {}

    def last_deal_cuts(self, committed: Mapping[str, int]) -> dict[int, int]:
        return {}

    def partition_of(self, account_id: int) -> int | None:
        return _partition_of(account_id)

    # -- TickSource (the embedded loop assigns itself every partition)
    def poll(self, max_records: int, timeout: float) -> tuple[pl.DataFrame, Position]:
        frames, self._slices, row = [], [], 0
        for number in sorted(self._live):
            offset = self._live[number]
            part = self._data[number].slice(offset, CHUNK)
            if not part.height:
                continue
            frames.append(part)
            self._slices.append((number, row, row + part.height, row))
            self._first[number] = offset
            row += part.height
            self._live[number] = offset + part.height
        ticks = pl.concat(frames) if frames else self._data[0].clear()
        return ticks, self.position()

    def seek(self, position: Position) -> None:
        self._live = {
            n: int(position.get(f"{TOPIC}:{n}", 0)) for n in sorted(self._data)
        }

    def position(self) -> dict[str, int]:
        return {f"{TOPIC}:{n}": offset for n, offset in self._live.items()}


def _topic(ticks: pl.DataFrame) -> dict[int, pl.DataFrame]:
    home = ticks.with_columns(
        pl.col("account_id")
        .map_elements(_partition_of, return_dtype=pl.Int64)
        .alias("_p")
    )
    return {n: home.filter(pl.col("_p") == n).drop("_p") for n in range(PARTITIONS)}


def _group_loop(conn: Connection, topic: FakeTopic, owner: str) -> GroupEvaluatorLoop:
    sink_cursor = cursor(conn)
    return GroupEvaluatorLoop(
        cursor(conn),
        topic,
        lambda: DuckDBSink(sink_cursor, source="kafka"),
        checkpoint_every=3,
        poll_timeout_s=0.01,
        archive=True,
        owner=owner,
        hook_interval_s=0.0,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, pl.DataFrame]:
    """The backtest's output and the topic's ticks."""
    root = tmp_path_factory.mktemp("inputs")
    db = root / "prop.duckdb"
    init_database(db, demo=True, now=START)
    rules, ticks_file, _ = demo_backtest_inputs(
        db, root, config=DEMO, batches=BATCHES, active_only=False
    )
    run_backtest(rules, ticks_file, root / "out")
    return root / "out", pl.read_parquet(ticks_file)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pl.DataFrame]:
    """What one embedded loop over the demo ticks stores."""
    db = tmp_path_factory.mktemp("embedded") / "prop.duckdb"
    init_database(db, demo=True, now=START)
    conn = connect(db)
    try:
        source = DemoSource(DEMO)
        loop = EvaluatorLoop(
            cursor(conn), source, DuckDBSink(cursor(conn), source=source.name)
        )
        loop.run(max_batches=BATCHES)
        return stored_outputs(conn, history=False)
    finally:
        conn.close()


def _fresh(store_db: Path | str) -> Connection:
    """The demo store on either backend (``store_db``: a path or a URL)."""
    init_database(store_db, demo=True, now=START)
    return connect(store_db)


def _drain(*pairs: tuple[GroupEvaluatorLoop, FakeTopic], limit: int = 500) -> None:
    for _ in range(limit):
        if all(any(topic.at_end(n) for _, topic in pairs) for n in range(PARTITIONS)):
            return
        for loop, _ in pairs:
            loop.run_once()
    pytest.fail("the topic was not read to its end")


def _assert_results(
    conn: Connection,
    inputs: tuple[Path, pl.DataFrame],
    embedded: dict[str, pl.DataFrame],
) -> None:
    got = stored_outputs(conn, history=False)
    assert_matches_backtest(got, inputs[0])
    for name in ("latest", "challenges", "phases"):
        assert got[name].equals(embedded[name]), name
    # Nothing doubled: one archived tick per tick, one position per partition.
    staged = conn.execute("SELECT count(*) FROM tick_archive_staging").fetchall()
    assert staged[0][0] == inputs[1].height
    # Each partition's ticks in its own archive stream, numbered 0..n-1 once.
    streams = conn.execute(
        "SELECT stream, count(*), count(DISTINCT seq), min(seq), max(seq) "
        "FROM tick_archive_staging WHERE stream <> '' GROUP BY stream"
    ).fetchall()
    for stream, rows, distinct, low, high in streams:
        assert stream.startswith(f"{TOPIC}:")
        assert (rows, low, high) == (distinct, 0, distinct - 1), stream
    positions = conn.execute(
        "SELECT \"partition\", next_offset FROM source_offsets WHERE source = 'kafka' "
        'ORDER BY "partition"'
    ).fetchall()
    topic = _topic(inputs[1])
    assert positions == [(f"{TOPIC}:{n}", topic[n].height) for n in sorted(topic)]


def test_take_epoch_fences_the_earlier_owner_and_rolls_its_transaction_back(
    store_db: Path | str,
) -> None:
    conn = _fresh(store_db)
    try:
        first = take_epoch(conn, source="kafka", partition="t:0", owner="a")
        assert first == 1
        check_epoch(conn, source="kafka", partition="t:0", epoch=first)
        second = take_epoch(conn, source="kafka", partition="t:0", owner="b")
        assert second == 2
        sink = DuckDBSink(cursor(conn), source="kafka")
        sink.add(_no_outputs(), position={"t:0": 99})

        def fence(c: Connection) -> None:
            check_epoch(c, source="kafka", partition="t:0", epoch=first)

        with pytest.raises(PartitionFencedError) as refused:
            sink.flush(fence=fence)
        assert refused.value.current == 2
        rows = conn.execute(
            "SELECT count(*) FROM source_offsets WHERE \"partition\" = 't:0'"
        ).fetchall()
        assert rows[0][0] == 0  # rolled back
        assert current_epoch(conn, source="kafka", partition="t:0") == 2
    finally:
        conn.close()


def _no_outputs() -> Evaluation:
    return RuleEngine().process(
        pl.DataFrame(
            schema={
                "account_id": pl.Int64,
                "ts": pl.Datetime("us", "UTC"),
                "equity": pl.Float64,
                "balance": pl.Float64,
            }
        )
    )


def test_a_paused_members_late_commit_is_refused_and_nothing_doubles(
    store_db: Path | str,
    inputs: tuple[Path, pl.DataFrame],
    embedded: dict[str, pl.DataFrame],
    caplog: pytest.LogCaptureFixture,
) -> None:
    conn = _fresh(store_db)
    try:
        partitions = _topic(inputs[1])
        busy = max(partitions, key=lambda n: partitions[n].height)
        old_topic, new_topic = FakeTopic(partitions), FakeTopic(partitions)
        old = _group_loop(conn, old_topic, "old")
        new = _group_loop(conn, new_topic, "new")
        old_topic.assign(*range(PARTITIONS))
        for _ in range(7):
            old.run_once()
        assert set(old.partitions()) == set(range(PARTITIONS))
        before = conn.execute(
            'SELECT next_offset FROM source_offsets WHERE "partition" = ?',
            [f"{TOPIC}:{busy}"],
        ).fetchall()[0][0]
        # The old member is paused past its session: the group gives its
        # busiest partition to the new member, which takes the epoch...
        new_topic.assign(busy)
        new.run_once()
        assert new.partitions() == {busy: 2}
        # ... and the old member, resumed, still believes it owns it.
        with caplog.at_level(logging.WARNING, "prop_stream.evaluator.group"):
            old.run_once()
        fenced = [r for r in caplog.records if r.getMessage().startswith(FENCED_LOG)]
        assert len(fenced) == 1
        assert f"{TOPIC}:{busy}" in fenced[0].getMessage()
        assert old.fenced == 1
        assert busy not in old.partitions()
        after = conn.execute(
            'SELECT next_offset FROM source_offsets WHERE "partition" = ?',
            [f"{TOPIC}:{busy}"],
        ).fetchall()[0][0]
        # The old member's batch would have moved it past the new one's.
        assert after <= before + CHUNK
        _drain((old, old_topic), (new, new_topic))
        assert old.fenced == 1
        _assert_results(conn, inputs, embedded)
    finally:
        conn.close()


@pytest.mark.parametrize("stop_at", ["between_statements", "mid_copy"])
def test_a_member_stopped_mid_batch_does_not_hold_its_partition_on_postgres(
    stop_at: str,
    pg_url: str,
    inputs: tuple[Path, pl.DataFrame],
    embedded: dict[str, pl.DataFrame],
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A SIGSTOPped member holds the epoch row's lock: the server ends it.

    The batch's epoch check locks the partition's epoch row to the commit; a
    member stopped after it (SIGSTOP, a VM pause) would make its successor's
    ``take_epoch`` wait until it is resumed. Stopped between two statements
    (the transaction idle) or in the middle of a ``COPY`` (the server waiting
    for its data), the batch is ended by the server past ``stall_timeout_s``.
    """
    conn = _fresh(pg_url)
    stopped, resume = threading.Event(), threading.Event()
    held: list[str] = []
    checked: list[str] = []

    def stop() -> None:
        held.append(checked[-1])
        stopped.set()
        # Stopped with the row locked; bounded, so a regression fails.
        resume.wait(30)
        stopped.clear()  # woken (or given up on): no longer stopped

    def stops_here() -> bool:
        return threading.current_thread().name == "stopped-member" and not held

    def check_then_stop(
        c: Connection, *, source: str, partition: str, epoch: int
    ) -> None:
        check_epoch(c, source=source, partition=partition, epoch=epoch)
        checked.append(partition)
        if stop_at == "between_statements" and stops_here():
            stop()

    real_copy = PgConnection.copy_text

    def copy_then_stop(
        self: PgConnection, table: str, columns: Sequence[str], data: bytes
    ) -> None:
        if stop_at != "mid_copy" or not stops_here():
            real_copy(self, table, columns, data)
            return
        # The COPY is open and the server waits for rows that don't come.
        with self.raw.cursor().copy(
            f"COPY {table} ({', '.join(columns)}) FROM STDIN WITH (FORMAT csv)"
        ) as copy:
            stop()
            copy.write(data)

    monkeypatch.setattr(group_module, "check_epoch", check_then_stop)
    monkeypatch.setattr(PgConnection, "copy_text", copy_then_stop)
    try:
        partitions = _topic(inputs[1])
        old_topic, new_topic = FakeTopic(partitions), FakeTopic(partitions)
        sink_cursor = cursor(conn)
        old = GroupEvaluatorLoop(
            cursor(conn),
            old_topic,
            lambda: DuckDBSink(sink_cursor, source="kafka"),
            poll_timeout_s=0.01,
            owner="old",
            hook_interval_s=0.0,
            stall_timeout_s=0.5,
        )
        new = _group_loop(conn, new_topic, "new")
        old_topic.assign(*range(PARTITIONS))
        errors: list[BaseException] = []

        def run_old() -> None:
            try:
                old.run_once()
            except BaseException as exc:  # handed to the test thread
                errors.append(exc)

        thread = threading.Thread(target=run_old, name="stopped-member")
        thread.start()
        assert stopped.wait(60), "the old member never reached its epoch check"
        number = int(held[0].rsplit(":", 1)[1])
        # The group gave the partition away; the successor takes its epoch
        # while the old member is still stopped.
        new_topic.assign(number)
        with caplog.at_level(logging.WARNING, "prop_stream.evaluator.group"):
            new.run_once()
            taken_while_stopped = stopped.is_set()
            resume.set()
            thread.join(60)
        assert taken_while_stopped
        assert new.partitions()[number] == 2
        # Resumed, the old member's commit fails: the server ended it.
        assert len(errors) == 1, errors
        assert transient_reason(errors[0]) is not None
        ended = [r.getMessage() for r in caplog.records]
        assert any(
            m.startswith(FENCED_LOG)
            and "ended the batch's transaction" in m
            and held[0] in m
            for m in ended
        ), ended
        assert old.fenced == 1
        # The successor takes the rest and the store equals the backtest.
        new_topic.assign(*(n for n in range(PARTITIONS) if n != number))
        _drain((new, new_topic))
        _assert_results(conn, inputs, embedded)
    finally:
        resume.set()
        conn.close()


def test_revocations_losses_and_reassignments_replay_to_the_backtest(
    store_db: Path | str,
    inputs: tuple[Path, pl.DataFrame],
    embedded: dict[str, pl.DataFrame],
) -> None:
    conn = _fresh(store_db)
    try:
        partitions = _topic(inputs[1])
        a_topic, b_topic = FakeTopic(partitions), FakeTopic(partitions)
        a = _group_loop(conn, a_topic, "a")
        b = _group_loop(conn, b_topic, "b")
        a_topic.assign(0, 1, 2)
        for _ in range(5):
            a.run_once()
        # A member joins: partition 1 moves (revoked with a last checkpoint).
        a_topic.revoke(1)
        b_topic.assign(1)
        for _ in range(4):
            a.run_once()
            b.run_once()
        assert set(a.partitions()) == {0, 2}
        assert set(b.partitions()) == {1}
        # The new member is evicted (its state is lost); a takes 1 back, then
        # loses 2 to b, which starts it from the last checkpoint.
        b_topic.lose(1)
        a_topic.assign(1)
        a_topic.lose(2)
        b_topic.assign(2)
        for _ in range(3):
            a.run_once()
            b.run_once()
        assert set(a.partitions()) == {0, 1}
        assert set(b.partitions()) == {2}
        _drain((a, a_topic), (b, b_topic))
        assert a.fenced == b.fenced == 0
        _assert_results(conn, inputs, embedded)
    finally:
        conn.close()


def test_a_running_embedded_database_switches_to_the_group_without_loss(
    store_db: Path | str,
    inputs: tuple[Path, pl.DataFrame],
    embedded: dict[str, pl.DataFrame],
) -> None:
    conn = _fresh(store_db)
    try:
        partitions = _topic(inputs[1])
        topic = FakeTopic(partitions)
        single = EvaluatorLoop(
            cursor(conn),
            topic,
            DuckDBSink(cursor(conn), source="kafka"),
            checkpoint_every=4,
            archive=True,
        )
        single.run(max_batches=10, checkpoint_on_exit=False)  # then a crash
        # The group members start from the single checkpoint, each keeping its
        # partition's phases.
        a_topic, b_topic = FakeTopic(partitions), FakeTopic(partitions)
        a = _group_loop(conn, a_topic, "a")
        b = _group_loop(conn, b_topic, "b")
        a_topic.assign(0, 1)
        b_topic.assign(2)
        a.run_once()
        b.run_once()
        for loop, numbers in ((a, (0, 1)), (b, (2,))):
            for number in numbers:
                engine = loop.engine_of(number)
                assert engine is not None
                homes = {_partition_of(int(x)) for x in engine.phases()["account_id"]}
                assert homes <= {number}
        _drain((a, a_topic), (b, b_topic))
        _assert_results(conn, inputs, embedded)
    finally:
        conn.close()


EASY_TWO_STEP = ProgramIn(
    name="easy two-step",
    price=Decimal("1.00"),
    currency="USD",
    phases=(
        ProgramPhaseIn(
            name="Evaluation",
            phase_type=0,
            account_group="DEMO",
            rules={"initial_balance": 10_000, "profit_target": 0.001},
        ),
        ProgramPhaseIn(
            name="Funded",
            phase_type=1,
            account_group="REAL",
            rules={"initial_balance": 10_000, "max_total_loss": 0.5},
            profit_split=Decimal("0.8"),
        ),
    ),
)


def _tick_frame(account: int, start: datetime, equities: list[float]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "account_id": [account] * len(equities),
            "ts": [start + timedelta(minutes=i + 1) for i in range(len(equities))],
            "equity": equities,
            "balance": equities,
        },
        schema={
            "account_id": pl.Int64,
            "ts": pl.Datetime("us", "UTC"),
            "equity": pl.Float64,
            "balance": pl.Float64,
        },
    )


def test_a_pass_opens_the_next_phase_for_the_member_owning_its_account(
    store_db: Path | str,
) -> None:
    conn = _fresh(store_db)
    try:
        started = START + timedelta(hours=1)
        with transaction(conn):
            program = create_program(conn, program=EASY_TWO_STEP)
            bob = customer_id_by_email(conn, email="bob@example.com")
            account = open_account(conn, customer_id=bob, account_group="DEMO")
            challenge = start_challenge(
                conn,
                customer_id=bob,
                program_id=program,
                account_id=account,
                started_at=started,
            )
        data = {n: _tick_frame(0, START, []) for n in range(PARTITIONS)}
        data[_partition_of(account)] = _tick_frame(
            account, started, [10_000.0, 10_050.0]
        )
        topics = {name: FakeTopic(data) for name in ("a", "b")}
        loops = {name: _group_loop(conn, topics[name], name) for name in topics}
        home = _partition_of(account)
        topics["a"].assign(home)
        topics["b"].assign(*(n for n in range(PARTITIONS) if n != home))
        for _ in range(3):
            for loop in loops.values():
                loop.run_once()
        funded = conn.execute(
            "SELECT account_id, started_at FROM challenge_phases "
            "WHERE challenge_id = ? AND phase_index = 1 AND status = 'active'",
            [challenge],
        ).fetchall()
        assert funded, "the pass did not open the funded phase"
        funded_account, funded_start = int(funded[0][0]), funded[0][1]
        # The funded account's ticks arrive on its own partition, perhaps the
        # other member's: no restart, no list of phases handed over.
        target = _partition_of(funded_account)
        data[target] = pl.concat(
            [
                data[target],
                _tick_frame(funded_account, funded_start, [10_000.0, 4_000.0]),
            ]
        )
        owner = "a" if target == home else "b"
        for _ in range(3):
            for loop in loops.values():
                loop.run_once()
        engine = loops[owner].engine_of(target)
        assert engine is not None
        phases = conn.execute(
            "SELECT phase_index, status FROM challenge_phases "
            "WHERE challenge_id = ? ORDER BY phase_index",
            [challenge],
        ).fetchall()
        # The funded phase was judged: its 60 % loss broke max_total_loss.
        assert phases == [(0, "passed"), (1, "failed")]
        latest = conn.execute(
            "SELECT equity FROM metrics_latest WHERE account_id = ?", [funded_account]
        ).fetchall()
        assert latest == [(4_000.0,)]
    finally:
        conn.close()


def test_a_cancel_by_another_process_reaches_the_owning_member(
    store_db: Path | str,
) -> None:
    conn = _fresh(store_db)
    try:
        started = START + timedelta(hours=1)
        with transaction(conn):
            program = create_program(conn, program=EASY_TWO_STEP)
            bob = customer_id_by_email(conn, email="bob@example.com")
            account = open_account(conn, customer_id=bob, account_group="DEMO")
            challenge = start_challenge(
                conn,
                customer_id=bob,
                program_id=program,
                account_id=account,
                started_at=started,
            )
        home = _partition_of(account)
        data = {n: _tick_frame(0, START, []) for n in range(PARTITIONS)}
        data[home] = _tick_frame(account, started, [10_000.0, 10_002.0])
        topic = FakeTopic(data)
        loop = _group_loop(conn, topic, "a")
        topic.assign(*range(PARTITIONS))
        loop.run_once()
        engine = loop.engine_of(home)
        assert engine is not None
        assert account in engine
        # Another process (an API, a job worker) cancels it and tells nobody.
        other = cursor(conn)
        with transaction(other):
            cancel_challenge(other, challenge_id=challenge, now=started)
        loop.poll_phase_changes()
        assert account not in engine
        data[home] = pl.concat(
            [data[home], _tick_frame(account, started + timedelta(hours=1), [1.0])]
        )
        loop.run_once()
        latest = conn.execute(
            "SELECT equity FROM metrics_latest WHERE account_id = ?", [account]
        ).fetchall()
        assert latest == [(10_002.0,)]  # the tick after the cancel is not judged
        status = conn.execute(
            "SELECT status FROM challenge_phases WHERE account_id = ?", [account]
        ).fetchall()
        assert status == [("cancelled",)]
    finally:
        conn.close()
