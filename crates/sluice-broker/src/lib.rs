//! Broker semantics of Sluice.

pub mod filter;
