//! Helpers for the security tests: certificates and password hashes made with the agent's
//! own `certs` and `auth hash` commands, and `mosquitto_pub` with credentials.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::{agent_bin, run_bounded, BoundedOutput};

fn agent(args: &[&str]) -> anyhow::Result<BoundedOutput> {
    let out = run_bounded(
        crate::clean_env(&mut Command::new(agent_bin()?)).args(args),
        Duration::from_secs(30),
    )?;
    if !out.status.success() {
        bail!("fogline-agent {args:?} failed: {}", out.stderr.trim());
    }
    Ok(out)
}

/// `fogline-agent certs init --out DIR`.
pub fn certs_init(dir: &Path) -> anyhow::Result<()> {
    certs_init_for(dir, None)
}

/// `fogline-agent certs init --out DIR [--site SITE]`: a CA bound to `site`, or a fleet CA.
pub fn certs_init_for(dir: &Path, site: Option<&str>) -> anyhow::Result<()> {
    let dir = dir.to_string_lossy();
    let mut args = vec!["certs", "init", "--out", &dir];
    if let Some(site) = site {
        args.extend(["--site", site]);
    }
    agent(&args).map(|_| ())
}

/// `fogline-agent certs node --ca CA --node-id ID --host … --out OUT`; returns the
/// certificate and key paths.
pub fn certs_node(
    ca: &Path,
    id: &str,
    hosts: &[&str],
    out: &Path,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    certs_node_for(ca, id, hosts, out, None)
}

/// [`certs_node`] with `--site SITE`: the certificate names the node's site.
pub fn certs_node_for(
    ca: &Path,
    id: &str,
    hosts: &[&str],
    out: &Path,
    site: Option<&str>,
) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ca = ca.to_string_lossy();
    let out_s = out.to_string_lossy();
    let mut args = vec![
        "certs",
        "node",
        "--ca",
        &ca,
        "--node-id",
        id,
        "--out",
        &out_s,
    ];
    for h in hosts {
        args.extend(["--host", h]);
    }
    if let Some(site) = site {
        args.extend(["--site", site]);
    }
    agent(&args)?;
    Ok((out.join(format!("{id}.pem")), out.join(format!("{id}.key"))))
}

/// `echo PASSWORD | fogline-agent auth hash`.
pub fn auth_hash(password: &str) -> anyhow::Result<String> {
    let mut child = crate::clean_env(&mut Command::new(agent_bin()?))
        .args(["auth", "hash"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting fogline-agent auth hash")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(format!("{password}\n").as_bytes())?;
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("auth hash did not finish in 30 s");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("auth hash failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?.trim().to_owned())
}

/// `mosquitto_pub -q 1 [-i ID] [-u USER] [-P PASS] -t TOPIC -m MSG`; the outcome, whatever
/// it is (the caller checks the exit status).
pub fn pub_as(
    port: u16,
    id: Option<&str>,
    user: Option<&str>,
    pass: Option<&str>,
    topic: &str,
    msg: &str,
) -> anyhow::Result<BoundedOutput> {
    pub_as_version(port, false, id, user, pass, topic, msg)
}

/// [`pub_as`] with MQTT 5 (`-V mqttv5`) when `v5`.
pub fn pub_as_version(
    port: u16,
    v5: bool,
    id: Option<&str>,
    user: Option<&str>,
    pass: Option<&str>,
    topic: &str,
    msg: &str,
) -> anyhow::Result<BoundedOutput> {
    let mut cmd = crate::mosquitto::pub_command(port, topic);
    cmd.args(["-m", msg]);
    if v5 {
        cmd.args(["-V", "mqttv5"]);
    }
    if let Some(id) = id {
        cmd.args(["-i", id]);
    }
    if let Some(user) = user {
        cmd.args(["-u", user]);
    }
    if let Some(pass) = pass {
        cmd.args(["-P", pass]);
    }
    run_bounded(&mut cmd, Duration::from_secs(15))
}

/// `mosquitto_pub -l`: one message per line of `lines`, one connection, QoS 1.
pub fn pub_lines(
    port: u16,
    creds: Option<(&str, &str)>,
    topic: &str,
    lines: &[String],
) -> anyhow::Result<std::process::ExitStatus> {
    pub_lines_with(port, creds, topic, lines, &[])
}

/// [`pub_lines`] with more `mosquitto_pub` arguments (e.g. `-V mqttv5`).
pub fn pub_lines_with(
    port: u16,
    creds: Option<(&str, &str)>,
    topic: &str,
    lines: &[String],
    extra: &[&str],
) -> anyhow::Result<std::process::ExitStatus> {
    let mut cmd = crate::mosquitto::pub_command(port, topic);
    cmd.arg("-l").args(extra);
    if let Some((id, pass)) = creds {
        cmd.args(["-i", id, "-u", id, "-P", pass]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting mosquitto_pub -l")?;
    {
        let mut stdin = child.stdin.take().context("stdin")?;
        for line in lines {
            // A refused connection closes the pipe early: that is an outcome, not an error.
            if writeln!(stdin, "{line}").is_err() {
                break;
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("mosquitto_pub -l did not finish in 60 s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
