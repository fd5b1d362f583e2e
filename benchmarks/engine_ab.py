"""Two builds of the engine side by side: the same tick benchmark, alternating.

Each build is a directory holding a ``prop_stream`` package with its own built
``_core`` (for example main's checkout and this worktree). Every measurement runs
in a fresh child process with that directory first on ``PYTHONPATH``; the builds
take turns case by case and round by round, so a machine whose load drifts (they
are shared here) hits both alike. A child judges the ticks of
``benchmarks/test_engine_bench.py`` (10M ticks, batches of 1M, on a fresh engine)
three times and reports the fastest run; the table shows each build's best over
the rounds, and the ratio, by CPU seconds (``time.process_time``: on a shared,
overloaded machine the time spent waiting for a core is not counted) and by wall
seconds.

Usage::

    python benchmarks/engine_ab.py main=/tmp/main-pkg new=$PWD \\
        --accounts 1000,100000 --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent

CHILD = """
import json, sys, time
sys.path.insert(0, {bench!r})
import os, prop_stream
if not os.path.realpath(prop_stream.__file__).startswith(os.path.realpath({build!r})):
    sys.exit("prop_stream came from " + prop_stream.__file__ + ", not {build}")
import test_engine_bench as b
accounts, order, ticks = {accounts}, {order!r}, {ticks}
table = b.make_ticks(accounts, ticks, order)
batches = [table.slice(i, b.BATCH) for i in range(0, ticks, b.BATCH)]
best, best_cpu = float("inf"), float("inf")
for _ in range(3):
    engine = b.fresh_engine(accounts)
    start, start_cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        engine.process_arrow(batch)
    best = min(best, time.perf_counter() - start)
    best_cpu = min(best_cpu, time.process_time() - start_cpu)
print(json.dumps({{"seconds": best, "cpu_seconds": best_cpu}}))
"""


def measure(path: str, accounts: int, order: str, ticks: int) -> tuple[float, float]:
    """Wall and CPU seconds of the fastest of three runs in a child process."""
    code = CHILD.format(
        bench=str(BENCH_DIR), build=path, accounts=accounts, order=order, ticks=ticks
    )
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(  # noqa: S603 - our own interpreter and code
        # -P: without it the working directory's prop_stream (a checkout run
        # from its root) would shadow PYTHONPATH's, and both "builds" be one.
        [sys.executable, "-P", "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    return float(got["seconds"]), float(got["cpu_seconds"])


def main() -> None:
    """Parse the builds and cases, alternate them, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs=2, help="NAME=DIR (a dir with prop_stream)")
    parser.add_argument("--accounts", default="1000,100000")
    parser.add_argument("--orders", default="by_account,by_time")
    parser.add_argument("--ticks", type=int, default=10_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.builds]
    cases = [
        (int(a), o) for a in args.accounts.split(",") for o in args.orders.split(",")
    ]
    best: dict[tuple[str, int, str], float] = {}
    best_cpu: dict[tuple[str, int, str], float] = {}
    for r in range(args.rounds):
        for accounts, order in cases:
            # Alternate which build goes first, so neither always runs second.
            for name, path in builds if r % 2 == 0 else builds[::-1]:
                s, cpu = measure(path, accounts, order, args.ticks)
                key = (name, accounts, order)
                best[key] = min(best.get(key, float("inf")), s)
                best_cpu[key] = min(best_cpu.get(key, float("inf")), cpu)
                rate, cpu_rate = args.ticks / s / 1e6, args.ticks / cpu / 1e6
                print(
                    f"round {r} {name} {accounts} {order}: {rate:.1f}M/s wall, "
                    f"{cpu_rate:.1f}M/s per CPU second"
                )
    (a, _), (b, _) = builds
    # CPU seconds are what a loaded shared machine disturbs least (waiting for a
    # core is not counted); wall seconds are shown beside them.
    print(
        f"\n| accounts | order | {a} M ticks/CPU-s | {b} M ticks/CPU-s | {b}/{a} CPU"
        f" | {a} M ticks/s wall | {b} M ticks/s wall | {b}/{a} wall |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|")
    for accounts, order in cases:
        ca = args.ticks / best_cpu[(a, accounts, order)] / 1e6
        cb = args.ticks / best_cpu[(b, accounts, order)] / 1e6
        ra = args.ticks / best[(a, accounts, order)] / 1e6
        rb = args.ticks / best[(b, accounts, order)] / 1e6
        print(
            f"| {accounts:,} | {order} | {ca:.1f} | {cb:.1f} | {cb / ca:.3f}"
            f" | {ra:.1f} | {rb:.1f} | {rb / ra:.3f} |"
        )


if __name__ == "__main__":
    main()
