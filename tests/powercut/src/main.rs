//! `fogline-powercut mount DIR`: serves a power-cut filesystem at DIR, controlled by
//! commands on standard input (see the library docs).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use fogline_powercut::{CutMode, Image, Mounted};

#[derive(Parser)]
#[command(
    name = "fogline-powercut",
    version,
    about = "A test filesystem that loses everything not fsynced when the power is cut"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount an empty filesystem at DIR and serve it until `quit` or end of input.
    ///
    /// Commands on standard input, one per line, each answered with one line:
    /// `freeze` -> `frozen unsynced_pages=N`: the power goes, requests wait;
    /// `cut` -> `cut unsynced_pages=N kept_pages=N unsynced_dir_ops=N kept_dir_ops=N
    /// lost_inodes=N held=N`: waiting requests fail with EIO, the mount is replaced by
    /// what survived; `stats` -> one line of `key=value`; `quit` -> `bye`.
    Mount {
        /// An existing, empty directory.
        dir: PathBuf,
        /// What survives a cut: nothing unsynced (`all` is lost), or a random part.
        #[arg(long, value_enum, default_value = "all")]
        lose: Lose,
        /// Seed for `--lose random`.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Size the filesystem reports (and enforces), MiB.
        #[arg(long, default_value_t = 4096)]
        capacity_mib: u64,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Lose {
    All,
    Random,
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fogline-powercut: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn owner(dir: &std::path::Path) -> (u32, u32) {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(dir).map_or((0, 0), |m| (m.uid(), m.gid()))
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let Cmd::Mount {
        dir,
        lose,
        seed,
        capacity_mib,
    } = cli.command;
    let mode = match lose {
        Lose::All => CutMode::All,
        Lose::Random => CutMode::Random,
    };
    let (uid, gid) = owner(&dir);
    let image = Image::new(mode, seed, capacity_mib << 20, uid, gid);
    let mut mounted =
        Mounted::mount(&dir, image).with_context(|| format!("mounting at {}", dir.display()))?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    writeln!(out, "ready {}", dir.display())?;
    out.flush()?;
    let stdin = std::io::stdin();
    for line in stdin.lock().lines() {
        let line = line.context("reading a command")?;
        let answer = match line.trim() {
            "" => continue,
            "freeze" => format!("frozen unsynced_pages={}", mounted.freeze()),
            "cut" => match mounted.cut() {
                Ok((r, held)) => format!(
                    "cut unsynced_pages={} kept_pages={} unsynced_dir_ops={} kept_dir_ops={} \
                     lost_inodes={} held={held}",
                    r.unsynced_pages,
                    r.kept_pages,
                    r.unsynced_dir_ops,
                    r.kept_dir_ops,
                    r.lost_inodes
                ),
                Err(e) => format!("error {e}"),
            },
            "stats" => {
                let s = mounted.stats();
                format!(
                    "stats generation={} frozen={} unsynced_pages={} used_bytes={} inodes={} \
                     writes={} bytes_written={} file_syncs={} dir_syncs={} cuts={}",
                    s.generation,
                    s.frozen,
                    s.unsynced_pages,
                    s.used_bytes,
                    s.inodes,
                    s.counters.writes,
                    s.counters.bytes_written,
                    s.counters.file_syncs,
                    s.counters.dir_syncs,
                    s.counters.cuts
                )
            }
            "quit" => break,
            other => format!("error unknown command {other:?}"),
        };
        writeln!(out, "{answer}")?;
        out.flush()?;
    }
    mounted.unmount().context("unmounting")?;
    writeln!(out, "bye").ok();
    Ok(())
}
