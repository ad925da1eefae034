//! The Debian `mosquitto-clients` tools (`mosquitto_pub`, `mosquitto_sub`), as an operator
//! would use them against the agent's broker.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::bail;

use crate::run_bounded;

/// Fails with a clear message when `mosquitto_pub` / `mosquitto_sub` are not installed.
pub fn require_clients() -> anyhow::Result<()> {
    for tool in ["mosquitto_pub", "mosquitto_sub"] {
        match Command::new(tool)
            .arg("--help")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
        {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
                "{tool} is not installed: install the Debian package mosquitto-clients \
                 (tests/run.sh does this)"
            ),
            Err(e) => bail!("cannot run {tool}: {e}"),
        }
    }
    Ok(())
}

/// What `mosquitto_pub` sends.
pub enum Message<'a> {
    /// `-m TEXT`
    Text(&'a str),
    /// `-f FILE` (the file's bytes, e.g. a postcard frame)
    File(&'a Path),
}

/// `mosquitto_pub -h 127.0.0.1 -p PORT -q 1 -t TOPIC (-m TEXT | -f FILE)`.
pub fn publish(port: u16, topic: &str, message: Message<'_>) -> anyhow::Result<()> {
    let mut cmd = Command::new("mosquitto_pub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-t",
        topic,
    ]);
    match message {
        Message::Text(text) => cmd.args(["-m", text]),
        Message::File(path) => cmd.arg("-f").arg(path),
    };
    let out = run_bounded(&mut cmd, Duration::from_secs(15))?;
    if !out.status.success() {
        bail!(
            "mosquitto_pub -t {topic} failed ({}): {}",
            out.status,
            out.stderr.trim()
        );
    }
    Ok(())
}

/// `mosquitto_sub -C 1 -W SECS -t TOPIC`: the first message (e.g. a retained one), or
/// `None` if none arrived within `wait_secs`.
pub fn subscribe_one(port: u16, topic: &str, wait_secs: u32) -> anyhow::Result<Option<String>> {
    let mut cmd = Command::new("mosquitto_sub");
    cmd.args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-q",
        "1",
        "-C",
        "1",
        "-W",
        &wait_secs.to_string(),
        "-t",
        topic,
    ]);
    let out = run_bounded(&mut cmd, Duration::from_secs(u64::from(wait_secs) + 10))?;
    if out.status.success() {
        return Ok(Some(out.stdout.trim_end_matches('\n').to_string()));
    }
    if out.stdout.trim().is_empty() && out.stderr.contains("Timed out") {
        return Ok(None);
    }
    bail!(
        "mosquitto_sub -t {topic} failed ({}): {}",
        out.status,
        out.stderr.trim()
    )
}
