"""``prop-stream whatif``: rule changes replayed over a store's archive.

The store is a real one: the demo evaluator loop judges demo ticks (and deals)
into a DuckDB file, the archiver moves most of them to ``DB.archive/ticks`` (and
``deals``) and the rest stay staged. Two of its phases run with a daily limit so
tight that they fail. What a
tighter or looser daily limit must change is worked out from the store's daily
snapshots alone (``tests/whatif_support.py``), and the what-if must change
exactly those phases.
"""

from __future__ import annotations

import json
import re
import shutil
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from whatif_support import limit_failing, peak_open_lots, worst_daily_loss

from prop_stream.backtest.whatif import CHANGE_KINDS, change_kind
from prop_stream.cli import main
from prop_stream.config import StreamSettings
from prop_stream.evaluator import DemoConfig, DemoSource, build_loop
from prop_stream.store import connect, cursor, init_database
from prop_stream.store.archive import (
    TickArchiver,
    archive_dir,
    staged_deals,
    staged_rows,
)

# The phases run with a tight daily limit, so that the store records failures.
_TIGHT = {3: 0.001, 5: 0.001}
_BATCHES = 150
_ARCHIVED_BATCHES = 100


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    db = tmp_path_factory.mktemp("whatif") / "prop.duckdb"
    init_database(db, demo=True)
    conn = connect(db)
    try:
        for challenge, limit in _TIGHT.items():
            rules = json.loads(
                conn.execute(
                    "SELECT rules FROM challenge_phases "
                    "WHERE challenge_id = ? AND phase_index = 0",
                    [challenge],
                ).fetchall()[0][0]
            )
            rules["max_daily_loss"] = limit
            conn.execute(
                "UPDATE challenge_phases SET rules = ? "
                "WHERE challenge_id = ? AND phase_index = 0",
                [json.dumps(rules), challenge],
            )
        source = DemoSource(
            DemoConfig(seed=7, rate=20_000, batch_ms=200, realtime=False)
        )
        loop = build_loop(StreamSettings(db=db, source="demo"), conn, source=source)
        loop.run(max_batches=_ARCHIVED_BATCHES)
        TickArchiver(cursor(conn), db).archive_once()
        # The rest stays staged: the what-if must read it from the store.
        loop.run(max_batches=_BATCHES - _ARCHIVED_BATCHES)
        assert staged_rows(conn) > 0
    finally:
        conn.close()
    return db


def _whatif(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["whatif", *args])
    return code, capsys.readouterr().err


def _outcomes(out: Path) -> pl.DataFrame:
    return pl.read_parquet(out / "outcomes.parquet")


def _all_phases(db: Path) -> list[str]:
    return ["--db", str(db), "--phase-ids", "1", "2", "3", "4", "5"]


def test_the_store_has_recorded_failures(store: Path) -> None:
    worst = worst_daily_loss(store)
    failed = {a for a, (status, _) in worst.items() if status == "failed"}
    assert len(failed) == len(_TIGHT), worst


def test_a_tighter_daily_limit_fails_exactly_the_phases_whose_worst_day_exceeds_it(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The phases that ran with the store's own limits (not the tight ones,
    # which a common --set would loosen).
    limit, expected = limit_failing(worst_daily_loss(store))
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        "--phase-ids",
        "1",
        "2,4",
        "--set",
        f"max_daily_loss={limit}",
        "--out",
        str(out),
    )
    assert code == 0, err
    outcomes = _outcomes(out)
    assert outcomes["challenge_id"].to_list() == [1, 2, 4]
    changed = outcomes.filter(pl.col("change").is_not_null())
    assert set(changed["account_id"]) == expected
    assert set(changed["change"]) == {"active_to_failed"}
    assert set(changed["whatif_rule"]) == {"daily_loss"}
    # The baseline replay is what the store recorded, for every phase.
    assert outcomes["as_recorded"].all()
    assert pl.read_parquet(out / "mismatches.parquet").height == 0
    assert pl.read_parquet(out / "changes.parquet").equals(changed)
    counts = pl.read_csv(out / "counts.csv")
    assert counts.rows() == [("active_to_failed", len(expected))]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["read_from"] == "store"
    assert summary["staged_ticks"] > 0
    assert summary["changes"] == {"active_to_failed": len(expected)}
    n = len(expected)
    assert f"{n} change{'s' if n > 1 else ''} (active_to_failed {n}), 0 not" in err
    # The replays' own tables are there, and the baseline equals the store's days.
    for run in ("baseline", "whatif"):
        for table in ("breaches", "accounts", "daily"):
            assert (out / run / f"{table}.parquet").is_file()
    conn = connect(store, read_only=True)
    try:
        stored = conn.execute(
            "SELECT account_id, day, daily_start_equity, min_equity, close_equity "
            "FROM prop_daily_snapshots WHERE challenge_id IN (1, 2, 4) "
            "ORDER BY account_id, day"
        ).fetchall()
        assert stored
    finally:
        conn.close()
    daily = pl.read_parquet(out / "baseline" / "daily.parquet")
    assert (
        daily.select(
            "account_id", "day", "daily_start_equity", "min_equity", "close_equity"
        ).rows()
        == stored
    )


