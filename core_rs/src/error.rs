//! Define the engine's single error type.

use std::fmt;

/// Everything that can go wrong in the engine. A rule breach is not an error: it is
/// data in the engine's output.
#[derive(Debug, Clone, PartialEq)]
pub enum RuleError {
    /// A rule set is invalid: `field` names the rule, `message` says why.
    InvalidRule {
        /// The rule name, as in `rules.md`.
        field: String,
        /// What is wrong with its value.
        message: String,
    },
    /// A phase is already registered for this account.
    DuplicateAccount(i64),
    /// A tick batch does not have the engine's schema.
    BadBatch(String),
    /// Snapshot bytes could not be read.
    BadSnapshot(String),
}

/// The engine's result alias.
pub type RuleResult<T> = Result<T, RuleError>;

impl RuleError {
    /// An invalid-rule error for `field`.
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Self::InvalidRule {
            field: field.to_owned(),
            message: message.into(),
        }
    }
}

impl fmt::Display for RuleError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::InvalidRule { field, message } => write!(f, "{field}: {message}"),
            Self::DuplicateAccount(id) => {
                write!(f, "account_id: account {id} already has a registered phase")
            }
            Self::BadBatch(msg) => write!(f, "bad tick batch: {msg}"),
            Self::BadSnapshot(msg) => write!(f, "bad snapshot: {msg}"),
        }
    }
}

impl std::error::Error for RuleError {}
