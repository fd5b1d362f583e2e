"""Tick-to-API latency through Kafka at a steady rate.

A producer process sends ``--rate`` ticks/s of ``--accounts`` accounts for
``--seconds`` seconds, each tick's ``ts`` being the wall-clock time (epoch ms)
of the 5 ms slot it is sent in, and logs every tick it sent. This process runs
the service's evaluator loop (``KafkaSource`` → engine → ``DuckDBSink``) with a
``LatestMetrics`` that notes the wall-clock time each committed batch's metrics
become visible (what ``/accounts/{id}/metrics`` reads). A tick's latency is the
first time its account's visible metric has a ``ts`` at or after the tick's,
minus the tick's ``ts``: produce → broker → poll → decode → engine → DuckDB
commit → API. The first ``--warmup`` seconds are left out.

Usage: ``.venv/bin/python benchmarks/kafka_latency.py --encoding json|batch
--rate 100000 --seconds 30 [--producers 2]``. ``batch`` sends one
``arrow-ipc-v1`` message per partition per slot. kafka-python's producer sends
70-80k JSON messages/s from one idle process, so 100k JSON ticks/s needs
``--producers 2`` (each sends its share of the accounts).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import orjson
import polars as pl
from kafka import KafkaProducer
from kafka_bench_support import bench_loop, create_bench_topic

from prop_stream.evaluator.metrics import LatestMetrics
from prop_stream.kafka.decode import ARROW_ENCODING, ENCODING_HEADER, encode_arrow
from prop_stream.kafka.produce import partition_of

# Loose rules: no phase ends during the run, so every tick's metric shows up.
RULES = {"max_daily_loss": 0.5, "max_total_loss": 0.9, "initial_balance": 100_000.0}
SLOT_S = 0.005
FIRST_ACCOUNT = 2_000_000


class VisibleMetrics(LatestMetrics):
    """``LatestMetrics`` noting when each update became visible."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[tuple[float, pl.DataFrame]] = []

    def update(self, metrics: pl.DataFrame) -> None:
        super().update(metrics)
        self.seen.append((time.time(), metrics.select("account_id", "ts")))


