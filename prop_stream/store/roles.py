"""PostgreSQL: the risk team's read-only role (``prop-stream init``).

The role ``prop_stream_risk`` may connect to the database and ``SELECT`` from the
``risk_*`` views, nothing else: no table, no sequence, no function of the
service's (a view runs with its owner's rights, so the role needs no grant on the
tables behind it). Roles belong to the whole server; the grants to one database.

Login: the role is created ``NOLOGIN`` (a group) unless
``PROP_STREAM_RISK_PASSWORD`` is set when ``init`` runs, which makes it a login
role with that password (set again at every ``init``, so it also rotates it). A
team with its own accounts grants them the group: ``GRANT prop_stream_risk TO
alice``. Creating a role needs ``CREATEROLE`` (``scripts/pg-local``'s role has
it); without it ``init`` migrates, skips the role and says so.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Final

import psycopg
from psycopg import sql

from prop_stream.store.pg import PgConnection

#: The risk team's read-only role.
RISK_ROLE: Final = "prop_stream_risk"
#: The environment variable holding its password (makes it a login role).
RISK_PASSWORD_ENV: Final = "PROP_STREAM_RISK_PASSWORD"  # noqa: S105 - a variable's name

logger = logging.getLogger(__name__)


def grant_risk_role(conn: PgConnection, *, role: str = RISK_ROLE) -> str | None:
    """Create the read-only role if missing and grant it every ``risk_*`` view.

    Args:
        conn: A session of the database's owner, not in a transaction.
        role: The role's name.

    Returns:
        The role's name, or None when this login may not create roles.
    """
    raw = conn.raw
    password = os.environ.get(RISK_PASSWORD_ENV)
    exists = raw.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", [role]).fetchone()
    try:
        if exists is None:
            # Another database's init on this server may create it at once.
            with contextlib.suppress(psycopg.errors.DuplicateObject):
                raw.execute(
                    sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role))
                )
        if password:
            raw.execute(
                sql.SQL("ALTER ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(password)
                )
            )
    except psycopg.errors.InsufficientPrivilege as exc:
        logger.warning("init: can't create or alter the role %s: %s", role, exc)
        return None
    views = [
        r[0]
        for r in raw.execute(
            "SELECT table_name FROM information_schema.views "
            "WHERE table_schema = current_schema() AND table_name LIKE 'risk\\_%%' "
            "ORDER BY table_name"
        ).fetchall()
    ]
    ident = sql.Identifier(role)
    with raw.transaction():
        raw.execute(
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
                sql.Identifier(str(raw.info.dbname)), ident
            )
        )
        raw.execute(
            sql.SQL("GRANT USAGE ON SCHEMA {} TO {}").format(
                sql.Identifier(_schema(conn)), ident
            )
        )
        for view in views:
            raw.execute(
                sql.SQL("GRANT SELECT ON {} TO {}").format(sql.Identifier(view), ident)
            )
    return role


def _schema(conn: PgConnection) -> str:
    row = conn.raw.execute("SELECT current_schema()").fetchone()
    return str(row[0]) if row else "public"
