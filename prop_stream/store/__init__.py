"""The service's DuckDB store: schema, reference data, challenges, progress.

Store functions take a connection and keyword-only arguments and run in the
caller's transaction (:func:`transaction`); ``docs/store.md`` documents every table
and view.
"""

from prop_stream.store.catalog import (
    EVALUATION,
    FUNDED,
    ProgramIn,
    ProgramPhaseIn,
    account_ids,
    create_account_group,
    create_customer,
    create_program,
    customer_id_by_email,
    open_account,
    validate_program,
)
from prop_stream.store.db import (
    Connection,
    connect,
    cursor,
    query_frame,
    run_in_transaction,
    transaction,
)
from prop_stream.store.exceptions import (
    DatabaseLockedError,
    InvalidProgramError,
    NotFoundError,
    StoreError,
)
from prop_stream.store.init import InitResult, init_database
from prop_stream.store.lifecycle import (
    CHALLENGE_ACTIVE,
    CHALLENGE_CANCELLED,
    CHALLENGE_FAILED,
    CHALLENGE_PASSED,
    CHALLENGE_PENDING,
    CHALLENGE_STATUS_NAMES,
    PhaseAdvance,
    PhaseRegistry,
    active_phase_specs,
    advance_phase,
    apply_transition,
    apply_transitions,
    cancel_challenge,
    fail_phase,
    open_phase,
    phase_spec,
    phase_spec_by_account,
    phase_specs_of,
    start_challenge,
)
from prop_stream.store.migrations import LATEST_VERSION, MIGRATIONS, migrate
from prop_stream.store.progress import (
    EngineCheckpoint,
    Position,
    latest_checkpoint,
    load_position,
)
from prop_stream.store.purchases import (
    PURCHASE_STATUS_NAMES,
    Bought,
    PurchaseError,
    PurchaseRecord,
)
from prop_stream.store.sessions import create_session, hash_token, session_customer

__all__ = [
    "CHALLENGE_ACTIVE",
    "CHALLENGE_CANCELLED",
    "CHALLENGE_FAILED",
    "CHALLENGE_PASSED",
    "CHALLENGE_PENDING",
    "CHALLENGE_STATUS_NAMES",
    "EVALUATION",
    "FUNDED",
    "LATEST_VERSION",
    "MIGRATIONS",
    "PURCHASE_STATUS_NAMES",
    "Bought",
    "Connection",
    "DatabaseLockedError",
    "EngineCheckpoint",
    "InitResult",
    "InvalidProgramError",
    "NotFoundError",
    "PhaseAdvance",
    "PhaseRegistry",
    "Position",
    "ProgramIn",
    "ProgramPhaseIn",
    "PurchaseError",
    "PurchaseRecord",
    "StoreError",
    "account_ids",
    "active_phase_specs",
    "advance_phase",
    "apply_transition",
    "apply_transitions",
    "cancel_challenge",
    "connect",
    "create_account_group",
    "create_customer",
    "create_program",
    "create_session",
    "cursor",
    "customer_id_by_email",
    "fail_phase",
    "hash_token",
    "init_database",
    "latest_checkpoint",
    "load_position",
    "migrate",
    "open_account",
    "open_phase",
    "phase_spec",
    "phase_spec_by_account",
    "phase_specs_of",
    "query_frame",
    "run_in_transaction",
    "session_customer",
    "start_challenge",
    "transaction",
    "validate_program",
]
