//! The parts of `unidesk-faults`, the fault harness: processes it kills
//! and starts again, network namespaces it cuts, simulated agents, and the
//! audit of the log once the platform is quiet.

pub mod audit;
pub mod netns;
pub mod process;
pub mod sim;