@pytest.fixture(scope="module")
def deal_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store of 40 demo hours with deals, part archived, part staged."""
    start = datetime(2026, 1, 5, tzinfo=UTC)
    db = tmp_path_factory.mktemp("whatif-deals") / "prop.duckdb"
    init_database(db, demo=True, now=start)
    conn = connect(db)
    try:
        source = DemoSource(
            DemoConfig(
                seed=11, rate=5 / 60, batch_ms=20 * 60_000, realtime=False, epoch=start
            )
        )
        loop = build_loop(StreamSettings(db=db, source="demo"), conn, source=source)
        loop.run(max_batches=80)
        TickArchiver(cursor(conn), db).archive_once()
        loop.run(max_batches=40)
        assert loop.stats.deals > 0
        assert staged_deals(conn) > 0  # the what-if reads these from the store
    finally:
        conn.close()
    return db


def test_a_max_open_lots_limit_fails_exactly_the_phases_that_held_more(
    deal_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The demo's rules have no deal rule: each phase's most open lots, worked
    # out from the archived and staged deals alone, says whom a limit fails.
    store = deal_store
    peaks = peak_open_lots(store, archive_dir(store))
    active = {a: v for a, v in peaks.items() if v[0] == "active"}
    ranked = sorted(((lots, a) for a, (_, lots) in active.items()), reverse=True)
    assert len(ranked) >= 2, peaks
    assert ranked[0][0] > 0, peaks
    gap, count = max(
        (ranked[i - 1][0] - ranked[i][0], i) for i in range(1, len(ranked))
    )
    assert gap >= 0.02, ranked  # two hundredths: no rounding crosses the limit
    limit = round((ranked[count - 1][0] + ranked[count][0]) / 2, 2)
    expected = {a for lots, a in ranked[:count]}
    challenges = _challenges_of(store, set(active))
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        "--phase-ids",
        *[str(c) for c in challenges],
        "--set",
        f"max_open_lots={limit}",
        "--out",
        str(out),
    )
    assert code == 0, err
    outcomes = _outcomes(out)
    assert outcomes["as_recorded"].all(), outcomes.filter(~pl.col("as_recorded"))
    changed = outcomes.filter(pl.col("change").is_not_null())
    assert set(changed["account_id"]) == expected
    assert set(changed["change"]) == {"active_to_failed"}
    assert set(changed["whatif_rule"]) == {"max_position_size"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["staged_deals"] > 0
    assert summary["deals"] > summary["staged_deals"]  # archived ones too
    # The hedge flags of the replayed deals (customers from the store): the
    # what-if loses exactly flags of the phases it ends earlier (an ended
    # phase processes no more deals), never gains one.
    pair = ["account_id_1", "deal_id_1", "account_id_2", "deal_id_2"]
    before = pl.read_parquet(out / "baseline" / "flags.parquet")
    after = pl.read_parquet(out / "whatif" / "flags.parquet")
    assert before.height > 0
    assert after.join(before, on=pair, how="anti").is_empty()
    lost = before.join(after, on=pair, how="anti")
    assert all(
        a in expected or b in expected
        for a, b in lost.select("account_id_1", "account_id_2").iter_rows()
    )
    # The what-if's deal-rule breaches are there, each over the limit.
    breaches = pl.read_parquet(out / "whatif" / "breaches.parquet").filter(
        pl.col("rule") == "max_position_size"
    )
    assert set(breaches["account_id"]) == expected
    assert (breaches["actual"] > limit).all()
    assert (
        pl.read_parquet(out / "baseline" / "breaches.parquet")
        .filter(pl.col("rule") == "max_position_size")
        .is_empty()
    )


def _challenges_of(db: Path, accounts: set[int]) -> list[int]:
    conn = connect(db, read_only=True)
    try:
        rows = conn.execute(
            "SELECT DISTINCT challenge_id FROM challenge_phases "
            "WHERE account_id IN (SELECT unnest(?)) ORDER BY 1",
            [sorted(accounts)],
        ).fetchall()
    finally:
        conn.close()
    return [int(r[0]) for r in rows]


def test_a_looser_daily_limit_lets_the_failed_phases_go_on(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    worst = worst_daily_loss(store)
    failed = {a for a, (status, _) in worst.items() if status == "failed"}
    assert all(worst[a][1] < 0.05 for a in failed)
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        *_all_phases(store),
        "--set",
        "max_daily_loss=0.05",
        "--out",
        str(out),
    )
    assert code == 0, err
    outcomes = _outcomes(out)
    # The recorded failures (status, instant, rule, day) are the baseline's.
    assert outcomes["as_recorded"].all(), outcomes.filter(~pl.col("as_recorded"))
    assert (
        set(outcomes.filter(pl.col("recorded_status") == "failed")["account_id"])
        == failed
    )
    assert (
        outcomes.filter(pl.col("recorded_status") == "failed")["recorded_ts"]
        .is_not_null()
        .all()
    )
    changed = outcomes.filter(pl.col("change").is_not_null())
    assert set(changed["account_id"]) == failed
    assert set(changed["change"]) == {"failed_to_active"}
    assert set(changed["baseline_rule"]) == {"daily_loss"}
    assert set(changed["recorded_status"]) == {"failed"}


def test_program_selects_its_started_phases(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        "--program",
        "2",
        "--set",
        "max_daily_loss=0.03",
        "--out",
        str(out),
    )
    assert code == 0, err
    # The demo's challenges 2 and 4 run the one-step program (id 2).
    assert _outcomes(out)["challenge_id"].to_list() == [2, 4]


def test_the_report_draws_both_floors_for_the_changed_phases(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    limit, expected = limit_failing(worst_daily_loss(store))
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        "--phase-ids",
        "1,2,4",
        "--set",
        f"max_daily_loss={limit}",
        "--out",
        str(out),
        "--report",
    )
    assert code == 0, err
    page = (out / "report.html").read_text()
    match = re.search(
        r'<script type="application/json" id="report-data">(.*?)</script>', page, re.S
    )
    assert match is not None
    data = json.loads(match.group(1).replace("<\\/", "</"))
    entries = {int(e["id"]): e for e in data["accounts"]}
    assert len(entries) == 3
    for account, entry in entries.items():
        if account not in expected:
            assert "old_daily_floor" not in entry or entry["old_daily_floor"] is None
            continue
        assert entry["status"] == "failed"
        assert entry["old_status"] == "active"
        old = [v for _, v in entry["old_daily_floor"] if v is not None]
        new = [v for _, v in entry["daily_floor"] if v is not None]
        # The floors sit the limits' difference apart (one day, one reference).
        # The demo's limits: two-step 5% (challenge 1), one-step 4% (2 and 4).
        old_limit = 0.05 if entry["challenge"] == "1" else 0.04
        gap = (old_limit - limit) * entry["initial_balance"]
        assert old
        assert new
        assert abs((new[0] - old[0]) - gap) <= 0.011
        # The curve runs on to the baseline's end: past the what-if's fail.
        assert len(entry["t"]) > 0
        assert entry["end"] < entry["t0"] + entry["t"][-1]


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("no_such_rule=1", "--set no_such_rule=1: rules.no_such_rule"),
        ("max_daily_loss=1.5", "--set max_daily_loss=1.5: rules.max_daily_loss"),
        ("max_daily_loss=0", "--set max_daily_loss=0: rules.max_daily_loss"),
        ("max_daily_loss=abc", '--set max_daily_loss="abc": rules.max_daily_loss'),
        ("total_loss_mode=sideways", '--set total_loss_mode="sideways"'),
        ("max_daily_loss", "--set max_daily_loss: expected NAME=VALUE"),
        ("=0.04", "--set =0.04: expected NAME=VALUE"),
        ("max_daily_loss=NaN", '--set max_daily_loss="NaN": rules.max_daily_loss'),
    ],
)
def test_an_invalid_set_is_refused_and_nothing_is_written(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    message: str,
) -> None:
    out = tmp_path / "out"
    code, err = _whatif(
        capsys, *_all_phases(store), "--set", setting, "--out", str(out)
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"prop-stream: error: {message}"), lines[0]
    assert not out.exists()


def test_a_rule_set_twice_is_refused(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _whatif(
        capsys,
        *_all_phases(store),
        "--set",
        "max_daily_loss=0.04",
        "--set",
        "max_daily_loss=0.03",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert "--set max_daily_loss=0.03: max_daily_loss is set twice" in err


@pytest.mark.parametrize(
    ("selection", "message"),
    [
        (["--program", "99"], "--program 99: no such program"),
        (["--phase-ids", "99"], "--phase-ids 99: no started phase of challenge 99"),
        (["--phase-ids", "1:1"], "--phase-ids 1:1: no started phase"),
        (["--phase-ids", "x:0"], "--phase-ids x:0: expected CHALLENGE:PHASE"),
    ],
)
def test_a_bad_selection_is_refused(
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    selection: list[str],
    message: str,
) -> None:
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        *selection,
        "--set",
        "max_daily_loss=0.04",
        "--out",
        str(out),
    )
    assert code == 2
    assert f"prop-stream: error: {message}" in err
    assert not out.exists()


def test_a_bad_tmp_dir_or_out_is_refused(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    for extra, message in (
        (
            ["--out", str(tmp_path / "o"), "--tmp-dir", str(tmp_path / "nope")],
            "--tmp-dir",
        ),
        (["--out", str(tmp_path / "file")], "exists and is not a directory"),
    ):
        code, err = _whatif(
            capsys, *_all_phases(store), "--set", "max_daily_loss=0.04", *extra
        )
        assert code == 2
        assert message in err
    assert not (tmp_path / "o").exists()


def test_program_and_phase_ids_together_are_a_usage_error(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, err = _whatif(
        capsys,
        "--db",
        str(store),
        "--program",
        "1",
        "--phase-ids",
        "1",
        "--set",
        "max_daily_loss=0.04",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert "not allowed with argument" in err


def test_a_store_without_archive_or_staged_ticks_is_refused(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bare = tmp_path / "bare.duckdb"
    init_database(bare, demo=True)
    code, err = _whatif(
        capsys,
        "--db",
        str(bare),
        "--program",
        "1",
        "--set",
        "max_daily_loss=0.04",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 2
    assert "no archived ticks in" in err
    assert not archive_dir(bare).exists() or not any(
        archive_dir(bare).rglob("*.parquet")
    )


def test_the_archive_option_reads_a_moved_archive(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "ticks"
    shutil.copytree(archive_dir(store) / "ticks", moved)
    first, second = tmp_path / "a", tmp_path / "b"
    for out, extra in ((first, []), (second, ["--archive", str(moved)])):
        code, err = _whatif(
            capsys,
            *_all_phases(store),
            "--set",
            "max_daily_loss=0.004",
            "--out",
            str(out),
            *extra,
        )
        assert code == 0, err
    assert _outcomes(first).equals(_outcomes(second))


def test_invalid_archived_ticks_are_skipped_as_the_service_did(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    moved = tmp_path / "ticks"
    shutil.copytree(archive_dir(store) / "ticks", moved)
    day = sorted(moved.iterdir())[-1]
    # The engine skips a NaN tick as invalid; the archive keeps it.
    pl.DataFrame(
        {
            "account_id": [5000003],
            "ts": [datetime.now(UTC)],
            "equity": [float("nan")],
            "balance": [100_000.0],
        }
    ).write_parquet(day / "part-99999999999999999998-99999999999999999999.parquet")
    first, second = tmp_path / "a", tmp_path / "b"
    for out, extra in ((first, []), (second, ["--archive", str(moved)])):
        code, err = _whatif(
            capsys,
            *_all_phases(store),
            "--set",
            "max_daily_loss=0.004",
            "--out",
            str(out),
            *extra,
        )
        assert code == 0, err
    assert _outcomes(first).equals(_outcomes(second))
    summary = json.loads((second / "summary.json").read_text())
    assert summary["invalid_ticks_skipped"] == 1


def test_phases_the_replay_cannot_see_are_listed_as_mismatches(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # An archive that lost its files (retention, a bad copy): only the staged
    # ticks are replayed, which came after the recorded failures.
    empty = tmp_path / "ticks"
    empty.mkdir()
    out = tmp_path / "out"
    code, err = _whatif(
        capsys,
        *_all_phases(store),
        "--set",
        "max_daily_loss=0.05",
        "--out",
        str(out),
        "--archive",
        str(empty),
    )
    assert code == 0, err
    worst = worst_daily_loss(store)
    failed = {a for a, (status, _) in worst.items() if status == "failed"}
    mismatches = pl.read_parquet(out / "mismatches.parquet")
    assert set(mismatches["account_id"]) == failed
    assert set(mismatches["baseline_status"]) == {"active"}
    assert f"{len(failed)} not as recorded" in err


def test_change_kinds() -> None:
    def o(
        status: str, rule: str | None = None, day: int | None = None
    ) -> dict[str, object]:
        return {"status": status, "rule": rule, "day": day}

    cases = [
        (o("passed", day=3), o("failed", "daily_loss", 2), "passed_to_failed"),
        (o("failed", "daily_loss", 2), o("passed", day=3), "failed_to_passed"),
        (o("active"), o("failed", "daily_loss", 2), "active_to_failed"),
        (o("active"), o("passed", day=4), "active_to_passed"),
        (o("passed", day=4), o("active"), "passed_to_active"),
        (o("failed", "daily_loss", 2), o("active"), "failed_to_active"),
        (o("failed", "daily_loss", 2), o("failed", "max_loss", 2), "failed_other_rule"),
        (
            o("failed", "daily_loss", 2),
            o("failed", "daily_loss", 1),
            "failed_other_day",
        ),
        (o("passed", day=4), o("passed", day=5), "passed_other_day"),
        (o("failed", "daily_loss", 2), o("failed", "daily_loss", 2), None),
        (o("active"), o("active"), None),
    ]
    for before, after, kind in cases:
        assert change_kind(before, after) == kind
    assert {kind for _, _, kind in cases} - {None} == set(CHANGE_KINDS)


def test_a_postgresql_store_replays_as_a_duckdb_file_does(
    pg_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The same demo hours judged into a DuckDB file and into a PostgreSQL
    # database (the scale-out store, its archive in PROP_STREAM_ARCHIVE_DIR),
    # part archived, part staged: the what-if of each gives the same outcomes.
    start = datetime(2026, 1, 5, tzinfo=UTC)
    outs: dict[str, Path] = {}
    for name, db in (("duckdb", str(tmp_path / "prop.duckdb")), ("postgres", pg_url)):
        archive = tmp_path / f"{name}-archive"
        init_database(db, demo=True, now=start)
        conn = connect(db)
        try:
            source = DemoSource(
                DemoConfig(
                    seed=11,
                    rate=5 / 60,
                    batch_ms=20 * 60_000,
                    realtime=False,
                    epoch=start,
                )
            )
            settings = StreamSettings(db=db, source="demo", archive_dir=archive)
            loop = build_loop(settings, conn, source=source)
            loop.run(max_batches=60)
            TickArchiver(cursor(conn), db, root=archive).archive_once()
            loop.run(max_batches=20)
            assert staged_rows(conn) > 0
        finally:
            conn.close()
        out = tmp_path / f"{name}-out"
        args = ["--db", db, "--phase-ids", "1", "2", "3", "4", "5"]
        args += ["--set", "max_daily_loss=0.001", "--out", str(out)]
        if name == "postgres":
            # Without the shared directory the archive can't be found: refused.
            monkeypatch.delenv("PROP_STREAM_ARCHIVE_DIR", raising=False)
            code, err = _whatif(capsys, *args)
            assert code == 2, err
            assert "PROP_STREAM_ARCHIVE_DIR" in err
            assert not out.exists()
            monkeypatch.setenv("PROP_STREAM_ARCHIVE_DIR", str(archive))
        else:
            args += ["--archive", str(archive / "ticks")]
        code, err = _whatif(capsys, *args)
        assert code == 0, err
        outs[name] = out
    duck, pg = _outcomes(outs["duckdb"]), _outcomes(outs["postgres"])
    assert pg.equals(duck)
    assert duck["as_recorded"].all()
    assert duck["change"].drop_nulls().len() > 0  # the tight limit fails phases
    summary = json.loads((outs["postgres"] / "summary.json").read_text())
    assert summary["read_from"] == "store"
    assert summary["staged_ticks"] > 0
    assert summary["db"].startswith("postgresql://")
    assert ":prop_stream@" not in summary["db"]  # the password is not written
