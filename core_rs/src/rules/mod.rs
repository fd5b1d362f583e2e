//! The engine: plain Rust types, no Python.

pub mod baseline;
pub mod calendar;
pub mod config;
pub mod deals;
pub mod engine;
pub mod input;
pub mod order;
pub mod output;
