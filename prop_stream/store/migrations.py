"""Versioned schema migrations of the store (a DuckDB file or a PostgreSQL database).

Each :class:`Migration` is a numbered list of SQL statements. :func:`migrate` applies
the ones a database lacks, each in its own transaction together with its row in
``schema_migrations``, so a crash leaves the database at one version or the next,
and running it again is a no-op. Never edit a released migration: add one.

Conventions (``docs/store.md`` documents every table and view):

- money in the ledger is ``DECIMAL(18,2)``; the engine's equity figures ``DOUBLE``;
- timestamps are ``TIMESTAMPTZ`` (UTC); days are ``DATE`` (the phase's local day);
- the engine's outputs (breaches, daily snapshots, metrics) carry no foreign keys:
  they are written at tick rate, and their keys come from the engine.

Both backends run the same statements: on PostgreSQL DuckDB's type names are
spelled PostgreSQL's way (:func:`postgres_ddl`: ``DOUBLE`` → ``DOUBLE
PRECISION``, ``BLOB`` → ``BYTEA``); a statement that needs more than that (a view
with DuckDB's ``GROUP BY ALL``) is given in :attr:`Migration.postgres`, in the
same order.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Final

from prop_stream.store.changes import MIGRATION_9, MIGRATION_9_POSTGRES
from prop_stream.store.db import Connection, is_postgres, transaction
from prop_stream.store.partitions import MIGRATION_6


@dataclass(frozen=True, slots=True)
class Migration:
    """One schema version.

    Attributes:
        version: Its number, 1, 2, ... in order.
        name: What it does, in a few words.
        statements: The SQL it runs, in order.
        postgres: The SQL it runs on PostgreSQL when that differs by more than
            type names (None: ``statements`` through :func:`postgres_ddl`).
    """

    version: int
    name: str
    statements: tuple[str, ...]
    postgres: tuple[str, ...] | None = None

    def statements_for(self, conn: Connection) -> tuple[str, ...]:
        """The statements to run on ``conn``'s backend."""
        if not is_postgres(conn):
            return self.statements
        if self.postgres is not None:
            return self.postgres
        return tuple(postgres_ddl(s) for s in self.statements)


_DOUBLE: Final = re.compile(r"\bDOUBLE\b(?!\s+PRECISION)")
_BLOB: Final = re.compile(r"\bBLOB\b")


def postgres_ddl(statement: str) -> str:
    """A DuckDB DDL statement with PostgreSQL's spelling of its types.

    Args:
        statement: One statement of a migration.

    Returns:
        The statement for PostgreSQL (``JSON``, ``DECIMAL``, ``VARCHAR``,
        ``TIMESTAMPTZ``, sequences and ``ON CONFLICT`` are spelled alike).
    """
    return _BLOB.sub("BYTEA", _DOUBLE.sub("DOUBLE PRECISION", statement))


_METRIC_COLUMNS: Final = """
    account_id BIGINT NOT NULL,
    challenge_id BIGINT NOT NULL,
    phase_index INTEGER NOT NULL,
    ts TIMESTAMPTZ NOT NULL,
    status VARCHAR NOT NULL,
    day DATE NOT NULL,
    equity DOUBLE NOT NULL,
    balance DOUBLE NOT NULL,
    profit DOUBLE NOT NULL,
    daily_start_equity DOUBLE NOT NULL,
    daily_start_balance DOUBLE NOT NULL,
    daily_pnl DOUBLE NOT NULL,
    daily_loss_limit DOUBLE,
    daily_floor DOUBLE,
    daily_room DOUBLE,
    daily_paused BOOLEAN NOT NULL,
    max_loss_limit DOUBLE,
    overall_floor DOUBLE,
    overall_room DOUBLE,
    hwm DOUBLE NOT NULL,
    trading_days INTEGER NOT NULL,
    days_elapsed INTEGER NOT NULL,
    best_day_profit DOUBLE NOT NULL,
    profit_target_level DOUBLE,
    profit_progress DOUBLE,
    trading_days_progress DOUBLE NOT NULL
"""

