"""The operator's way into a running service: an admin route with a private token.

DuckDB lets one process hold a database file; while ``serve`` holds it,
``prop-stream session`` and ``prop-stream export`` can't open it. They ask the
service instead, over its own HTTP server:

- at start, ``serve`` writes ``PATH.admin.json`` beside the database (mode 0600,
  so only the file's owner — the operator account that runs the service — can
  read it) with the loopback URL of its HTTP server, a fresh random token and
  its pid, and deletes the file when it stops;
- the commands read the file and ``POST`` to ``/admin/session`` or
  ``/admin/export`` with ``Authorization: Bearer <token>``; the routes answer
  only that token, and only to clients on the same machine;
- with no file (or a file whose service no longer answers), the commands open
  the database themselves.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from prop_stream.exceptions import PropStreamError

#: How long a command waits for the service's answer by default (an export of a
#: large history takes a while).
DEFAULT_TIMEOUT_S: Final = 600.0


class AdminError(PropStreamError):
    """The running service refused an admin request or could not be reached."""


class ServiceGoneError(AdminError):
    """The admin file names a service that does not answer (a stale file)."""


@dataclass(frozen=True, slots=True)
class AdminEndpoint:
    """Where a running service takes admin requests.

    Attributes:
        url: The service's base URL on a loopback (or its own) address.
        token: The bearer token its admin routes accept.
        pid: The service's process id.
    """

    url: str
    token: str
    pid: int


def admin_file(db_path: str | Path) -> Path:
    """The file beside a database that names its running service."""
    return Path(f"{Path(db_path).resolve()}.admin.json")


def new_token() -> str:
    """A fresh admin token (256 random bits, URL-safe)."""
    return secrets.token_urlsafe(32)


def publish(db_path: str | Path, endpoint: AdminEndpoint) -> Path:
    """Write the admin file (mode 0600, atomically) for a starting service.

    Args:
        db_path: The database the service holds.
        endpoint: Its URL, token and pid.

    Returns:
        The file written.
    """
    path = admin_file(db_path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump(
            {"url": endpoint.url, "token": endpoint.token, "pid": endpoint.pid}, out
        )
    tmp.replace(path)
    return path


def withdraw(db_path: str | Path, endpoint: AdminEndpoint) -> None:
    """Delete the admin file at a service's stop, if it is still this service's."""
    path = admin_file(db_path)
    current = read_endpoint(db_path)
    if current is not None and current.token == endpoint.token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def read_endpoint(db_path: str | Path) -> AdminEndpoint | None:
    """The running service's endpoint from the admin file, or None without one.

    Raises:
        AdminError: The file exists but can't be read (e.g. another user's).
    """
    path = admin_file(db_path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except PermissionError as exc:
        raise AdminError(
            f"{path} is not readable by this user: run the command as the "
            "service's user"
        ) from exc
    except (OSError, ValueError) as exc:
        raise AdminError(f"{path} can't be read: {exc}") from exc
    try:
        return AdminEndpoint(str(data["url"]), str(data["token"]), int(data["pid"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise AdminError(f"{path} is not an admin file: {exc}") from exc


def call(
    endpoint: AdminEndpoint,
    action: str,
    payload: dict[str, Any],
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> dict[str, Any]:
    """``POST /admin/<action>`` on the running service and return its JSON answer.

    Args:
        endpoint: The service's endpoint.
        action: ``session`` or ``export``.
        payload: The request body.
        timeout_s: How long to wait for the answer.

    Returns:
        The answer's JSON object.

    Raises:
        ServiceGoneError: Nothing answers at the endpoint's URL.
        AdminError: The service answered with an error (its message).
    """
    request = urllib.request.Request(  # noqa: S310 - the URL is our own service's, http only
        f"{endpoint.url}/admin/{action}",
        data=json.dumps(payload).encode(),
        method="POST",
        headers={
            "Authorization": f"Bearer {endpoint.token}",
            "Content-Type": "application/json",
        },
    )
    if not request.full_url.startswith(("http://", "https://")):
        raise AdminError(f"bad admin URL {endpoint.url!r}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 - scheme checked above
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as exc:
        raise AdminError(_error_message(exc)) from exc
    except (urllib.error.URLError, ConnectionError) as exc:
        raise ServiceGoneError(
            f"the service at {endpoint.url} (pid {endpoint.pid}) does not answer: "
            f"{getattr(exc, 'reason', exc)}"
        ) from exc


def _error_message(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read())
        return str(body["error"]["message"])
    except Exception:  # any unreadable body: the status says enough
        return f"the service answered {exc.code} {exc.reason}"
