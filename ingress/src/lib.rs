//! The agent ingress (being written).
