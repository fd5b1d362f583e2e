"""Two builds of the engine side by side: the same tick benchmark, alternating.

Each build is a directory holding a ``prop_stream`` package with its own built
``_core`` (for example main's checkout and this worktree). Every measurement runs
in a fresh child process with that directory first on ``PYTHONPATH``; the builds
take turns case by case and round by round, so a machine whose load drifts (they
are shared here) hits both alike. A child judges the ticks of
``benchmarks/test_engine_bench.py`` (10M ticks, batches of 1M, on a fresh engine)
twice and reports the faster run; the table shows each build's best over the
rounds, and the ratio.

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
import test_engine_bench as b
accounts, order, ticks = {accounts}, {order!r}, {ticks}
table = b.make_ticks(accounts, ticks, order)
batches = [table.slice(i, b.BATCH) for i in range(0, ticks, b.BATCH)]
best = float("inf")
for _ in range(2):
    engine = b.fresh_engine(accounts)
    start = time.perf_counter()
    for batch in batches:
        engine.process_arrow(batch)
    best = min(best, time.perf_counter() - start)
print(json.dumps({{"seconds": best}}))
"""


def measure(path: str, accounts: int, order: str, ticks: int) -> float:
    """Seconds of the faster of two runs in a child using the build at ``path``."""
    code = CHILD.format(
        bench=str(BENCH_DIR), accounts=accounts, order=order, ticks=ticks
    )
    env = {**os.environ, "PYTHONPATH": path}
    out = subprocess.run(  # noqa: S603 - our own interpreter and code
        [sys.executable, "-c", code],
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return float(json.loads(out.stdout.strip().splitlines()[-1])["seconds"])


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
    for r in range(args.rounds):
        for accounts, order in cases:
            # Alternate which build goes first, so neither always runs second.
            for name, path in builds if r % 2 == 0 else builds[::-1]:
                s = measure(path, accounts, order, args.ticks)
                key = (name, accounts, order)
                best[key] = min(best.get(key, float("inf")), s)
                rate = args.ticks / s / 1e6
                print(f"round {r} {name} {accounts} {order}: {rate:.1f}M/s")
    (a, _), (b, _) = builds
    print(f"\n| accounts | order | {a} M ticks/s | {b} M ticks/s | {b}/{a} |")
    print("|---:|---|---:|---:|---:|")
    for accounts, order in cases:
        ra = args.ticks / best[(a, accounts, order)] / 1e6
        rb = args.ticks / best[(b, accounts, order)] / 1e6
        print(f"| {accounts:,} | {order} | {ra:.1f} | {rb:.1f} | {rb / ra:.3f} |")


if __name__ == "__main__":
    main()
