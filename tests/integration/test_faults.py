"""Faults injected into a real `prop-stream serve`: it recovers, or it exits fast.

- A full disk (a small tmpfs holding the database, filled up by a ballast file):
  the evaluator's commits fail, ``/readyz`` names the fault, the log has one line
  per retry and no traceback, purchases are refused with 503 and a
  ``Retry-After``; once space is freed the service judges on, and what it stored
  equals a clean run of the same ticks.
- A component that raises something that is not transient (injected through a
  ``sitecustomize`` module on the child's ``PYTHONPATH``, so no test hook lives
  in the product): the process exits non-zero within 10 s.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import httpx
import polars as pl
import pytest
from replay_support import stored_outputs
from service_process import ServiceProcess, run_prop_stream

from prop_stream.config import StreamSettings
from prop_stream.evaluator import DemoConfig, DemoSource, build_loop
from prop_stream.store import connect, init_database, load_position

pytestmark = pytest.mark.integration

DISK_MB = 48


def _until(
    condition: Callable[[], bool], timeout_s: float, what: str, step_s: float = 0.2
) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(step_s)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs of a few MB that the test can fill up (needs root, as CI is)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.geteuid() != 0 and not os.environ.get("CI"):
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    subprocess.run(  # noqa: S603 - fixed arguments
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(disk)],  # noqa: S607 - the system's mount
        check=True,
    )
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)  # noqa: S603, S607 - fixed arguments


def _fill(disk: Path, *, top_up: bool = False) -> Path:
    """Write a ballast file until the disk is full (``top_up``: grow the one there)."""
    ballast = disk / "ballast"
    chunk = b"\0" * (1 << 20)
    mode = os.O_APPEND if top_up else os.O_TRUNC
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT | mode, 0o600)
    try:
        for size in (1 << 20, 1 << 12, 1):
            while True:
                try:
                    os.write(fd, chunk[:size])
                except OSError:
                    break
    finally:
        os.close(fd)
    return ballast


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for line in text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    return 0.0


def _judged(url: str) -> float:
    return _metric(url, "prop_stream_ticks_judged_total")


def _batches(url: str) -> float:
    return _metric(url, "prop_stream_batches_total")


def _ready_checks(url: str) -> tuple[int, dict[str, str]]:
    answer = httpx.get(f"{url}/readyz", timeout=10)
    body = answer.json()
    checks = body.get("checks") or body["error"]["details"]["checks"]
    return answer.status_code, checks


def _log_records(lines: list[str]) -> list[dict[str, object]]:
    records = []
    for line in lines:
        with contextlib.suppress(ValueError):
            records.append(json.loads(line))
    return records


def test_serve_recovers_from_a_full_disk_and_judges_every_tick_once(
    small_disk: Path, tmp_path: Path
) -> None:
    db = small_disk / "prop.duckdb"
    init_database(db, demo=True)
    clean = tmp_path / "clean.duckdb"
    shutil.copy(db, clean)
    client: httpx.Client | None = None
    slipped = 0  # purchases that found room on the "full" disk (see below)
    proc = ServiceProcess(
        ["serve", "--db", str(db), "--source", "demo", "--port", "0"],
        tmp_path,
        env={"PROP_STREAM_LOG_FORMAT": "json", "PROP_STREAM_DEMO_RATE": "2000"},
    )
    try:
        url = proc.wait_ready()
        _until(lambda: _judged(url) > 0, 60, "the first judged ticks")
        client = httpx.Client(
            base_url=url,
            headers={"Authorization": f"Bearer {_session(db)}"},
            timeout=10,
        )
        program = client.get("/prop/programs").json()["items"][0]
        payers = client.get(
            "/prop/payer-accounts", params={"program_id": program["id"]}
        ).json()["items"]
        payer = next(p for p in payers if p["eligible"])
        body = {"program_id": program["id"], "payer_account_id": payer["account_id"]}
        ballast = _fill(small_disk)
        fault_from = len(proc.lines())
        before_fault = _batches(url)
        _until(
            lambda: _ready_checks(url)[1].get("evaluator", "").startswith("disk full"),
            60,
            "/readyz to name the full disk",
        )
        status, _ = _ready_checks(url)
        assert status == 503
        # Selling goes on as far as the store can: while nothing can be
        # written a purchase is refused with 503 and Retry-After, never a 500.
        # The evaluator's failed commits give back the pages of their rolled-back
        # write-ahead log, so a purchase can find room between a fill and its
        # commit: it is then written (as it can be) and counted; the disk is
        # filled again and the next one must be refused.
        deadline = time.monotonic() + 60
        while True:
            _fill(small_disk, top_up=True)
            answer = client.post(
                "/prop/purchases",
                json=body,
                headers={"Idempotency-Key": f"disk-full-{slipped}"},
            )
            if answer.status_code != 201:
                break
            slipped += 1
            assert time.monotonic() < deadline, "no purchase refused on a full disk"
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "unavailable"
        assert int(answer.headers["retry-after"]) > 0
        _until(
            lambda: sum("retry" in line for line in proc.lines()[fault_from:]) >= 2,
            60,
            "two retries",
        )
        ballast.unlink()
        _until(lambda: _ready_checks(url)[0] == 200, 90, "/readyz to recover")
        bought = client.post(
            "/prop/purchases", json=body, headers={"Idempotency-Key": "disk-free"}
        )
        assert bought.status_code == 201, bought.text
        outage = proc.lines()[fault_from:]
        # The rebuilt loop replays from its checkpoint (at most the batches
        # committed before the fault) and then judges new ones: wait until it
        # is well past what was committed before the fault.
        _until(
            lambda: _batches(url) >= 2 * before_fault + 10,
            120,
            "the recovered loop to pass the batches committed before the fault",
        )
    finally:
        # Closed whatever happened: a socket left open is reported by the
        # garbage collector in whichever test runs next.
        if client is not None:
            client.close()
        code = proc.stop(90)
    assert code == 0
    records = _log_records(outage)
    retries = [r for r in records if "retry" in str(r.get("message"))]
    assert retries, outage
    assert not [line for line in outage if "Traceback" in line]
    loud = [r for r in records if r.get("level") in ("WARNING", "ERROR", "CRITICAL")]
    # One line per retry of each component, plus at most a few others (the
    # refused purchase's one line).
    assert len(loud) <= 2 * len(retries) + 5, [r.get("message") for r in loud]

    faulted = connect(db, read_only=True)
    try:
        position = load_position(faulted, source="demo")
        got = stored_outputs(faulted, history=False)
    finally:
        faulted.close()
    _clean_run(clean, position)
    expected_conn = connect(clean, read_only=True)
    try:
        expected = stored_outputs(expected_conn, history=False)
    finally:
        expected_conn.close()
    assert expected["daily"].height > 0
    # The purchases (the one after the recovery, and any that found room during
    # the outage) are the one difference: leave out their challenges and
    # accounts, then every table equals the clean run's.
    new_challenges = set(got["challenges"]["id"]) - set(expected["challenges"]["id"])
    assert len(new_challenges) == 1 + slipped
    new_accounts = set(
        got["phases"]
        .filter(pl.col("challenge_id").is_in(new_challenges))["account_id"]
        .drop_nulls()
    )
    for table, frame in expected.items():
        mine = got[table]
        if "account_id" in mine.columns:
            mine = mine.filter(_not_in("account_id", new_accounts))
        if "challenge_id" in mine.columns:
            mine = mine.filter(_not_in("challenge_id", new_challenges))
        if table == "challenges":
            mine = mine.filter(_not_in("id", new_challenges))
        assert mine.equals(frame), (table, _differing(mine, frame))


def _differing(a: pl.DataFrame, b: pl.DataFrame) -> list[str]:
    if a.shape != b.shape:
        return [f"shape {a.shape} != {b.shape}"]
    return [c for c in a.columns if not a[c].equals(b[c])]


def _not_in(column: str, values: set[int]) -> pl.Expr:
    """Rows whose column is null or not among ``values``."""
    return pl.col(column).cast(pl.Int64).is_in(list(values)).fill_null(False).not_()


def _session(db: Path) -> str:
    out = run_prop_stream(["session", "alice@example.com", "--db", str(db)])
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def _clean_run(db: Path, position: dict[str, int]) -> None:
    """Judge demo batches 0..N-1 on a copy of the initial store, without faults."""
    epoch = datetime.fromtimestamp(position["epoch_us"] / 1e6, UTC)
    config = DemoConfig(seed=7, rate=2000, batch_ms=200, realtime=False, epoch=epoch)
    settings = StreamSettings(db=db, source="demo")
    conn = connect(db)
    try:
        loop = build_loop(settings, conn, source=DemoSource(config))
        loop.run(max_batches=position["batch"])
        assert loop.source.position()["tick_us"] == position["tick_us"]
    finally:
        conn.close()


FAULT = textwrap.dedent(
    """
    import os

    def _patch():
        flag = os.environ["PROP_STREAM_TEST_FAULT_FLAG"]
        target = os.environ["PROP_STREAM_TEST_FAULT_TARGET"]
        if target == "jobs":
            from prop_stream.jobs import worker as module
            cls, name = module.JobWorker, "run_once"
        else:
            from prop_stream.evaluator import loop as module
            cls, name = module.EvaluatorLoop, "run_once"
        original = getattr(cls, name)

        def faulty(self, *args, **kwargs):
            if os.path.exists(flag):
                raise RuntimeError("injected bug in " + target)
            return original(self, *args, **kwargs)

        setattr(cls, name, faulty)

    _patch()
    """
)


@pytest.mark.parametrize("component", ["jobs", "evaluator"])
def test_serve_exits_nonzero_within_10s_when_a_component_dies(
    tmp_path: Path, component: str
) -> None:
    db = tmp_path / "prop.duckdb"
    init_database(db, demo=True)
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FAULT)
    flag = tmp_path / "fault-now"
    proc = ServiceProcess(
        ["serve", "--db", str(db), "--source", "demo", "--port", "0"],
        tmp_path,
        env={
            "PYTHONPATH": os.pathsep.join(
                [str(inject), os.environ.get("PYTHONPATH", "")]
            ).rstrip(os.pathsep),
            "PROP_STREAM_TEST_FAULT_FLAG": str(flag),
            "PROP_STREAM_TEST_FAULT_TARGET": component,
            "PROP_STREAM_LOG_FORMAT": "json",
        },
    )
    try:
        url = proc.wait_ready()
        assert httpx.get(f"{url}/readyz", timeout=10).status_code == 200
        flag.touch()
        began = time.monotonic()
        code = proc.wait(30)
        took = time.monotonic() - began
    finally:
        proc.kill()
    assert code != 0
    assert took < 10, f"exited {took:.1f} s after the fault"
    text = "".join(proc.lines())
    assert f"{component}: failed and will not be retried" in text
    assert f"injected bug in {component}" in text
    with duckdb.connect(str(db), read_only=True) as conn:  # the file is free again
        assert conn.execute("SELECT count(*) FROM challenges").fetchone()
