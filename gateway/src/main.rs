//! `fogline-gateway`: run the gateway, print its default config, inspect its store.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fogline_agent::ops::process;
use fogline_gateway::config::{self, Config, Overrides};
use fogline_gateway::store::Store;

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
    /// Inspect the store of a stopped gateway.
    #[command(subcommand)]
    Store(StoreCommand),
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file; keys it leaves out keep their defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory for the store (store.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
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

#[derive(Subcommand)]
enum StoreCommand {
    /// Print every stored reading: per (site, origin), in offset order; first the
    /// summaries of readings downsampled at the edge (lines with "kind":"summary").
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
    },
    /// Per (site, origin): watermark, stored and skipped readings, as JSON.
    Stats {
        #[arg(long)]
        data_dir: PathBuf,
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
        mqtt_listen: args.mqtt_listen,
        http_listen: args.http_listen,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    process::init_logging(&config.log);
    process::block_on(fogline_gateway::run(config, process::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

fn store(cmd: StoreCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        StoreCommand::Export {
            data_dir,
            format: ExportFormat::Jsonl,
        } => {
            let store = Store::open(&fogline_gateway::config::store_path(&data_dir), 16 << 20)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut failed = None;
            store.for_each_summary(|site, origin, span, row| {
                let mut line = row.to_json(Some(span));
                line["site"] = site.into();
                line["origin"] = origin.into();
                if let Err(e) = writeln!(out, "{line}") {
                    failed.get_or_insert(e);
                }
            })?;
            store.for_each_record(|site, origin, offset, r| {
                let line = serde_json::json!({
                    "site": site, "origin": origin, "offset": offset,
                    "device": &*r.device, "metric": &*r.metric, "boot": r.boot,
                    "seq": r.seq, "value": r.value, "ts": r.ts_ms,
                });
                if let Err(e) = writeln!(out, "{line}") {
                    failed.get_or_insert(e);
                }
            })?;
            match failed {
                Some(e) if e.kind() != std::io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            out.flush().ok();
            Ok(ExitCode::SUCCESS)
        }
        StoreCommand::Stats { data_dir } => {
            let store = Store::open(&fogline_gateway::config::store_path(&data_dir), 16 << 20)?;
            let mut origins: Vec<serde_json::Value> = store
                .origins()
                .iter()
                .map(|((site, origin), s)| {
                    serde_json::json!({"site": site, "origin": origin, "next_offset": s.next,
                        "stored": s.stored, "skipped_at_edge": s.skipped,
                        "downsampled_at_edge": s.downsampled})
                })
                .collect();
            origins.sort_by_key(|v| v.to_string());
            let json = serde_json::to_string_pretty(&serde_json::json!({ "origins": origins }))?;
            process::print(&format!("{json}\n"))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
