//! `fogline-agent`: run the agent, print its default config, inspect a data directory.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use fogline_agent::buffer::Inspect;
use fogline_agent::ops::config::{self, Config, Overrides};
use fogline_agent::ops::process;

#[derive(Parser)]
#[command(
    name = "fogline-agent",
    version,
    about = "fogline edge agent: an embedded MQTT broker \
    for sensors, a durable buffer that never loses an acknowledged reading, and live aggregates"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (no config file needed: built-in defaults apply).
    Run(RunArgs),
    /// Show or check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Inspect the buffer of a stopped agent.
    #[command(subcommand)]
    Buffer(BufferCommand),
    /// Create a site CA and node certificates for TLS node links.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Device credentials for `auth.devices`.
    #[command(subcommand)]
    Auth(AuthCommand),
}

#[derive(Subcommand)]
enum CertsCommand {
    /// Create a site CA: DIR/ca.pem and DIR/ca.key (mode 0600). Keep ca.key off the nodes.
    Init {
        /// Directory to write into (created if missing; existing files are never overwritten).
        #[arg(long)]
        out: PathBuf,
        /// A name for the CA's common name, e.g. the site id.
        #[arg(long, default_value = "site")]
        name: String,
        /// Bind the CA to this site: the gateway then takes the node certificates it
        /// signs for this site only. Leave out for a fleet CA (nodes name their site).
        #[arg(long)]
        site: Option<String>,
    },
    /// Create a node certificate signed by the site CA: OUT/ID.pem and OUT/ID.key (0600).
    /// Usable as server and client certificate by agents and the gateway.
    Node {
        /// Directory holding ca.pem and ca.key.
        #[arg(long)]
        ca: PathBuf,
        /// The node id (also the certificate's common name and first DNS name).
        #[arg(long)]
        node_id: String,
        /// Extra names or IP addresses others use to reach this node (repeatable), e.g.
        /// --host gw.example.net --host 127.0.0.1.
        #[arg(long)]
        host: Vec<String>,
        /// Directory to write into.
        #[arg(long)]
        out: PathBuf,
        /// The node's site, named in the certificate: the gateway takes this node's
        /// uplink for this site only (and refuses a node certificate without a site).
        #[arg(long)]
        site: Option<String>,
    },
}

#[derive(Subcommand)]
enum AuthCommand {
    /// Read a password from standard input (one line; the newline is dropped) and print
    /// its argon2 hash for `auth.devices.<id>`.
    Hash,
}

