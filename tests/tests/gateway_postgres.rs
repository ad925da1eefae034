//! Promise: on PostgreSQL (a real server), gateways store every reading acknowledged at
//! the edge exactly once, in offset order, and serve each other's aggregates; a running
//! gateway's store can be exported; an embedded store moves into PostgreSQL without loss.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use fogline_tests::mosquitto;
use fogline_tests::postgres::{self, Postgres};
use fogline_tests::{
    check_gateway_log, poll_until, run_bounded, Agent, AgentOptions, DeviceSpec, Fleet, Gateway,
    GatewayReading, TcpProxy,
};

/// `mosquitto_sub -C 1 -W 40 -t agg/#` at `port`, started now, read later.
struct FirstAggregate(std::process::Child);

impl FirstAggregate {
    fn subscribe(port: u16) -> anyhow::Result<FirstAggregate> {
        let child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-C", "1", "-W", "40", "-v", "-t", "agg/#"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        Ok(FirstAggregate(child))
    }

    /// `topic payload` of the first message, or `None` after 50 s.
    fn wait(mut self) -> anyhow::Result<Option<String>> {
        let deadline = Instant::now() + Duration::from_secs(50);
        while Instant::now() < deadline {
            if self.0.try_wait()?.is_some() {
                let out = self.0.wait_with_output()?;
                let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                return Ok((!text.is_empty()).then_some(text));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
        Ok(None)
    }
}

/// Offsets of one origin in export order, and whether each appears once, ascending.
fn in_offset_order(stored: &[GatewayReading], origin: &str) -> Result<u64, String> {
    let mut next = 0;
    for r in stored.iter().filter(|r| r.origin == origin) {
        if r.offset != next {
            return Err(format!("offset {} where {next} was due", r.offset));
        }
        next += 1;
    }
    Ok(next)
}

#[test]
fn gateways_on_postgres_store_once_and_share_aggregates() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let Some(pg) = postgres::start_or_skip("gateway_postgres::share")? else {
        return Ok(());
    };
    let url = pg.create_db("fleet")?;
    // One through the environment, one through --store.
    let mut gw1 = Gateway::start(&[("FOGLINE_GW_STORE__URL", &url)])?;
    let mut gw2 = Gateway::start_on(&[], None, Some(&url))?;
    // Nothing is retained at gw2 yet: what arrives came through PostgreSQL's NOTIFY.
    let at_gw2 = FirstAggregate::subscribe(gw2.mqtt_port())?;
    std::thread::sleep(Duration::from_millis(500));

    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw1.mqtt_addr())
            .env("FOGLINE_NODE__SITE", "farm")
            .env("FOGLINE_NODE__ID", "pi-1")
            .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 200),
    )?;
    let origin = agent.status()?["origin"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..2 {
        let mut spec = DeviceSpec::json(format!("pg-{i}"), "temp", 21 + i);
        spec.interval = Some(Duration::from_millis(5));
        spec.window = 100;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    assert!(head > 100, "only {head} readings were taken");
    let drained = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        (gw1.next_offset("farm", &origin).ok()? >= head).then_some(())
    });
    assert!(
        drained.is_some(),
        "the backlog did not drain:\n{}",
        gw1.log_tail(30)
    );

    let aggregate = at_gw2.wait()?;
    let aggregate = aggregate.unwrap_or_default();
    assert!(
        aggregate.starts_with("agg/farm/pg-"),
        "gw2 republished an aggregate that reached gw1 only: {aggregate:?}\n{}",
        gw2.log_tail(20)
    );

    // Exported while both gateways run, from gw2's side: every reading once, in order.
    let stored = gw2.export()?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let problems = check_gateway_log(&stored, &sent);
    assert!(problems.is_empty(), "{}", problems.join("\n  "));
    assert_eq!(in_offset_order(&stored, &origin), Ok(head));
    let stats = gw2.stats()?;
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0]["next_offset"].as_u64(), Some(head));
    assert_eq!(stats[0]["stored"].as_u64(), Some(head));
    assert_eq!(stats[0]["skipped_at_edge"].as_u64(), Some(0));

    // The schema is the documented one: readings with times, in daily partitions.
    let mut db = pg.client("fleet")?;
    let rows: i64 = db
        .query_one(
            "SELECT count(*) FROM fogline.readings WHERE site = 'farm' AND device LIKE 'pg-%' \
             AND ts > now() - interval '1 hour'",
            &[],
        )?
        .get(0);
    assert_eq!(rows as u64, head);
    let partitions: i64 = db
        .query_one(
            "SELECT count(*) FROM pg_inherits i JOIN pg_class p ON p.oid = i.inhparent \
             WHERE p.relname = 'readings'",
            &[],
        )?
        .get(0);
    assert!(
        partitions >= 2,
        "today's and tomorrow's partitions: {partitions}"
    );

    agent.stop(Duration::from_secs(20))?;
    gw1.stop(Duration::from_secs(20))?;
    gw2.stop(Duration::from_secs(20))?;
    Ok(())
}

