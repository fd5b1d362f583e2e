"""Helpers for the tests that run kafka-python clients against absent brokers."""

from __future__ import annotations

import gc
import socket
import warnings


def close_failed_connects() -> None:
    """Close the sockets kafka-python leaves behind after failed connects.

    While no broker answers, every connection attempt leaves an unconnected
    socket in a reference cycle, unclosed; the ResourceWarning would otherwise
    fail whichever later test happens to run the garbage collector.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
        for obj in gc.get_objects():
            if not isinstance(obj, socket.socket) or obj.fileno() < 0:
                continue
            try:
                obj.getpeername()
                continue  # connected: someone's live socket
            except OSError:
                pass
            if obj.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                continue  # a server's listening socket
            obj.close()
