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
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

import numpy as np
import polars as pl
from kafka_bench_support import create_bench_topic

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


def make_store(db: Path, accounts: int) -> list[int]:
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--ticks", type=int, default=500_000)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=100_000)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="kafka-group-"))
    base = tmp / "base.duckdb"
    ids = make_store(base, args.accounts)
    ticks = make_ticks(tmp / "ticks.parquet", args.ticks, ids)
    topic, admin = create_bench_topic(args.bootstrap, "bench-group", args.partitions)
    produce_file(ticks, bootstrap=args.bootstrap, topic=topic, encoding="json")
    from kafka import KafkaConsumer
    from kafka.structs import TopicPartition

    probe = KafkaConsumer(bootstrap_servers=args.bootstrap)
    tps = [TopicPartition(topic, p) for p in range(args.partitions)]
    ends = {
        f"{topic}:{tp.partition}": int(o) for tp, o in probe.end_offsets(tps).items()
    }
    probe.close()
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