/// Two gateways on one PostgreSQL; the agent knows both. The one it drains into is
/// killed with SIGKILL in the middle of the drain: the agent moves to the other, and
/// every reading acknowledged at the edge is in PostgreSQL exactly once, in offset order.
#[test]
fn a_gateway_killed_mid_drain_loses_nothing() -> anyhow::Result<()> {
    let Some(pg) = postgres::start_or_skip("gateway_postgres::kill")? else {
        return Ok(());
    };
    let url = pg.create_db("failover")?;
    let mut gw1 = Gateway::start_on(&[], None, Some(&url))?;
    let mut gw2 = Gateway::start_on(&[], None, Some(&url))?;
    // Both links down while the devices publish: a backlog forms at the edge.
    let (p1, p2) = (
        TcpProxy::start(gw1.mqtt_addr())?,
        TcpProxy::start(gw2.mqtt_addr())?,
    );
    p1.cut();
    p2.cut();
    let (a, b) = (p1.addr().to_string(), p2.addr().to_string());
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", format!("{a},{b}"))
            .env("FOGLINE_UPLINK__BACKOFF_MIN_MS", 100)
            .env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 1000)
            // The backlog drains for seconds: gw1 dies in the middle of it.
            .env("FOGLINE_UPLINK__DRAIN_RATE", 600)
            .env("FOGLINE_UPLINK__RETENTION_SECS", 0)
            .env("FOGLINE_NODE__SITE", "farm")
            .env("FOGLINE_NODE__ID", "pi-1"),
    )?;
    let origin = agent.status()?["origin"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    for i in 0..4 {
        let mut spec = DeviceSpec::json(format!("k-{i}"), "temp", 31 + i);
        spec.interval = Some(Duration::from_millis(2));
        spec.window = 100;
        fleet.add(spec)?;
    }
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(3));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    let snaps = fleet.snapshots();
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    // The drain begins into gw1; gw2 is reachable too from then on.
    p1.restore();
    let started = poll_until(Duration::from_secs(30), Duration::from_millis(20), || {
        (gw1.next_offset("farm", &origin).ok()? > 0).then_some(())
    });
    p2.restore();
    let stopped_at = gw1.next_offset("farm", &origin)?;
    anyhow::ensure!(started.is_some(), "the drain into gw1 did not start");
    // In the middle of the drain: some stored, much not yet.
    let mid = poll_until(Duration::from_secs(60), Duration::from_millis(20), || {
        let at = gw1.next_offset("farm", &origin).ok()?;
        (at >= stopped_at + 500).then_some(at)
    });
    let mid =
        mid.ok_or_else(|| {
            anyhow::anyhow!(
            "the drain did not go on (gw1 at {stopped_at} when the devices stopped, of {head}): \
             {}\n{}",
            agent.status().map(|s| s["backlog"].to_string()).unwrap_or_default(),
            gw1.log_tail(20)
        )
        })?;
    assert!(
        mid < head,
        "the drain was over before the kill ({mid} of {head})"
    );
    gw1.kill9()?;
    let drained = poll_until(Duration::from_secs(90), Duration::from_millis(200), || {
        (gw2.next_offset("farm", &origin).ok()? >= head).then_some(())
    });
    let status = agent.status()?;
    assert!(
        drained.is_some(),
        "the rest did not reach gw2: {}\n{}",
        status["backlog"]["gateway"],
        gw2.log_tail(20)
    );
    let link = &status["backlog"]["gateway"];
    assert_eq!(link["address"], b.as_str(), "{link}");
    assert!(link["failovers"].as_u64().unwrap_or(0) >= 1, "{link}");
    // The edge deleted only what PostgreSQL acked: its ack is the whole log.
    let acked = poll_until(Duration::from_secs(20), Duration::from_millis(100), || {
        let s = agent.status().ok()?;
        (s["backlog"]["gateway"]["acked_offset"].as_u64()? >= head).then_some(())
    });
    assert!(
        acked.is_some(),
        "the agent's ack: {}",
        agent.status()?["backlog"]
    );

    let stored = gw2.export()?;
    let sent: Vec<(String, u32, u32)> = snaps
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.sent))
        .collect();
    let problems = check_gateway_log(&stored, &sent);
    assert!(problems.is_empty(), "{}", problems.join("\n  "));
    assert_eq!(
        in_offset_order(&stored, &origin),
        Ok(head),
        "once each, in offset order"
    );
    eprintln!("{head} readings; gw1 killed at {mid}; gw2 stored the rest");
    agent.stop(Duration::from_secs(20))?;
    gw2.stop(Duration::from_secs(20))?;
    Ok(())
}

