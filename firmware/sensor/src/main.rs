//! `fogline-sensor`: run fogline's sensor node loop on a host — a simulated fleet (also the
//! load generator for benchmarks), or a real I2C sensor on a Linux board.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use fogline_sensor::provision::{self, ProvisionArgs};
use fogline_sensor::read::{self, ReadArgs};
use fogline_sensor::simulate::{self, SimulateArgs};
use tokio::sync::watch;

/// Exit status when a run ended with readings the agent never acked.
const EXIT_NOT_ALL_ACKED: u8 = 3;

#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    /// Log filter (tracing syntax), e.g. "info" or "debug,rumqttc=warn"; RUST_LOG also works.
    #[arg(
        long,
        global = true,
        env = "FOGLINE_SENSOR_LOG",
        default_value = "info,rumqttc=warn"
    )]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a fleet of sensors publishing to an agent, and report what got delivered.
    ///
    /// Each device runs the firmware's node loop: sequence numbers, a ring of unacked
    /// readings, re-send after reconnect. Exits 0 when every reading the devices kept was
    /// acked by the agent, 3 when some were not (see --drain-timeout), 1 on errors.
    Simulate(SimulateArgs),
    /// Read a real SHT3x, SHT4x or BME280 on a Linux I2C bus and publish it to an agent.
    ///
    /// Runs until Ctrl-C or SIGTERM, then waits up to --drain-timeout for the last
    /// readings to be acked. With --once, prints one reading as JSON and exits.
    Read(ReadArgs),
    /// Write a Raspberry Pi Pico W sensor's configuration (Wi-Fi, agent, device id,
    /// sensor) as a UF2 file to copy onto the Pico's USB drive, or a .bin for a probe.
    ///
    /// The image is the same for every sensor; this block, in the last flash sector, is
    /// what makes it yours. See firmware/README.md, "Pico W in ten minutes".
    Provision(ProvisionArgs),
}

/// Counts stop requests (Ctrl-C, SIGTERM) so that the first can drain and the second stop.
fn stop_signals() -> watch::Receiver<u32> {
    let (tx, rx) = watch::channel(0u32);
    tokio::spawn(async move {
        #[cfg(unix)]
        let mut term =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
        loop {
            #[cfg(unix)]
            let term_recv = async {
                match term.as_mut() {
                    Some(t) => {
                        t.recv().await;
                    }
                    None => std::future::pending().await,
                }
            };
            #[cfg(not(unix))]
            let term_recv = std::future::pending::<()>();
            tokio::select! {
                r = tokio::signal::ctrl_c() => {
                    if r.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
                () = term_recv => {}
            }
            tx.send_modify(|n| *n += 1);
        }
    });
    rx
}

/// A function whose future resolves at the next stop request.
fn next_stop(
    rx: watch::Receiver<u32>,
) -> impl FnMut() -> std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>> {
    move || {
        let mut rx = rx.clone();
        Box::pin(async move {
            rx.borrow_and_update();
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let stops = stop_signals();
    match cli.command {
        Command::Simulate(args) => {
            let summary = simulate::simulate(args, next_stop(stops)).await?;
            print!("{}", simulate::render_summary(&summary));
            Ok(if summary.all_acked {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_ALL_ACKED)
            })
        }
        Command::Provision(args) => {
            print!("{}", provision::provision(&args)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Read(args) => {
            let finished = read::read(args, next_stop(stops)).await?;
            Ok(if finished {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_NOT_ALL_ACKED)
            })
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = std::env::var("RUST_LOG").unwrap_or_else(|_| cli.log.clone());
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .init();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fogline-sensor")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    };
    // Connection tasks may still be waiting on sockets; do not wait for them.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    code
}