#[derive(clap::Args)]
struct RunArgs {
    /// TOML config file; keys it leaves out keep their defaults.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Directory for the buffer (buffer.data_dir).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// MQTT 3.1.1 listen address for sensors (mqtt.listen).
    #[arg(long)]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT 5 listen address (mqtt.listen_v5); "" turns it off.
    #[arg(long)]
    mqtt_listen_v5: Option<String>,
    /// HTTP address for /healthz, /metrics and /status (http.listen).
    #[arg(long)]
    http_listen: Option<SocketAddr>,
    /// This agent's id (node.id).
    #[arg(long)]
    node_id: Option<String>,
    /// The site this agent belongs to (node.site).
    #[arg(long)]
    site: Option<String>,
    /// The gateway's MQTT address HOST:PORT for the uplink (uplink.gateway); several,
    /// comma-separated, are tried in order and failed over between.
    #[arg(long)]
    gateway: Option<config::Gateways>,
    /// The other agents of the site (cluster.peers): ID=HOST:PORT,… of their MQTT listeners.
    #[arg(long, value_delimiter = ',')]
    peers: Option<Vec<String>>,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print the complete default config, with comments.
    Defaults,
    /// Load a config (file, environment), validate it and print the result as JSON.
    Check {
        /// TOML config file.
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
}

#[derive(Copy, Clone, ValueEnum)]
enum ExportFormat {
    /// One JSON object per line.
    Jsonl,
    /// CSV with a header line.
    Csv,
}

#[derive(Subcommand)]
enum BufferCommand {
    /// Counts, sizes and offsets, as one JSON object.
    Stats {
        #[arg(long)]
        data_dir: PathBuf,
    },
    /// Print every buffered raw reading, oldest first; with JSON lines also the summaries
    /// of downsampled readings (lines with "kind":"summary", before the readings).
    Export {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long, value_enum, default_value = "jsonl")]
        format: ExportFormat,
        /// Only the summaries of downsampled readings (CSV: their own columns).
        #[arg(long)]
        summaries: bool,
    },
    /// Check that every table decodes and the counters agree; exit 1 if not.
    Check {
        #[arg(long)]
        data_dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
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
        Command::Buffer(cmd) => buffer(cmd),
        Command::Certs(cmd) => certs(cmd),
        Command::Auth(AuthCommand::Hash) => auth_hash(),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("fogline-agent: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    limit_malloc_arenas();
    let overrides = Overrides {
        data_dir: args.data_dir,
        mqtt_listen: args.mqtt_listen,
        mqtt_listen_v5: args.mqtt_listen_v5,
        http_listen: args.http_listen,
        node_id: args.node_id,
        site: args.site,
        gateway: args.gateway,
        peers: args.peers,
    };
    let config = Config::load(args.config.as_deref(), &overrides)?;
    process::init_logging(&config.log);
    process::block_on(fogline_agent::run(config, process::shutdown_signal()))?;
    Ok(ExitCode::SUCCESS)
}

/// glibc gives threads that allocate at the same time arenas of their own (up to eight
/// per core), and memory freed into one arena is not reused by threads on another. The
/// agent's connections hop between tokio's workers, so every arena ended up holding slack
/// of its own. One arena kept the agent's RSS 1.5–2 MiB lower at 1,000 publishers at full
/// speed (BENCHMARKS.md), with no throughput lost there: small allocations are served
/// from glibc's per-thread caches without taking the arena's lock. `MALLOC_ARENA_MAX` in
/// the environment still wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn limit_malloc_arenas() {
    if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
        // SAFETY: mallopt only changes an allocator setting; no other thread exists yet.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, 1);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn limit_malloc_arenas() {}

fn certs(cmd: CertsCommand) -> anyhow::Result<ExitCode> {
    let written = match cmd {
        CertsCommand::Init { out, name, site } => {
            fogline_agent::security::certs::init(&out, &name, site.as_deref())?
        }
        CertsCommand::Node {
            ca,
            node_id,
            host,
            out,
            site,
        } => fogline_agent::security::certs::node(&ca, &node_id, &host, &out, site.as_deref())?,
    };
    process::print(&format!(
        "wrote {} and {} (mode 0600)\n",
        written.cert.display(),
        written.key.display()
    ))?;
    Ok(ExitCode::SUCCESS)
}

fn auth_hash() -> anyhow::Result<ExitCode> {
    let mut line = String::new();
    std::io::stdin().read_line(&mut line)?;
    let password = line.strip_suffix('\n').unwrap_or(&line);
    let password = password.strip_suffix('\r').unwrap_or(password);
    if password.is_empty() {
        anyhow::bail!("no password on standard input");
    }
    let hash = fogline_agent::security::auth::hash_password(password.as_bytes())
        .map_err(anyhow::Error::msg)?;
    process::print(&format!("{hash}\n"))?;
    Ok(ExitCode::SUCCESS)
}

fn buffer(cmd: BufferCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        BufferCommand::Stats { data_dir } => {
            let inspect = Inspect::open(&data_dir)?;
            let meta = inspect.meta()?;
            let stats = serde_json::json!({
                "path": config::buffer_path(&data_dir),
                "file_bytes": inspect.file_bytes(),
                "bytes": meta.total_bytes(),
                "raw_bytes": meta.raw_bytes,
                "readings": meta.raw_readings,
                "rollups": meta.rollup_rows,
                "rollup_bytes": meta.rollup_bytes,
                "first_offset": inspect.first_offset()?,
                "log_first_offset": inspect.first_offsets()?.0,
                "next_offset": meta.next_offset,
                "devices": inspect.devices()?,
                "downsampled": meta.downsampled,
                "dropped": meta.dropped,
                "bytes_per_reading": if meta.raw_readings > 0 {
                    serde_json::json!(meta.raw_bytes as f64 / meta.raw_readings as f64)
                } else {
                    serde_json::Value::Null
                },
            });
            process::print(&format!("{}\n", serde_json::to_string_pretty(&stats)?))?;
            Ok(ExitCode::SUCCESS)
        }
        BufferCommand::Export {
            data_dir,
            format,
            summaries,
        } => {
            let inspect = Inspect::open(&data_dir)?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let mut write_err = None;
            let csv = matches!(format, ExportFormat::Csv);
            if csv && summaries {
                writeln!(
                    out,
                    "from_offset,to_offset,device,metric,start_ms,window_secs,count,min,max,mean,last,last_ts"
                )?;
            } else if csv {
                writeln!(out, "offset,device,metric,boot,seq,value,ts")?;
            }
            if summaries || !csv {
                inspect.for_each_summary(|span, row| {
                    let line = if csv {
                        let (from, to) = span.map_or((String::new(), String::new()), |(a, b)| {
                            (a.to_string(), b.to_string())
                        });
                        let s = &row.summary;
                        format!(
                            "{from},{to},{},{},{},{},{},{},{},{},{},{}",
                            row.device,
                            row.metric,
                            row.start_ms,
                            row.len_secs,
                            s.count,
                            s.min,
                            s.max,
                            s.mean(),
                            s.last,
                            s.last_ts_ms
                        )
                    } else {
                        row.to_json(span).to_string()
                    };
                    if let Err(e) = writeln!(out, "{line}") {
                        write_err.get_or_insert(e);
                    }
                    Ok(())
                })?;
            }
            if !summaries {
                inspect.for_each_record(|offset, r| {
                    let line = match format {
                        ExportFormat::Jsonl => serde_json::json!({
                            "offset": offset,
                            "device": &*r.device,
                            "metric": &*r.metric,
                            "boot": r.boot,
                            "seq": r.seq,
                            "value": r.value,
                            "ts": r.ts_ms,
                        })
                        .to_string(),
                        ExportFormat::Csv => format!(
                            "{offset},{},{},{},{},{},{}",
                            r.device,
                            r.metric,
                            r.boot,
                            r.seq.map(|s| s.to_string()).unwrap_or_default(),
                            r.value,
                            r.ts_ms
                        ),
                    };
                    if let Err(e) = writeln!(out, "{line}") {
                        write_err.get_or_insert(e);
                    }
                    Ok(())
                })?;
            }
            if let Some(e) = write_err {
                // A closed pipe (`| head`) is not an error worth a message.
                if e.kind() != std::io::ErrorKind::BrokenPipe {
                    return Err(e.into());
                }
            }
            out.flush().ok();
            Ok(ExitCode::SUCCESS)
        }
        BufferCommand::Check { data_dir } => {
            let mut inspect = Inspect::open(&data_dir)?;
            let problems = inspect.check()?;
            if problems.is_empty() {
                process::print("ok\n")?;
                Ok(ExitCode::SUCCESS)
            } else {
                for p in &problems {
                    process::print(&format!("problem: {p}\n"))?;
                }
                Ok(ExitCode::FAILURE)
            }
        }
    }
}
