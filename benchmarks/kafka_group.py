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
PostgreSQL database on the server of ``URL`` (seeded alike per run), reading
the same pre-produced topic (``--partitions 2`` for the issue's comparison), once
per count given, ``--rounds`` times in alternating order. The processes start
together; the group is formed when every partition has an epoch and the
partitions have as many distinct owners as there are evaluators (the first to
join may take every partition before the others arrive: the cooperative
rebalance then moves some). The rate is the ticks still unread then (the topic's
end minus the stored positions) over the time until every stored position is at
its partition's end; the run's whole time from spawn is printed too, with the
evaluators' CPU seconds (``/proc``) and the machine's load average.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import time
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
            },
        )  # fmt: skip


def run_processes(
    url: str,
    evaluators: int,
    args: argparse.Namespace,
    topic: str,
    ends: dict[str, int],
    tmp: Path,
) -> dict[str, float]:
    """``evaluators`` processes read the topic to its end; their figures."""
    import psycopg

    group = f"bench-{topic}-{evaluators}-{time.monotonic_ns()}"
    total = sum(ends.values())
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp / f"evaluator-{evaluators}-{i}.log" for i in range(evaluators)]
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
            return set(owners) == set(ends) and len(set(owners.values())) == min(
                evaluators, len(ends)
            )

        spawn = time.perf_counter()
        try:
            procs = [_evaluator(url, args, topic, group, log) for log in logs]
            deadline = spawn + 600
            t0 = None
            at_t0 = 0
            # Poll the store (conditions, each bounded by the deadline).
            while time.perf_counter() < deadline:
                for proc, log in zip(procs, logs, strict=True):
                    if proc.poll() is not None:
                        raise RuntimeError(f"evaluator exited: {log.read_text()}")
                now = time.perf_counter()
                if t0 is None and formed():
                    t0, at_t0 = now, sum(stored().values())
                if t0 is not None and stored() == ends:
                    break
                time.sleep(0.02)
            else:
                raise RuntimeError(f"not at the topic's end within 600 s: {stored()}")
            end = time.perf_counter()
            cpu = sum(_cpu_seconds(proc.pid) for proc in procs)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=30)
    assert t0 is not None  # the loop above breaks only after t0
    return {
        "evaluators": evaluators,
        "ticks": total,
        "ticks_after_formed": total - at_t0,
        "seconds_after_formed": end - t0,
        "ticks_per_s": (total - at_t0) / (end - t0),
        "seconds_from_spawn": end - spawn,
        "cpu_seconds": cpu,
        "load_1m": os.getloadavg()[0],
    }


def _processes_main(args: argparse.Namespace) -> None:
    counts = [int(n) for n in args.evaluators.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="kafka-group-pg-"))
    with fresh_pg_database(args.postgres, "bench_group_ids") as url:
        ids = make_store(url, args.accounts)
    ticks = make_ticks(tmp / "ticks.parquet", args.ticks, ids)
    topic, admin = create_bench_topic(args.bootstrap, "bench-group", args.partitions)
    produce_file(ticks, bootstrap=args.bootstrap, topic=topic, encoding="json")
    ends = _end_offsets(args.bootstrap, topic, args.partitions)
    rates: dict[int, list[float]] = {n: [] for n in counts}
    try:
        for round_ in range(args.rounds):
            order = counts if round_ % 2 == 0 else counts[::-1]
            for n in order:
                with contextlib.ExitStack() as stack:
                    url = stack.enter_context(
                        fresh_pg_database(args.postgres, "bench_group")
                    )
                    # The same account ids as the topic's: a fresh database
                    # numbers its accounts alike.
                    if make_store(url, args.accounts) != ids:
                        raise RuntimeError("the seeded account ids differ")
                    result = run_processes(url, n, args, topic, ends, tmp)
                rates[n].append(result["ticks_per_s"])
                print(
                    f"round {round_ + 1}, {n} evaluator(s), {args.partitions} "
                    f"partitions: {result['ticks_after_formed']:,.0f} of "
                    f"{result['ticks']:,.0f} JSON ticks after the group formed in "
                    f"{result['seconds_after_formed']:.2f} s = "
                    f"{result['ticks_per_s']:,.0f} ticks/s; from spawn "
                    f"{result['seconds_from_spawn']:.2f} s; evaluators' CPU "
                    f"{result['cpu_seconds']:.1f} s; load {result['load_1m']:.1f}",
                    flush=True,
                )
    finally:
        admin.delete_topics([topic])
        admin.close()
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
