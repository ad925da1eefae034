//! Running the agent: its configuration ([`config`]), the HTTP surface ([`http`]),
//! metrics ([`metrics`]) and the process around it ([`process`]).

pub mod config;
pub mod http;
pub mod metrics;
pub mod process;
