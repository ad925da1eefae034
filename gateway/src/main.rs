//! `fogline-gateway`: run the gateway, print its default config, inspect its store.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fogline_agent::ops::process;
use fogline_gateway::config::{self, Config, Overrides};
use fogline_gateway::store::Store;
use fogline_gateway::{export, pg};

#[derive(Parser)]
#[command(
    name = "fogline-gateway",
    version,
    about = "fogline gateway: receives site uplinks, \
    stores every reading once and in order, acks durably, and republishes aggregates for dashboards"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway (no config file needed: built-in defaults apply).
    Run(RunArgs),
    /// Show or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the store: the embedded one of a stopped gateway, or PostgreSQL's at any
    /// time; move an embedded store into PostgreSQL.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file; keys it leaves out keep their defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory for the store and MQTT sessions (store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// The store in PostgreSQL, postgres://USER@HOST:PORT/DB (store.url); without it the
    /// embedded store in the data directory.
    #[arg(long, value_name = "URL")]
    store: Option<String>,
    /// MQTT listen address for agents and dashboards (mqtt.listen).
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// HTTP address for /healthz, /metrics and /status (http.listen).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the complete default config, with comments.
    Defaults,
    /// Load a config (file, environment), validate it and print the result as JSON.
    Check {
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Copy, Clone, ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
}

/// Which store a `store` command reads.
#[derive(clap::Args)]
#[group(required = true, multiple = false)]
struct Which {
    /// The embedded store's directory (store.data_dir) of a stopped gateway.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// A PostgreSQL store, postgres://USER@HOST:PORT/DB (gateways may be running on it).
    #[arg(long, value_name = "URL")]
    store: Option<String>,
}

#[derive(Subcommand)]
enum StoreCommand {
    /// Print every stored reading: per (site, origin), in offset order; first the
    /// summaries of readings downsampled at the edge (lines with "kind":"summary").
    Export {
        #[command(flatten)]
        which: Which,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
    /// Per (site, origin): watermark, stored and skipped readings, as JSON.
    Stats {
        #[command(flatten)]
        which: Which,
    },
    /// Copy an embedded store (of a stopped gateway) into PostgreSQL: every origin's log
    /// in offset order, the summaries and the aggregates; offsets already there are not
    /// copied again, so it can be re-run. Prints the counts on both sides.
    Migrate {
        /// The embedded store's directory.
        #[arg(long, value_name = "DIR")]
        from: PathBuf,
        /// postgres://USER@HOST:PORT/DB
        #[arg(long, value_name = "URL")]
        to: String,
    },
}

fn main() -> ExitCode {
    let result = match Cli::parse().command {
        Command::Run(args) => run(args),
        Command::Config(ConfigCommand::Defaults) => process::print(config::DEFAULTS)
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        Command::Config(ConfigCommand::Check { config }) => {
            Config::load(config.as_deref(), &Overrides::default())
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok(serde_json::to_string_pretty(&c)?))
                .and_then(|json| {
                    process::print(&format!("{json}\n"))?;
                    Ok(ExitCode::SUCCESS)
                })
        }
        Command::Store(cmd) => store(cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fogline-gateway: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let overrides = Overrides {
        data_dir: args.data_dir,
        store_url: args.store,
        mqtt_listen: args.mqtt_listen,
        http_listen: args.http_listen,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    process::init_logging(&config.log);
    process::block_on(fogline_gateway::run(config, process::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn open_embedded(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    Ok(Store::open(
        &fogline_gateway::config::store_path(data_dir),
        16 << 20,
    )?)
}

fn store(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Export {
            which,
            format: ExportFormat::Jsonl,
        } => {
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            match (which.store, which.data_dir) {
                (Some(url), _) => pg::export(&url, &mut out)?,
                (None, Some(dir)) => export_embedded(&open_embedded(&dir)?, &mut out)?,
                (None, None) => anyhow::bail!("--data-dir or --store"),
            }
            match out.flush() {
                Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Stats { which } => {
            let stats = match (which.store, which.data_dir) {
                (Some(url), _) => {
                    let origins = pg::stats(&url)?;
                    export::stats(origins.iter().map(|(k, s)| (k, s)))
                }
                (None, Some(dir)) => export::stats(open_embedded(&dir)?.origins()),
                (None, None) => anyhow::bail!("--data-dir or --store"),
            };
            let json = serde_json::to_string_pretty(&stats)?;
            process::print(&format!("{json}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Migrate { from, to } => {
            let from_store = open_embedded(&from)?;
            let report = pg::migrate(&from_store, &to)?;
            let json = serde_json::to_string_pretty(&report)?;
            process::print(&format!("{json}\n"))?;
            Ok(if report.complete() {
                ExitCode::SUCCESS
            } else {
                eprintln!("fogline-gateway: the counts differ: see above");
                ExitCode::FAILURE
            })
        }
    }
}

/// Every summary, then every reading, of an embedded store.
fn export_embedded(store: &Store, out: &mut impl Write) -> anyhow::Result<()> {
    let mut failed = None;
    store.for_each_summary(|site, origin, span, row| {
        if let Err(e) = writeln!(out, "{}", export::summary_line(site, origin, span, &row)) {
            failed.get_or_insert(e);
        }
    })?;
    store.for_each_record(|site, origin, offset, r| {
        if let Err(e) = writeln!(out, "{}", export::record_line(site, origin, offset, &r)) {
            failed.get_or_insert(e);
        }
    })?;
    match failed {
        Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(e.into()),
        _ => Ok(()),
    }
}
