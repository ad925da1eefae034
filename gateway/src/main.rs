//! `fogline-gateway`: the cloud-side receiver of site uplinks.
//!
//! A skeleton for now: the gateway and the agents' store-and-forward uplink are built
//! by the gateway/uplink work. Its command line already follows the agent's shape so
//! scripts and packages can rely on it.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "fogline-gateway", version, about = "fogline gateway: receives site uplinks, \
    deduplicates, stores, and republishes aggregates for dashboards (not implemented yet)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (not implemented yet).
    Run,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Run => {
            eprintln!(
                "fogline-gateway: not implemented yet; it lands with the gateway/uplink work"
            );
            ExitCode::FAILURE
        }
    }
}
