//! Shared vocabulary of Sluice: names, clocks and human units.
//!
//! *Architecture invariant*: this crate does no I/O and depends on nothing but `thiserror`,
//! so every other crate may use it.

pub mod clock;
pub mod metrics;
pub mod names;
pub mod units;

pub use clock::{Clock, ManualClock, SystemClock};
pub use names::{NameError, validate_resource_name};
pub use units::{UnitError, format_bytes, parse_bytes, parse_duration};
