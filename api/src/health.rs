//! The figures `/readyz` reports about the platform as a whole, measured on
//! demand and shared for a moment with `/metrics` (the process's
//! [`telemetry::Metrics`] holds them), so that probes and scrapes arriving
//! together cost the database one measurement and never disagree.

pub use telemetry::health::{HealthChecks, FRESH_FOR};
