"""The purchase's error: a purchase, retry or cancel that can't be done."""

from __future__ import annotations

from typing import Any

from prop_stream.store.exceptions import StoreError


class PurchaseError(StoreError):
    """A purchase, retry or cancel that can't be done.

    Attributes:
        code: Stable code: ``payer_not_eligible``, ``program_not_available``,
            ``program_invalid``, ``idempotency_mismatch``, ``idempotency_in_flight``,
            ``not_retryable``, ``not_cancellable``.
        field: The request field at fault, if one is.
        conflict: True for a state conflict (409), False for bad input (400).
        details: Extra data (e.g. the payer's ``reason``).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        field: str | None = None,
        conflict: bool = False,
        details: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.field = field
        self.conflict = conflict
        self.details = dict(details or {})


__all__ = ["PurchaseError"]
