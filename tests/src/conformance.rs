//! The broker conformance suite: `tests/conformance/mqtt_conformance.py`, MQTT 3.1.1 and 5
//! checks made with a third-party client (Eclipse Paho, Debian's `python3-paho-mqtt`), run
//! against a broker on a local port. See the script's docstring for the checks.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

use crate::{run_bounded, BoundedOutput};

/// The script, in this crate's source tree.
pub fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/mqtt_conformance.py")
}

/// Debian's interpreter first: the Debian package installs paho for it, and a `python3`
/// earlier on `PATH` (pyenv, a venv) may not have it.
const PYTHONS: [&str; 2] = ["/usr/bin/python3", "python3"];

fn python_with_paho() -> Option<PathBuf> {
    PYTHONS.iter().map(PathBuf::from).find(|python| {
        run_bounded(
            Command::new(python).args(["-c", "import paho.mqtt.client"]),
            Duration::from_secs(20),
        )
        .is_ok_and(|out| out.status.success())
    })
}

/// A Python 3 that can import paho: found, or installed with apt (`python3` and
/// `python3-paho-mqtt`) when running as root. `Ok(None)` when it is missing and this is not
/// root: the caller skips, saying so.
pub fn ensure_python() -> anyhow::Result<Option<PathBuf>> {
    if let Some(python) = python_with_paho() {
        return Ok(Some(python));
    }
    if !crate::is_root() {
        return Ok(None);
    }
    for args in [
        &["update"][..],
        &[
            "install",
            "-y",
            "--no-install-recommends",
            "python3",
            "python3-paho-mqtt",
        ][..],
    ] {
        let mut cmd = Command::new("apt-get");
        cmd.args(args).env("DEBIAN_FRONTEND", "noninteractive");
        eprintln!("running {cmd:?}");
        let out = run_bounded(&mut cmd, Duration::from_secs(600))?;
        if !out.status.success() {
            bail!("{cmd:?} failed ({}): {}", out.status, out.stderr.trim());
        }
    }
    python_with_paho()
        .map(Some)
        .context("python3 still cannot import paho.mqtt after installing python3-paho-mqtt")
}

/// The suite, ready to run.
pub struct Suite {
    python: PathBuf,
}

/// How one run of the script went.
#[derive(Debug)]
pub struct SuiteRun {
    /// What the script was run with (after the port).
    pub args: Vec<String>,
    /// The script's exit status, stdout and stderr.
    pub output: BoundedOutput,
}

impl SuiteRun {
    /// Names of the checks with a line `<verdict> name...`.
    fn with(&self, verdict: &str) -> Vec<String> {
        self.output
            .stdout
            .lines()
            .filter_map(|l| l.strip_prefix(verdict))
            .filter_map(|rest| rest.split([':', ' ']).next())
            .map(str::to_owned)
            .collect()
    }

    /// The checks that passed, e.g. `qos_matrix[5]`.
    pub fn passed(&self) -> Vec<String> {
        self.with("PASS ")
    }

    /// The checks that failed.
    pub fn failed(&self) -> Vec<String> {
        self.with("FAIL ")
    }

    /// Exit status 0, at least one check passed and none failed.
    pub fn ok(&self) -> bool {
        self.output.status.success() && self.failed().is_empty() && !self.passed().is_empty()
    }

    /// Everything the script printed, for a test's output or its failure message.
    pub fn report(&self) -> String {
        let mut text = format!(
            "mqtt_conformance.py {} -> {}\n{}",
            self.args.join(" "),
            self.output.status,
            self.output.stdout.trim_end()
        );
        if !self.output.stderr.trim().is_empty() {
            text.push_str("\n--- stderr ---\n");
            text.push_str(self.output.stderr.trim_end());
        }
        text
    }

    /// Prints the report when [`SuiteRun::ok`], else fails with it.
    pub fn check(&self) -> anyhow::Result<()> {
        let report = self.report();
        if self.ok() {
            eprintln!("{report}");
        } else {
            bail!(
                "conformance checks failed: {}\n{report}",
                self.failed().join(" ")
            );
        }
        Ok(())
    }
}

impl Suite {
    /// The suite, or `None` (printed) when paho cannot be had here; an error in CI, where
    /// every test must run.
    pub fn find(test: &str) -> anyhow::Result<Option<Suite>> {
        match ensure_python()? {
            Some(python) => Ok(Some(Suite { python })),
            None => {
                crate::cannot_run(
                    test,
                    "needs python3 with paho (the Debian package python3-paho-mqtt); not \
                     root, so it cannot be installed here (tests/run.sh installs it)",
                )?;
                Ok(None)
            }
        }
    }

    /// Runs the script against `127.0.0.1:port` (MQTT 5 on `port_v5` when given) with
    /// more `args`, bounded to 5 minutes.
    pub fn run(&self, port: u16, port_v5: Option<u16>, args: &[&str]) -> anyhow::Result<SuiteRun> {
        let mut all: Vec<String> = vec![
            "--host".into(),
            "127.0.0.1".into(),
            "--port".into(),
            port.to_string(),
        ];
        if let Some(v5) = port_v5 {
            all.extend(["--port-v5".into(), v5.to_string()]);
        }
        all.extend(args.iter().map(|a| (*a).to_owned()));
        let mut cmd = Command::new(&self.python);
        cmd.arg("-u").arg(script()).args(&all);
        let output = run_bounded(&mut cmd, Duration::from_secs(300))?;
        Ok(SuiteRun { args: all, output })
    }
}
