"""The consumer-group evaluator against the embedded one, side by side in one run.

Makes a store with ``--accounts`` purchased-like challenges (one active phase
each), produces ``--ticks`` JSON ticks of them to a fresh ``--partitions`` topic,
then reads the whole topic into a copy of the store twice: with the embedded loop
(every partition, one transaction per batch) and with one ``GroupEvaluatorLoop``
in a consumer group (one transaction per partition per batch, each checking the
partition's fencing epoch first). Times run from the first poll (the group's
join included) until every partition's stored position is at its end.

Usage: ``.venv/bin/python benchmarks/kafka_group.py --bootstrap H:P
[--ticks 500000 --accounts 1000 --partitions 6]``.

``--postgres URL --evaluators 1,2`` measures the scale-out deployment instead:
real ``prop-stream serve --role evaluator`` processes in one group over a fresh
PostgreSQL database on the server of ``URL`` (seeded alike per run), once per
count given, ``--rounds`` times in alternating order (``--partitions 2`` for the
issue's comparison). Each run makes a fresh topic and starts the evaluators on
it while it is empty; once the group has formed (every partition has an epoch,
with as many distinct owners as evaluators) they are paused (SIGSTOP; their
session timeout, ``--session-timeout-ms``, outlasts the pause) while the ticks
are produced, then resumed (SIGCONT) and timed until every stored position is at
its partition's end. So the time is the group reading, with no join or
rebalance in it; the run prints the evaluators' CPU seconds over that time
(``/proc``), that the owners and epochs did not change, and the load average.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import polars as pl
from kafka_bench_support import create_bench_topic, fresh_pg_database

from prop_stream.config import StreamSettings
from prop_stream.evaluator.service import build_group_loop, build_loop
from prop_stream.kafka import produce_file
from prop_stream.store import (
    ProgramIn,
    ProgramPhaseIn,
    connect,
    create_program,
    customer_id_by_email,
    init_database,
    open_account,
    start_challenge,
    transaction,
)

RULES = {
    "initial_balance": 100_000.0,
    "max_daily_loss": 0.05,
    "max_total_loss": 0.1,
    "profit_target": 0.5,
}
START = datetime(2026, 1, 5, tzinfo=UTC)


def make_store(db: Path | str, accounts: int) -> list[int]:
    """A store with one active phase per account; the account ids."""
    init_database(db, demo=True, now=START)
    conn = connect(db)
    ids = []
    try:
        with transaction(conn):
            program = create_program(
                conn,
                program=ProgramIn(
                    name="bench",
                    price=Decimal("1.00"),
                    currency="USD",
                    phases=(
                        ProgramPhaseIn(
                            name="Evaluation",
                            phase_type=0,
                            account_group="DEMO",
                            rules=RULES,
                        ),
                    ),
                ),
            )
            bob = customer_id_by_email(conn, email="bob@example.com")
            for _ in range(accounts):
                account = open_account(conn, customer_id=bob, account_group="DEMO")
                start_challenge(
                    conn,
                    customer_id=bob,
                    program_id=program,
                    account_id=account,
                    started_at=START,
                )
                ids.append(account)
    finally:
        conn.close()
    return ids


def make_ticks(path: Path, ticks: int, ids: list[int]) -> Path:
    rng = np.random.default_rng(3)
    start = int(START.timestamp() * 1000) + 1000
    accounts = np.array(ids)[np.arange(ticks) % len(ids)]
    ts = start + np.arange(ticks) * 20
    equity = 100_000.0 + rng.normal(0, 50, ticks).cumsum() / np.sqrt(len(ids))
    pl.DataFrame(
        {"account_id": accounts, "ts": ts, "equity": equity, "balance": 100_000.0}
    ).with_columns(
        pl.from_epoch("ts", time_unit="ms").dt.replace_time_zone("UTC")
    ).write_parquet(path)
    return path


def read_all(db: Path, settings: StreamSettings, ends: dict[str, int]) -> float:
    """Seconds to read the topic to its end into ``db``."""
    conn = connect(db)
    try:
        if settings.kafka_consumer_group:
            loop = build_group_loop(settings, conn)
        else:
            loop = build_loop(settings, conn)  # type: ignore[assignment]
        loop.start()
        t0 = time.perf_counter()
        deadline = t0 + 600
        while time.perf_counter() < deadline:
            loop.run_once()
            rows = conn.execute(
                'SELECT "partition", next_offset FROM source_offsets '
                "WHERE source = 'kafka'"
            ).fetchall()
            if dict(rows) == ends:
                break
        seconds = time.perf_counter() - t0
        loop.stop()
        loop.source.close()
        return seconds
    finally:
        conn.close()


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a live process (``/proc/PID/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _evaluator(
    url: str, args: argparse.Namespace, topic: str, group: str, log: Path
) -> subprocess.Popen[bytes]:
    """One ``prop-stream serve --role evaluator`` process in ``group``."""
    prop_stream = Path(os.environ.get("PROP_STREAM_BIN", "prop-stream"))
    with log.open("wb") as out:
        return subprocess.Popen(  # noqa: S603 - our own command, fixed arguments
            [str(prop_stream), "serve", "--db", url, "--role", "evaluator",
             "--source", "kafka", "--kafka-bootstrap", args.bootstrap,
             "--topic", topic, "--group", group, "--port", "0"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env={
                **os.environ,
                "PROP_STREAM_MAX_BATCH_RECORDS": str(args.batch),
                "PROP_STREAM_LOG_LEVEL": "WARNING",
                # Longer than the pause while the ticks are produced, so that
                # the paused members keep their partitions.
                "PROP_STREAM_KAFKA_SESSION_TIMEOUT_MS": str(args.session_timeout_ms),
            },
        )  # fmt: skip


def run_processes(
    url: str,
    evaluators: int,
    args: argparse.Namespace,
    ticks: Path,
    tmp: Path,
) -> dict[str, float]:
    """``evaluators`` processes read a fresh topic of ``ticks``; their figures.

    The group forms on the empty topic; the evaluators are then paused
    (SIGSTOP, within their session timeout) while the ticks are produced, and
    timed from SIGCONT until every stored position is at its partition's end.
    """
    import psycopg

    topic, admin = create_bench_topic(args.bootstrap, "bench-group", args.partitions)
    group = f"bench-{topic}"
    partitions = {f"{topic}:{p}" for p in range(args.partitions)}
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp / f"evaluator-{topic}-{i}.log" for i in range(evaluators)]
    try:
        with psycopg.connect(url, autocommit=True) as conn:

            def stored() -> dict[str, int]:
                rows = conn.execute(
                    'SELECT "partition", next_offset FROM source_offsets '
                    "WHERE source = 'kafka'"
                ).fetchall()
                return {str(k): int(v) for k, v in rows}

            def formed() -> bool:
                rows = conn.execute(
                    'SELECT "partition", owner FROM partition_epochs '
                    "WHERE source = 'kafka'"
                ).fetchall()
                owners = {str(p): str(o) for p, o in rows}
                return set(owners) == partitions and len(set(owners.values())) == min(
                    evaluators, len(partitions)
                )

            def until(
                condition: Callable[[], bool], timeout_s: float, what: str
            ) -> None:
                # Poll the store (a condition, bounded by a deadline).
                deadline = time.perf_counter() + timeout_s
                while not condition():
                    for proc, log in zip(procs, logs, strict=True):
                        if proc.poll() is not None:
                            raise RuntimeError(f"evaluator exited: {log.read_text()}")
                    if time.perf_counter() > deadline:
                        raise RuntimeError(f"not {what} within {timeout_s:.0f} s")
                    time.sleep(0.02)

            spawn = time.perf_counter()
            procs = [_evaluator(url, args, topic, group, log) for log in logs]
            until(formed, 300, "formed")
            formed_s = time.perf_counter() - spawn
            for proc in procs:
                proc.send_signal(signal.SIGSTOP)
            try:
                produced = time.perf_counter()
                produce_file(
                    ticks, bootstrap=args.bootstrap, topic=topic, encoding="json"
                )
                produced = time.perf_counter() - produced
                ends = _end_offsets(args.bootstrap, topic, args.partitions)
                cpu0 = sum(_cpu_seconds(proc.pid) for proc in procs)
            finally:
                for proc in procs:
                    proc.send_signal(signal.SIGCONT)
            t0 = time.perf_counter()
            until(lambda: stored() == ends, 600, "at the topic's end")
            seconds = time.perf_counter() - t0
            cpu = sum(_cpu_seconds(proc.pid) for proc in procs) - cpu0
            owners = conn.execute(
                "SELECT count(DISTINCT owner), max(epoch) FROM partition_epochs "
                "WHERE source = 'kafka'"
            ).fetchall()[0]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=30)
        admin.delete_topics([topic])
        admin.close()
    total = sum(ends.values())
    return {
        "evaluators": evaluators,
        "ticks": total,
        "seconds": seconds,
        "ticks_per_s": total / seconds,
        "formed_s": formed_s,
        "produce_s": produced,
        "cpu_seconds": cpu,
        # Still one owner per evaluator and no epoch taken again: no rebalance
        # happened while the ticks were read.
        "owners_after": float(owners[0]),
        "max_epoch": float(owners[1]),
        "load_1m": os.getloadavg()[0],
    }


def _processes_main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.evaluators.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kafka-group-pg-"))
    with fresh_pg_database(args.postgres, "bench_group_ids") as url:
        ids = make_store(url, args.accounts)
    ticks = make_ticks(tmp / "ticks.parquet", args.ticks, ids)
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for round_ in range(args.rounds):
        order = counts if round_ % 2 == 0 else counts[::-1]
        for n in order:
            with fresh_pg_database(args.postgres, "bench_group") as url:
                # The same account ids as the ticks': a fresh database numbers
                # its accounts alike.
                if make_store(url, args.accounts) != ids:
                    raise RuntimeError("the seeded account ids differ")
                result = run_processes(url, n, args, ticks, tmp)
            rates[n].append(result["ticks_per_s"])
            print(
                f"round {round_ + 1}, {n} evaluator(s), {args.partitions} "
                f"partitions: {result['ticks']:,.0f} JSON ticks in "
                f"{result['seconds']:.2f} s = {result['ticks_per_s']:,.0f} ticks/s; "
                f"evaluators' CPU {result['cpu_seconds']:.1f} s; group formed in "
                f"{result['formed_s']:.1f} s, produced in {result['produce_s']:.1f} s "
                f"(paused); owners after {result['owners_after']:.0f}, max epoch "
                f"{result['max_epoch']:.0f}; load {result['load_1m']:.1f}",
                flush=True,
            )
    base = statistics.median(rates[counts[0]])
    for n in counts:
        print(
            f"{n} evaluator(s): median {statistics.median(rates[n]):,.0f} ticks/s, "
            f"best {max(rates[n]):,.0f}; median / {counts[0]} evaluator(s) "
            f"{statistics.median(rates[n]) / base:.2f}"
        )


def _end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[str, int]:
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    probe = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        return {
            f"{topic}:{tp.partition}": int(o)
            for tp, o in probe.end_offsets(tps).items()
        }
    finally:
        probe.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--ticks", type=int, default=500_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=100_000)
    parser.add_argument(
        "--postgres",
        metavar="URL",
        help="serve --role evaluator processes on this server",
    )
    parser.add_argument("--evaluators", default="1,2", help="process counts to compare")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--session-timeout-ms", type=int, default=60_000)
    args = parser.parse_args()
    if args.postgres:
        _processes_main(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="kafka-group-"))
    base = tmp / "base.duckdb"
    ids = make_store(base, args.accounts)
    ticks = make_ticks(tmp / "ticks.parquet", args.ticks, ids)
    topic, admin = create_bench_topic(args.bootstrap, "bench-group", args.partitions)
    produce_file(ticks, bootstrap=args.bootstrap, topic=topic, encoding="json")
    ends = _end_offsets(args.bootstrap, topic, args.partitions)
    for group in (False, True):
        db = tmp / f"{'group' if group else 'embedded'}.duckdb"
        shutil.copy(base, db)
        settings = StreamSettings(
            db=db,
            source="kafka",
            kafka_bootstrap=args.bootstrap,
            kafka_topic=topic,
            kafka_consumer_group=group,
            kafka_group_id=f"bench-{topic}",
            max_batch_records=args.batch,
            archive=False,
            max_clock_skew_s=0,
        )
        seconds = read_all(db, settings, ends)
        print(
            f"{'group member' if group else 'embedded'}: {args.ticks:,} JSON ticks, "
            f"{args.partitions} partitions, {args.accounts} accounts: "
            f"{seconds:.2f} s = {args.ticks / seconds:,.0f} ticks/s"
        )
    admin.delete_topics([topic])
    admin.close()


if __name__ == "__main__":
    main()