/// The JSON lines of `store export` for either store, sorted.
fn export_lines(
    gw_bin: &std::path::Path,
    which: &[&str],
) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = run_bounded(
        fogline_tests::clean_env(&mut Command::new(gw_bin))
            .args(["store", "export"])
            .args(which),
        Duration::from_secs(120),
    )?;
    anyhow::ensure!(out.status.success(), "store export: {}", out.stderr);
    let mut lines: Vec<serde_json::Value> = out
        .stdout
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    lines.sort_by_key(|l| l.to_string());
    Ok(lines)
}

#[test]
fn an_embedded_store_moves_into_postgres_without_loss() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let Some(pg) = postgres::start_or_skip("gateway_postgres::migrate")? else {
        return Ok(());
    };
    let url = pg.create_db("moved")?;
    let mut gw = Gateway::start(&[])?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr())
            .env("FOGLINE_NODE__SITE", "farm")
            .env("FOGLINE_NODE__ID", "pi-1")
            .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 200),
    )?;
    let mut fleet = Fleet::new(agent.mqtt_addr())?;
    let mut spec = DeviceSpec::json("mv-0", "temp", 7);
    spec.interval = Some(Duration::from_millis(5));
    spec.window = 100;
    fleet.add(spec)?;
    fleet.wait_connected(Duration::from_secs(10))?;
    std::thread::sleep(Duration::from_secs(2));
    fleet.stop_publishing();
    fleet.wait_all_acked(Duration::from_secs(30))?;
    fleet.shutdown();
    let head = agent.status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    let drained = poll_until(Duration::from_secs(60), Duration::from_millis(200), || {
        (gw.next_offset("farm", "pi-1").ok()? >= head).then_some(())
    });
    assert!(drained.is_some(), "the backlog did not drain");
    // Let an aggregate or two arrive, then stop: migrate wants a stopped gateway.
    std::thread::sleep(Duration::from_secs(1));
    agent.stop(Duration::from_secs(20))?;
    gw.stop(Duration::from_secs(20))?;

    let bin = fogline_tests::find_bin("fogline-gateway", "FOGLINE_GATEWAY_BIN")?;
    let dir = gw.data_dir().to_string_lossy().into_owned();
    let migrate = |expect_copied: Option<u64>| -> anyhow::Result<serde_json::Value> {
        let out = run_bounded(
            fogline_tests::clean_env(&mut Command::new(&bin))
                .args(["store", "migrate", "--from", &dir, "--to", &url]),
            Duration::from_secs(120),
        )?;
        anyhow::ensure!(
            out.status.success(),
            "store migrate: {}{}",
            out.stdout,
            out.stderr
        );
        let report: serde_json::Value = serde_json::from_str(&out.stdout)?;
        if let Some(n) = expect_copied {
            assert_eq!(report["offsets_copied"].as_u64(), Some(n), "{report}");
        }
        Ok(report)
    };
    let report = migrate(Some(head))?;
    assert!(
        report["aggregates_copied"].as_u64().unwrap_or(0) > 0,
        "aggregates too: {report}"
    );
    // Again: nothing is copied twice.
    migrate(Some(0))?;

    let embedded = export_lines(&bin, &["--data-dir", &dir])?;
    let moved = export_lines(&bin, &["--store", &url])?;
    assert_eq!(embedded.len() as u64, head);
    assert!(
        embedded == moved,
        "the re-export differs from the embedded store's"
    );
    let stats = |which: [&str; 2]| -> anyhow::Result<serde_json::Value> {
        let out = run_bounded(
            fogline_tests::clean_env(&mut Command::new(&bin))
                .args(["store", "stats"])
                .args(which),
            Duration::from_secs(60),
        )?;
        anyhow::ensure!(out.status.success(), "store stats: {}", out.stderr);
        Ok(serde_json::from_str(&out.stdout)?)
    };
    assert_eq!(stats(["--data-dir", &dir])?, stats(["--store", &url])?);
    // The newest aggregates came along: a gateway on PostgreSQL serves them retained.
    let mut on_pg = Gateway::start_on(&[], None, Some(&url))?;
    let retained = mosquitto::subscribe_one(on_pg.mqtt_port(), "agg/farm/mv-0/#", 10)?;
    assert!(retained.is_some(), "no aggregate retained after the move");
    on_pg.stop(Duration::from_secs(20))?;
    drop::<Postgres>(pg);
    Ok(())
}
