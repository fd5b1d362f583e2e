"""Two builds side by side on both ways in, with the dense baseline beside each.

Like ``benchmarks/engine_ab.py`` (each measurement in a fresh child process with
that build's directory first on ``PYTHONPATH``, the builds taking turns case by
case and in alternating order round by round), but over both paths of
``benchmarks/test_engine_bench.py`` — ``batches`` (``process_arrow`` in 1M-tick
batches, the service's path) and ``whole`` (one ``process_unordered`` call, the
backtest's path) — and with ``dense_baseline`` timed right after the engine on
the same ticks in the same child. Each child runs the engine once on a fresh
engine; the table shows each build's best over the rounds, and the engine over
the best baseline seen in the case (the yardstick of the issue-10 goals).

Usage::

    python benchmarks/engine_paths_ab.py main=/work/main new=$PWD \\
        --accounts 100000,1000000 --rounds 2
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
from prop_stream.rules import dense_baseline
accounts, order, path = {accounts}, {order!r}, {path!r}
table = b.make_ticks(accounts, b.TICKS, order)
batches = [table.slice(i, b.BATCH) for i in range(0, b.TICKS, b.BATCH)]
engine = b.fresh_engine(accounts)
start = time.perf_counter()
if path == "whole":
    engine.process_unordered(table)
else:
    for batch in batches:
        engine.process_arrow(batch)
seconds = time.perf_counter() - start
start = time.perf_counter()
dense_baseline(table)
print(json.dumps([seconds, time.perf_counter() - start]))
"""


def measure(build: str, accounts: int, order: str, path: str) -> tuple[float, float]:
    """Engine and baseline seconds of one run in a child process."""
    code = CHILD.format(
        bench=str(BENCH_DIR), build=build, accounts=accounts, order=order, path=path
    )
    out = subprocess.run(  # noqa: S603 - our own interpreter and code
        # -P: without it the working directory's prop_stream (a checkout run
        # from its root) would shadow PYTHONPATH's, and both "builds" be one.
        [sys.executable, "-P", "-c", code],
        env={**os.environ, "PYTHONPATH": build},
        check=True,
        capture_output=True,
        text=True,
        timeout=900,
    )
    engine_s, base_s = json.loads(out.stdout.strip().splitlines()[-1])
    return float(engine_s), float(base_s)


def main() -> None:
    """Parse the builds and cases, alternate them, print the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs=2, help="NAME=DIR (a dir with prop_stream)")
    parser.add_argument("--accounts", default="100000,1000000")
    parser.add_argument("--orders", default="by_account,by_time")
    parser.add_argument("--paths", default="batches,whole")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    builds = [tuple(b.split("=", 1)) for b in args.builds]
    cases = [
        (int(a), o, p)
        for a in args.accounts.split(",")
        for o in args.orders.split(",")
        for p in args.paths.split(",")
    ]
    ticks = 10_000_000 if os.environ.get("PROP_STREAM_BENCH_SMOKE") != "1" else 100_000
    best: dict[tuple[tuple[int, str, str], str], tuple[float, float]] = {}
    for r in range(args.rounds):
        for case in cases:
            for name, build in builds if r % 2 == 0 else builds[::-1]:
                engine_s, base_s = measure(build, *case)
                e0, b0 = best.get((case, name), (float("inf"), float("inf")))
                best[(case, name)] = (min(e0, engine_s), min(b0, base_s))
                load = Path("/proc/loadavg").read_text().split()[0]
                print(
                    f"{case} {name}: engine {ticks / engine_s / 1e6:.1f}M "
                    f"baseline {ticks / base_s / 1e6:.1f}M (load {load})",
                    flush=True,
                )
    (a, _), (b, _) = builds
    head = f"| {a} | {b} | {b}/{a} | baseline | {b} / baseline |"
    print(f"| accounts | order | path {head}")
    print("|---:|---|---|---:|---:|---:|---:|---:|")
    for case in cases:
        old, new = best[(case, a)], best[(case, b)]
        base = min(old[1], new[1])
        print(
            f"| {case[0]:,} | {case[1]} | {case[2]} | {ticks / old[0] / 1e6:.1f}M "
            f"| {ticks / new[0] / 1e6:.1f}M | {old[0] / new[0]:.2f}x "
            f"| {ticks / base / 1e6:.1f}M | {new[0] / base:.1f}x |"
        )


if __name__ == "__main__":
    main()
