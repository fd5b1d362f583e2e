"""``--db``: a DuckDB file or a PostgreSQL URL, told apart without heavy imports.

The command line parses ``--db`` before it knows which command runs, so these
helpers import nothing but the standard library (``prop-stream backtest`` must
not pay for pydantic, psycopg or DuckDB at start-up).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Final

#: URL schemes that name a PostgreSQL database (else ``--db`` is a DuckDB file).
URL_PREFIXES: Final = ("postgresql://", "postgres://")


def is_url(db: object) -> bool:
    """Whether ``--db`` names a PostgreSQL database (else a DuckDB file)."""
    return isinstance(db, str) and db.startswith(URL_PREFIXES)


def parse_db(value: object) -> Path | str:
    """``--db`` as given: a ``postgresql://`` URL stays a string, else a path.

    Args:
        value: A path or a URL (``str`` or :class:`~pathlib.Path`).

    Returns:
        The URL, or the DuckDB file's path.

    Raises:
        TypeError: Neither a string nor a path.
    """
    if is_url(value):
        assert isinstance(value, str)  # noqa: S101 - is_url checked it
        return value
    if isinstance(value, str | Path):
        return Path(value)
    raise TypeError(f"a DuckDB path or a postgresql:// URL, not {value!r}")


def redact(url: str) -> str:
    """A URL without its password, for messages and logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)