def produce(args: argparse.Namespace) -> None:
    """The producer process: a steady rate of ticks, then the log of them."""
    producer = KafkaProducer(
        bootstrap_servers=args.bootstrap.split(","),
        client_id=f"latency-produce-{args.index}",
        acks=1,
        linger_ms=2,
        batch_size=512 * 1024,
        max_request_size=4 * 1024 * 1024,
    )
    accounts = np.arange(FIRST_ACCOUNT, FIRST_ACCOUNT + args.accounts)
    mine = accounts[args.index :: args.producers]
    per_slot = max(1, round(args.rate / args.producers * SLOT_S))
    partitions = len(producer.partitions_for(args.topic))
    part_of = np.array([partition_of(int(a), partitions) for a in mine])
    keys = [str(int(a)).encode() for a in mine]
    headers = [(ENCODING_HEADER, ARROW_ENCODING.encode())]
    sent_accounts: list[np.ndarray] = []
    sent_ts: list[int] = []
    slots = int(args.seconds / SLOT_S)
    start = time.time()
    cursor_ = 0
    late_slots = 0
    for slot in range(slots):
        due = start + slot * SLOT_S
        now = time.time()
        if now < due:
            time.sleep(due - now)
        elif now - due > SLOT_S:
            late_slots += 1
        ts = int(time.time() * 1000)
        idx = (cursor_ + np.arange(per_slot)) % len(mine)
        cursor_ += per_slot
        equity = 100_000.0 + (idx % 13) - 6.0
        if args.encoding == "json":
            for i, e in zip(idx.tolist(), equity.tolist(), strict=True):
                value = orjson.dumps(
                    {"account_id": int(mine[i]), "ts": ts, "equity": e, "balance": 1e5}
                )
                # The default partitioner's partition, given: murmur2 in Python
                # would cost the producer a sixth of its rate.
                producer.send(
                    args.topic, key=keys[i], value=value, partition=int(part_of[i])
                )
        else:
            frame = pl.DataFrame(
                {
                    "account_id": mine[idx],
                    "ts": np.full(per_slot, ts),
                    "equity": equity,
                    "balance": np.full(per_slot, 1e5),
                    "partition": part_of[idx],
                }
            ).with_columns(pl.from_epoch("ts", time_unit="ms"))
            for (partition,), rows in frame.group_by("partition"):
                producer.send(
                    args.topic,
                    value=encode_arrow(rows),
                    partition=int(str(partition)),
                    headers=headers,
                )
        sent_accounts.append(mine[idx])
        sent_ts.append(ts)
    producer.flush(timeout=60)
    elapsed = time.time() - start
    producer.close(timeout=10)
    log = pl.DataFrame(
        {
            "account_id": np.concatenate(sent_accounts),
            "ts": np.repeat(np.array(sent_ts), per_slot),
        }
    )
    log.write_parquet(args.log)
    print(
        f"producer {args.index}: {log.height:,} ticks in {elapsed:.1f} s "
        f"({log.height / elapsed:,.0f}/s), {late_slots} slots late",
        file=sys.stderr,
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bootstrap", default="127.0.0.1:19092")
    parser.add_argument("--encoding", choices=["json", "batch"], default="json")
    parser.add_argument("--rate", type=int, default=100_000)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--warmup", type=float, default=5.0)
    parser.add_argument("--accounts", type=int, default=1_000)
    parser.add_argument("--partitions", type=int, default=3)
    parser.add_argument("--producers", type=int, default=1)
    parser.add_argument("--batch", type=int, default=200_000)
    parser.add_argument("--paths", default="raw")
    # The producer process's own arguments.
    parser.add_argument("--role", default="consumer")
    parser.add_argument("--topic")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--log")
    args = parser.parse_args()
    if args.role == "producer":
        produce(args)
        return
    for path in args.paths.split(","):
        measure(args, path)


def measure(args: argparse.Namespace, path: str) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="kafka-latency-"))
    topic, admin = create_bench_topic(args.bootstrap, "bench-latency", args.partitions)
    metrics = VisibleMetrics()
    loop, source, conn = bench_loop(
        tmp / "prop.duckdb",
        bootstrap=args.bootstrap,
        topic=topic,
        path=path,
        accounts=range(FIRST_ACCOUNT, FIRST_ACCOUNT + args.accounts),
        rules=RULES,
        batch=args.batch,
        poll_timeout_s=0.1,
        metrics=metrics,
    )
    while not source.healthy():
        loop.run_once()
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            loop.run_once()

    consumer = threading.Thread(target=run, name="evaluator")
    consumer.start()
    logs = [tmp / f"sent-{i}.parquet" for i in range(args.producers)]
    producers = [
        subprocess.Popen(  # noqa: S603 - this script, our own arguments
            [
                sys.executable,
                __file__,
                "--role=producer",
                f"--bootstrap={args.bootstrap}",
                f"--topic={topic}",
                f"--encoding={args.encoding}",
                f"--rate={args.rate}",
                f"--seconds={args.seconds}",
                f"--accounts={args.accounts}",
                f"--producers={args.producers}",
                f"--index={i}",
                f"--log={log}",
            ]
        )
        for i, log in enumerate(logs)
    ]
    for p in producers:
        p.wait()
    ends = source.end_offsets()
    deadline = time.monotonic() + 60
    while any(source.position().get(k, 0) < v for k, v in ends.items()):
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    time.sleep(0.2)
    stop.set()
    consumer.join()
    source.close()
    conn.close()
    admin.delete_topics([topic])
    admin.close()

    sent = pl.concat([pl.read_parquet(log) for log in logs])
    visible = pl.concat(
        [
            frame.with_columns(
                pl.lit(seen_at).alias("seen_at"),
                (pl.col("ts").dt.epoch("ms")).alias("metric_ts"),
            ).select("account_id", "metric_ts", "seen_at")
            for seen_at, frame in metrics.seen
        ]
    ).sort("metric_ts")
    warm = pl.col("ts").min() + int(args.warmup * 1000)
    measured = sent.filter(pl.col("ts") >= warm).sort("ts")
    joined = measured.join_asof(  # both sides sorted on the key above
        visible,
        left_on="ts",
        right_on="metric_ts",
        by="account_id",
        strategy="forward",
        check_sortedness=False,
    )
    missing = joined["seen_at"].null_count()
    latency_ms = joined.drop_nulls("seen_at").select(
        (pl.col("seen_at") * 1000 - pl.col("ts")).alias("ms")
    )["ms"]
    q = {p: float(latency_ms.quantile(p / 100) or 0) for p in (50, 90, 99)}
    worst = float(latency_ms.max() or 0)  # type: ignore[arg-type]
    print(
        f"{args.encoding} [{path}] at {args.rate:,} ticks/s for {args.seconds:.0f} s "
        f"({args.producers} producer(s)): {measured.height:,} ticks measured, "
        f"{missing} never visible; latency p50 {q[50]:.0f} ms, p90 {q[90]:.0f} ms, "
        f"p99 {q[99]:.0f} ms, max {worst:.0f} ms; "
        f"{loop.stats.batches} batches"
    )


if __name__ == "__main__":
    main()