_V1: Final = (
    # ---------------------------------------------------------- reference data
    """
    CREATE TABLE account_groups (
        name VARCHAR PRIMARY KEY,
        kind VARCHAR NOT NULL CHECK (kind IN ('DEMO', 'REAL')),
        currency VARCHAR NOT NULL CHECK (length(currency) = 3),
        leverage INTEGER NOT NULL CHECK (leverage > 0)
    )
    """,
    "CREATE SEQUENCE customers_id_seq START 1",
    """
    CREATE TABLE customers (
        id BIGINT PRIMARY KEY DEFAULT nextval('customers_id_seq'),
        email VARCHAR NOT NULL UNIQUE,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE sessions (
        token_hash VARCHAR PRIMARY KEY,
        customer_id BIGINT NOT NULL REFERENCES customers (id),
        created_at TIMESTAMPTZ NOT NULL,
        expires_at TIMESTAMPTZ NOT NULL
    )
    """,
    "CREATE SEQUENCE trading_accounts_login_seq START 5000001",
    """
    CREATE TABLE trading_accounts (
        account_id BIGINT PRIMARY KEY
            DEFAULT nextval('trading_accounts_login_seq'),
        customer_id BIGINT NOT NULL REFERENCES customers (id),
        account_group VARCHAR NOT NULL REFERENCES account_groups (name),
        currency VARCHAR NOT NULL CHECK (length(currency) = 3),
        balance DECIMAL(18, 2) NOT NULL DEFAULT 0,
        enabled BOOLEAN NOT NULL DEFAULT true,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    "CREATE SEQUENCE programs_id_seq START 1",
    """
    CREATE TABLE programs (
        id BIGINT PRIMARY KEY DEFAULT nextval('programs_id_seq'),
        name VARCHAR NOT NULL,
        description VARCHAR NOT NULL DEFAULT '',
        price DECIMAL(18, 2) NOT NULL CHECK (price >= 0),
        currency VARCHAR NOT NULL CHECK (length(currency) = 3),
        active BOOLEAN NOT NULL DEFAULT true,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    """
    CREATE TABLE program_phases (
        program_id BIGINT NOT NULL REFERENCES programs (id),
        phase_index INTEGER NOT NULL CHECK (phase_index >= 0),
        name VARCHAR NOT NULL,
        phase_type SMALLINT NOT NULL CHECK (phase_type IN (0, 1)),
        account_group VARCHAR NOT NULL REFERENCES account_groups (name),
        rules JSON NOT NULL,
        profit_split DECIMAL(5, 4)
            CHECK (profit_split IS NULL OR (profit_split > 0 AND profit_split <= 1)),
        PRIMARY KEY (program_id, phase_index)
    )
    """,
    # ------------------------------------------------ purchases and challenges
    """
    CREATE TABLE purchase_statuses (
        status SMALLINT PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE
    )
    """,
    """
    INSERT INTO purchase_statuses VALUES
        (0, 'pending'), (1, 'paid'), (2, 'account_created'), (3, 'active'),
        (4, 'failed'), (5, 'refunded')
    """,
    "CREATE SEQUENCE purchases_id_seq START 1",
    """
    CREATE TABLE purchases (
        id BIGINT PRIMARY KEY DEFAULT nextval('purchases_id_seq'),
        customer_id BIGINT NOT NULL REFERENCES customers (id),
        program_id BIGINT NOT NULL REFERENCES programs (id),
        payer_account_id BIGINT NOT NULL REFERENCES trading_accounts (account_id),
        status SMALLINT NOT NULL DEFAULT 0 CHECK (status BETWEEN 0 AND 5),
        price DECIMAL(18, 2) NOT NULL,
        currency VARCHAR NOT NULL,
        idempotency_key VARCHAR,
        request_hash VARCHAR,
        failure_reason VARCHAR,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        UNIQUE (customer_id, idempotency_key)
    )
    """,
    """
    CREATE TABLE challenge_statuses (
        status SMALLINT PRIMARY KEY,
        name VARCHAR NOT NULL UNIQUE
    )
    """,
    """
    INSERT INTO challenge_statuses VALUES
        (0, 'pending'), (1, 'active'), (2, 'passed'), (3, 'failed'), (4, 'cancelled')
    """,
    "CREATE SEQUENCE challenges_id_seq START 1",
    """
    CREATE TABLE challenges (
        id BIGINT PRIMARY KEY DEFAULT nextval('challenges_id_seq'),
        customer_id BIGINT NOT NULL REFERENCES customers (id),
        program_id BIGINT NOT NULL REFERENCES programs (id),
        purchase_id BIGINT REFERENCES purchases (id),
        status SMALLINT NOT NULL DEFAULT 0 CHECK (status BETWEEN 0 AND 4),
        current_phase_index INTEGER NOT NULL DEFAULT 0,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        ended_at TIMESTAMPTZ
    )
    """,
    """
    CREATE TABLE challenge_phases (
        challenge_id BIGINT NOT NULL REFERENCES challenges (id),
        phase_index INTEGER NOT NULL,
        name VARCHAR NOT NULL,
        phase_type SMALLINT NOT NULL CHECK (phase_type IN (0, 1)),
        account_group VARCHAR NOT NULL,
        account_id BIGINT UNIQUE,
        status VARCHAR NOT NULL DEFAULT 'pending' CHECK (
            status IN ('pending', 'active', 'passed', 'failed', 'cancelled')
        ),
        started_at TIMESTAMPTZ,
        ended_at TIMESTAMPTZ,
        rules JSON NOT NULL,
        profit_split DECIMAL(5, 4),
        PRIMARY KEY (challenge_id, phase_index)
    )
    """,
    # ------------------------------------------------------- engine outputs
    """
    CREATE TABLE prop_daily_snapshots (
        account_id BIGINT NOT NULL,
        day DATE NOT NULL,
        challenge_id BIGINT NOT NULL,
        phase_index INTEGER NOT NULL,
        daily_start_equity DOUBLE NOT NULL,
        daily_start_balance DOUBLE NOT NULL,
        min_equity DOUBLE NOT NULL,
        close_equity DOUBLE NOT NULL,
        PRIMARY KEY (account_id, day)
    )
    """,
    f"""
    CREATE TABLE metrics_latest (
        {_METRIC_COLUMNS},
        PRIMARY KEY (account_id)
    )
    """,
    f"""
    CREATE TABLE metric_history (
        {_METRIC_COLUMNS},
        PRIMARY KEY (account_id, ts)
    )
    """,
    "CREATE SEQUENCE breaches_id_seq START 1",
    """
    CREATE TABLE breaches (
        id BIGINT NOT NULL DEFAULT nextval('breaches_id_seq'),
        account_id BIGINT NOT NULL,
        challenge_id BIGINT NOT NULL,
        phase_index INTEGER NOT NULL,
        breach_seq BIGINT NOT NULL,
        rule VARCHAR NOT NULL,
        severity VARCHAR NOT NULL CHECK (severity IN ('warning', 'critical')),
        threshold DOUBLE NOT NULL,
        actual DOUBLE NOT NULL,
        action VARCHAR NOT NULL
            CHECK (action IN ('phase_failed', 'trading_paused', 'notify')),
        ts TIMESTAMPTZ NOT NULL,
        resolved BOOLEAN NOT NULL,
        resolved_ts TIMESTAMPTZ,
        PRIMARY KEY (account_id, breach_seq)
    )
    """,
    # ------------------------------------------------------ stream progress
    """
    CREATE TABLE source_offsets (
        source VARCHAR NOT NULL,
        "partition" VARCHAR NOT NULL,
        next_offset BIGINT NOT NULL,
        updated_at TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (source, "partition")
    )
    """,
    "CREATE SEQUENCE engine_checkpoints_id_seq START 1",
    """
    CREATE TABLE engine_checkpoints (
        id BIGINT PRIMARY KEY DEFAULT nextval('engine_checkpoints_id_seq'),
        source VARCHAR NOT NULL,
        position JSON NOT NULL,
        batch_seq BIGINT NOT NULL,
        engine_version VARCHAR NOT NULL,
        snapshot BLOB NOT NULL,
        created_at TIMESTAMPTZ NOT NULL
    )
    """,
)

_V2_VIEWS: Final = (
    """
    CREATE VIEW risk_breaches_by_day_rule AS
    SELECT
        CAST(ts AS DATE) AS day,
        rule,
        severity,
        count(*) AS breaches,
        count(*) FILTER (WHERE resolved) AS resolved,
        count(DISTINCT account_id) AS accounts,
        count(DISTINCT challenge_id) AS challenges
    FROM breaches
    GROUP BY ALL
    """,
    """
    CREATE VIEW risk_challenges_by_status AS
    SELECT
        p.id AS program_id,
        p.name AS program_name,
        c.status,
        s.name AS status_name,
        count(*) AS challenges
    FROM challenges AS c
    JOIN challenge_statuses AS s ON s.status = c.status
    JOIN programs AS p ON p.id = c.program_id
    GROUP BY ALL
    """,
    """
    CREATE VIEW risk_phases_near_floor AS
    SELECT
        m.account_id,
        m.challenge_id,
        m.phase_index,
        ph.name AS phase_name,
        c.customer_id,
        m.ts,
        m.equity,
        m.daily_floor,
        m.daily_room,
        m.daily_loss_limit,
        m.daily_room / m.daily_loss_limit AS daily_room_share,
        m.overall_floor,
        m.overall_room,
        m.max_loss_limit,
        m.overall_room / m.max_loss_limit AS overall_room_share,
        coalesce(m.daily_room < 0.2 * m.daily_loss_limit, false) AS near_daily_floor,
        coalesce(m.overall_room < 0.2 * m.max_loss_limit, false)
            AS near_overall_floor
    FROM metrics_latest AS m
    JOIN challenge_phases AS ph
        ON ph.challenge_id = m.challenge_id AND ph.phase_index = m.phase_index
    JOIN challenges AS c ON c.id = m.challenge_id
    WHERE ph.status = 'active'
        AND (
            m.daily_room < 0.2 * m.daily_loss_limit
            OR m.overall_room < 0.2 * m.max_loss_limit
        )
    """,
)

# The same views for PostgreSQL: explicit GROUP BY (no GROUP BY ALL) and a
# division by a zero limit answering NULL, as it does in DuckDB.
_V2_VIEWS_POSTGRES: Final = (
    _V2_VIEWS[0].replace("GROUP BY ALL", "GROUP BY CAST(ts AS DATE), rule, severity"),
    _V2_VIEWS[1].replace("GROUP BY ALL", "GROUP BY p.id, p.name, c.status, s.name"),
    _V2_VIEWS[2]
    .replace(
        "m.daily_room / m.daily_loss_limit",
        "m.daily_room / nullif(m.daily_loss_limit, 0)",
    )
    .replace(
        "m.overall_room / m.max_loss_limit",
        "m.overall_room / nullif(m.max_loss_limit, 0)",
    ),
)

_V3_OUTBOX: Final = (
    # The outbox of the purchase flow: money movements the job worker carries out.
    # No foreign keys: DuckDB can't ALTER a table that others reference, and jobs
    # also serve demo challenges without a purchase.
    "CREATE SEQUENCE jobs_id_seq START 1",
    """
    CREATE TABLE jobs (
        id BIGINT PRIMARY KEY DEFAULT nextval('jobs_id_seq'),
        kind VARCHAR NOT NULL
            CHECK (kind IN ('fee_withdrawal', 'initial_deposit', 'refund')),
        dedupe_key VARCHAR NOT NULL UNIQUE,
        purchase_id BIGINT,
        challenge_id BIGINT,
        phase_index INTEGER,
        account_id BIGINT NOT NULL,
        amount DECIMAL(18, 2) NOT NULL CHECK (amount > 0),
        status VARCHAR NOT NULL DEFAULT 'pending'
            CHECK (status IN ('pending', 'done', 'failed', 'cancelled')),
        attempts INTEGER NOT NULL DEFAULT 0,
        last_error VARCHAR,
        applied_at TIMESTAMPTZ,
        created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
        updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
    """,
    # One row per applied job, written in the transaction that moves the money:
    # the primary key is what makes a job id impossible to apply twice.
    """
    CREATE TABLE ledger_entries (
        job_id BIGINT PRIMARY KEY,
        account_id BIGINT NOT NULL,
        amount DECIMAL(18, 2) NOT NULL,
        kind VARCHAR NOT NULL,
        purchase_id BIGINT,
        created_at TIMESTAMPTZ NOT NULL
    )
    """,
)

_V4_TICK_ARCHIVE: Final = (
    # The ticks of each committed batch, staged in the batch's own transaction
    # until the archiver moves them to ``DB.archive/ticks/`` (docs/store.md, "The
    # tick archive"). ``seq`` numbers them in commit order; no key: a replayed
    # batch never stages its ticks again (the loop drops the ticks the store's
    # position says were committed), and an index would cost the loop at tick rate.
    """
    CREATE TABLE tick_archive_staging (
        seq BIGINT NOT NULL,
        account_id BIGINT NOT NULL,
        ts TIMESTAMPTZ NOT NULL,
        equity DOUBLE,
        balance DOUBLE
    )
    """,
    # One row: the next ``seq``. It lives apart from the staged rows because the
    # archiver deletes them all.
    "CREATE TABLE tick_archive_state (next_seq BIGINT NOT NULL)",
    "INSERT INTO tick_archive_state VALUES (0)",
)

_V5_DEALS: Final = (
    # The processed ``in`` deals, kept for the hedge join (docs/store.md, "Hedge
    # flags"): a deal pairs with any deal of the table, so the partner of a deal
    # may arrive in a later batch or from another partition. ``customer_id`` is
    # the account's owner when the deal was recorded (null: never pairs).
    """
    CREATE TABLE deal_opens (
        account_id BIGINT NOT NULL,
        deal_id BIGINT NOT NULL,
        customer_id BIGINT,
        symbol VARCHAR NOT NULL,
        side VARCHAR NOT NULL CHECK (side IN ('buy', 'sell')),
        ts TIMESTAMPTZ NOT NULL,
        PRIMARY KEY (account_id, deal_id)
    )
    """,
    # One row per hedge pair, the smaller account first; written by the batch
    # that records the later of the two deals (rules.md, Cross-account hedging).
    """
    CREATE TABLE flags (
        customer_id BIGINT NOT NULL,
        symbol VARCHAR NOT NULL,
        account_id_1 BIGINT NOT NULL,
        deal_id_1 BIGINT NOT NULL,
        ts_1 TIMESTAMPTZ NOT NULL,
        side_1 VARCHAR NOT NULL,
        account_id_2 BIGINT NOT NULL,
        deal_id_2 BIGINT NOT NULL,
        ts_2 TIMESTAMPTZ NOT NULL,
        side_2 VARCHAR NOT NULL,
        gap_seconds DOUBLE NOT NULL CHECK (gap_seconds >= 0),
        CHECK (account_id_1 < account_id_2),
        PRIMARY KEY (account_id_1, deal_id_1, account_id_2, deal_id_2)
    )
    """,
    # The engine's positions in its metrics (rules.md, Positions); null in rows
    # written before deals.
    "ALTER TABLE metrics_latest ADD COLUMN open_lots DOUBLE",
    "ALTER TABLE metrics_latest ADD COLUMN open_positions INTEGER",
    "ALTER TABLE metric_history ADD COLUMN open_lots DOUBLE",
    "ALTER TABLE metric_history ADD COLUMN open_positions INTEGER",
    # A flag counts on the (UTC) day of its earlier deal.
    """
    CREATE VIEW risk_flags_by_customer_day AS
    SELECT
        customer_id,
        CAST(least(ts_1, ts_2) AT TIME ZONE 'UTC' AS DATE) AS day,
        count(*) AS flags,
        count(DISTINCT symbol) AS symbols,
        len(list_distinct(flatten(list([account_id_1, account_id_2]))))
            AS accounts,
        min(gap_seconds) AS min_gap_seconds,
        max(gap_seconds) AS max_gap_seconds
    FROM flags
    GROUP BY ALL
    """,
    # Each flag with the challenges its two accounts serve, for review.
    """
    CREATE VIEW risk_flags AS
    SELECT
        f.*,
        'warning' AS severity,
        'review' AS action,
        p1.challenge_id AS challenge_id_1,
        p1.phase_index AS phase_index_1,
        p2.challenge_id AS challenge_id_2,
        p2.phase_index AS phase_index_2
    FROM flags AS f
    LEFT JOIN challenge_phases AS p1 ON p1.account_id = f.account_id_1
    LEFT JOIN challenge_phases AS p2 ON p2.account_id = f.account_id_2
    """,
)

# Migration 5 on PostgreSQL: the tables and columns through postgres_ddl; the
# per-day view counts the distinct accounts of a day's pairs with a lateral
# unpivot (PostgreSQL has no DuckDB list functions and no GROUP BY ALL). Same
# view names, columns and column order.
_V5_DEALS_POSTGRES: Final = (
    *(postgres_ddl(s) for s in _V5_DEALS[:6]),
    """
    CREATE VIEW risk_flags_by_customer_day AS
    WITH f AS (
        SELECT *, CAST(least(ts_1, ts_2) AT TIME ZONE 'UTC' AS DATE) AS day
        FROM flags
    ),
    accounts AS (
        SELECT f.customer_id, f.day, count(DISTINCT a.account_id) AS accounts
        FROM f
        CROSS JOIN LATERAL (VALUES (f.account_id_1), (f.account_id_2))
            AS a (account_id)
        GROUP BY f.customer_id, f.day
    )
    SELECT
        f.customer_id,
        f.day,
        count(*) AS flags,
        count(DISTINCT f.symbol) AS symbols,
        accounts.accounts,
        min(f.gap_seconds) AS min_gap_seconds,
        max(f.gap_seconds) AS max_gap_seconds
    FROM f
    JOIN accounts ON accounts.customer_id = f.customer_id AND accounts.day = f.day
    GROUP BY f.customer_id, f.day, accounts.accounts
    """,
    _V5_DEALS[7]
    .replace("'warning' AS severity", "text 'warning' AS severity")
    .replace("'review' AS action", "text 'review' AS action"),
)

# Migration 7: the hedge join looks up each new deal's partners by customer,
# symbol and a time range (store/flags.py). On PostgreSQL that is an index range
# scan, so a batch costs its own deals and their pairs, not a scan of every deal
# ever recorded. DuckDB prunes deal_opens by its ts zone maps and uses no index
# for a range join (an ART index would only slow its inserts): a no-op, one
# statement for PostgreSQL's one.
_V7_DEAL_OPENS_INDEX: Final = ("SELECT 1",)
_V7_DEAL_OPENS_INDEX_POSTGRES: Final = (
    "CREATE INDEX deal_opens_customer_symbol_ts "
    "ON deal_opens (customer_id, symbol, ts)",
)

# Migration 8: the deals in the archive, and the archive's state per stream.
# ``stream`` names the evaluator (or the partition of a consumer group) whose
# sink staged a row: '' for the single evaluator, the Kafka partition key
# (``topic:N``) for a group member's partition. Each stream numbers its rows on
# from its own ``archive_streams`` row, so group members never update one shared
# row (a single ``tick_archive_state`` row serialised every member's batch
# commits on PostgreSQL); each stream's row is written only in its partition's
# fenced transactions. Staged rows have no key or index, as in migration 4.
_V8_ARCHIVE_STREAMS: Final = (
    "ALTER TABLE tick_archive_staging ADD COLUMN stream VARCHAR DEFAULT ''",
    """
    CREATE TABLE deal_archive_staging (
        stream VARCHAR DEFAULT '',
        seq BIGINT NOT NULL,
        account_id BIGINT NOT NULL,
        ts TIMESTAMPTZ NOT NULL,
        deal_id BIGINT NOT NULL,
        position_id BIGINT NOT NULL,
        symbol VARCHAR NOT NULL,
        side VARCHAR NOT NULL,
        volume DOUBLE NOT NULL,
        price DOUBLE NOT NULL,
        entry VARCHAR NOT NULL
    )
    """,
    """
    CREATE TABLE archive_streams (
        stream VARCHAR PRIMARY KEY,
        next_tick_seq BIGINT NOT NULL,
        next_deal_seq BIGINT NOT NULL
    )
    """,
    "INSERT INTO archive_streams SELECT '', next_seq, 0 FROM tick_archive_state",
    "DROP TABLE tick_archive_state",
)

#: Every migration, in order. Append only.
MIGRATIONS: Final[tuple[Migration, ...]] = (
    Migration(1, "reference data, challenges, engine outputs, stream progress", _V1),
    Migration(2, "risk_* views", _V2_VIEWS, _V2_VIEWS_POSTGRES),
    Migration(3, "outbox jobs and the ledger of applied jobs", _V3_OUTBOX),
    Migration(4, "the tick archive's staging table", _V4_TICK_ARCHIVE),
    Migration(
        5,
        "deals: deal_opens, hedge flags, open lots in metrics",
        _V5_DEALS,
        _V5_DEALS_POSTGRES,
    ),
    Migration(6, "per-partition fencing epochs and engine checkpoints", MIGRATION_6),
    Migration(
        7,
        "deal_opens index for the hedge join on PostgreSQL",
        _V7_DEAL_OPENS_INDEX,
        _V7_DEAL_OPENS_INDEX_POSTGRES,
    ),
    Migration(
        8,
        "deals in the archive; the archive's state per stream",
        _V8_ARCHIVE_STREAMS,
    ),
    Migration(
        9,
        "change feeds: metric changes by stream, challenge NOTIFY triggers",
        MIGRATION_9,
        MIGRATION_9_POSTGRES,
    ),
)

_LEDGER: Final = """
    CREATE TABLE IF NOT EXISTS schema_migrations (
        version INTEGER PRIMARY KEY,
        name VARCHAR NOT NULL,
        applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
    )
"""


#: The advisory lock key that serializes migrations on PostgreSQL.
_MIGRATION_LOCK: Final = 0x70726F70  # "prop"


def current_version(conn: Connection) -> int:
    """The highest migration applied to a database (0 for an empty one).

    Args:
        conn: An open connection.

    Returns:
        The schema version.
    """
    exists = conn.execute(
        "SELECT count(*) FROM information_schema.tables "
        "WHERE table_name = 'schema_migrations' AND table_schema = current_schema()"
    ).fetchone()
    if not exists or not exists[0]:
        return 0
    row = conn.execute("SELECT max(version) FROM schema_migrations").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def migrate(conn: Connection) -> list[int]:
    """Bring a database up to the latest schema.

    Args:
        conn: An open read-write connection, not in a transaction.

    Returns:
        The versions applied now, in order (empty when it was up to date).
    """
    with schema_lock(conn):
        return _migrate(conn)


@contextmanager
def schema_lock(conn: Connection) -> Iterator[None]:
    """Serialize schema changes between processes (PostgreSQL; DuckDB: no-op).

    Two inits at once (several processes share a PostgreSQL database): the second
    waits for the first's session-level advisory lock, then finds its versions
    applied. The lock is reentrant within a session.
    """
    if not is_postgres(conn):
        yield
        return
    conn.execute("SELECT pg_advisory_lock(?)", [_MIGRATION_LOCK])
    try:
        yield
    finally:
        conn.execute("SELECT pg_advisory_unlock(?)", [_MIGRATION_LOCK])


def _migrate(conn: Connection) -> list[int]:
    conn.execute(_LEDGER)
    done = current_version(conn)
    applied: list[int] = []
    for migration in MIGRATIONS:
        if migration.version <= done:
            continue
        with transaction(conn):
            for statement in migration.statements_for(conn):
                conn.execute(statement)
            conn.execute(
                "INSERT INTO schema_migrations (version, name) VALUES (?, ?)",
                [migration.version, migration.name],
            )
        applied.append(migration.version)
    return applied


#: The schema version this code expects.
LATEST_VERSION: Final = MIGRATIONS[-1].version
