"""Errors of the sinks."""

from __future__ import annotations

from prop_stream.exceptions import PropStreamError


class SinkError(PropStreamError):
    """A sink could not write a batch; nothing of it was committed."""


__all__ = ["SinkError"]
