//! Promise: a dashboard asks the gateway for a device's history and gets every stored
//! reading of that series in the time range, once, oldest first, page by page, as JSON or
//! CSV, and the window aggregates of that series; it lists sites, devices and metrics; bad
//! parameters get a 400 that says why; without a reader's credentials, a 401. Asked with
//! curl, from a gateway fed by a real agent, and again after the gateway restarts.

use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fogline_tests::secure::{auth_hash, pub_lines};
use fogline_tests::{mosquitto, poll_until, postgres, run_bounded, Agent, AgentOptions, Gateway};

const PASSWORD: &str = "history-pw";
const D1: i64 = 25;
const D2: i64 = 5;

struct Answer {
    code: u16,
    headers: String,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or(serde_json::Value::Null)
    }
}

/// `curl -i` on the gateway's HTTP listener, as the reader unless `anonymous`.
fn get(gw: &Gateway, path: &str, anonymous: bool) -> anyhow::Result<Answer> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "-i", "--max-time", "10"]);
    if !anonymous {
        cmd.args(["-u", &format!("grafana:{PASSWORD}")]);
    }
    cmd.arg(format!("http://{}{path}", gw.http_addr()));
    let out = run_bounded(&mut cmd, Duration::from_secs(20))?;
    anyhow::ensure!(out.status.success(), "curl {path}: {}", out.stderr.trim());
    let (headers, body) = out
        .stdout
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("no headers in {:?}", out.stdout))?;
    let code = headers
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    Ok(Answer {
        code,
        headers: headers.to_ascii_lowercase(),
        body: body.to_owned(),
    })
}

fn rfc3339(ms: i64) -> String {
    // Whole seconds only: days since the epoch to a civil date (Howard Hinnant's method).
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Every page of d1's readings with `limit`, following `next`.
fn all_pages(gw: &Gateway, limit: usize) -> anyhow::Result<Vec<Vec<serde_json::Value>>> {
    let mut pages = Vec::new();
    let mut after: Option<String> = None;
    for _ in 0..100 {
        let mut path = format!("/api/v1/readings?site=farm&device=d1&metric=temp&limit={limit}");
        if let Some(a) = &after {
            path.push_str(&format!("&after={a}"));
        }
        let a = get(gw, &path, false)?;
        anyhow::ensure!(a.code == 200, "{path}: {} {}", a.code, a.body);
        let json = a.json();
        pages.push(json["readings"].as_array().cloned().unwrap_or_default());
        match json["next"].as_str() {
            Some(n) => after = Some(n.to_owned()),
            None => return Ok(pages),
        }
    }
    anyhow::bail!("more than 100 pages")
}

#[test]
fn the_history_of_a_series_is_served_page_by_page() -> anyhow::Result<()> {
    history_is_served(None)
}

/// The same answers from a gateway whose store is PostgreSQL.
#[test]
fn the_history_is_served_from_postgres_too() -> anyhow::Result<()> {
    let Some(pg) = postgres::start_or_skip("gateway_history::postgres")? else {
        return Ok(());
    };
    let url = pg.create_db("history")?;
    history_is_served(Some(&url))
}

fn history_is_served(store_url: Option<&str>) -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let dir = tempfile::tempdir()?;
    let config = dir.path().join("gateway.toml");
    std::fs::write(
        &config,
        format!("[access.readers]\ngrafana = {:?}\n", auth_hash(PASSWORD)?),
    )?;
    let mut gw = Gateway::start_on(&[], Some(config), store_url)?;
    let mut agent = Agent::start(
        AgentOptions::default()
            .env("FOGLINE_UPLINK__GATEWAY", gw.mqtt_addr())
            .env("FOGLINE_NODE__SITE", "farm")
            .env("FOGLINE_NODE__ID", "pi-1")
            .env("FOGLINE_AGGREGATE__PUBLISH_INTERVAL_MS", 100),
    )?;
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as i64;
    // Ten minutes ago, at the start of a minute: all of d1's 25 s in one 60 s window (the
    // agent relays a series' newest window; one it overtook at once is not relayed).
    let base = (now - 600_000) / 60_000 * 60_000;
    for (device, n) in [("d1", D1), ("d2", D2)] {
        let lines: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    "{{\"value\":{i},\"seq\":{},\"boot\":1,\"ts\":{}}}",
                    i + 1,
                    base + i * 1000
                )
            })
            .collect();
        let status = pub_lines(
            agent.mqtt_port(),
            None,
            &format!("sensors/{device}/temp"),
            &lines,
        )?;
        assert!(status.success(), "mosquitto_pub -l failed");
    }
    let stored = poll_until(Duration::from_secs(30), Duration::from_millis(200), || {
        (gw.next_offset("farm", "pi-1").ok()? >= (D1 + D2) as u64).then_some(())
    });
    assert!(
        stored.is_some(),
        "the readings did not reach the gateway:\n{}",
        gw.log_tail(30)
    );

    // No credentials: 401.
    let a = get(&gw, "/api/v1/sites", true)?;
    assert_eq!(a.code, 401, "{}", a.body);
    assert!(
        a.headers.contains("www-authenticate: basic"),
        "{}",
        a.headers
    );

    for round in ["before", "after"] {
        // Every reading of d1, once, oldest first, with its value.
        let pages = all_pages(&gw, 1000)?;
        assert_eq!(pages.len(), 1, "{round}: one page");
        let values: Vec<i64> = pages[0]
            .iter()
            .filter_map(|r| r["value"].as_f64())
            .map(|v| v as i64)
            .collect();
        assert_eq!(
            values,
            (0..D1).collect::<Vec<_>>(),
            "{round}: d1's readings"
        );
        let ts: Vec<i64> = pages[0]
            .iter()
            .filter_map(|r| r["ts_ms"].as_i64())
            .collect();
        assert_eq!(
            ts,
            (0..D1).map(|i| base + i * 1000).collect::<Vec<_>>(),
            "{round}"
        );
        assert_eq!(
            pages[0][0]["time"],
            rfc3339(base).as_str(),
            "{round}: RFC 3339 times"
        );

        // Pages of 7: 7 + 7 + 7 + 4, every reading once, in order.
        let pages = all_pages(&gw, 7)?;
        let sizes: Vec<usize> = pages.iter().map(Vec::len).collect();
        assert_eq!(sizes, vec![7, 7, 7, 4], "{round}: page sizes");
        let paged: Vec<i64> = pages
            .iter()
            .flatten()
            .filter_map(|r| r["value"].as_f64())
            .map(|v| v as i64)
            .collect();
        assert_eq!(
            paged,
            (0..D1).collect::<Vec<_>>(),
            "{round}: paged readings"
        );

        // A range: from (Unix ms, inclusive) to (RFC 3339, exclusive) → readings 5..=9.
        let path = format!(
            "/api/v1/readings?site=farm&device=d1&metric=temp&from={}&to={}",
            base + 5000,
            rfc3339(base + 10_000)
        );
        let a = get(&gw, &path, false)?;
        assert_eq!(a.code, 200, "{path}: {}", a.body);
        let values: Vec<i64> = a.json()["readings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|r| r["value"].as_f64())
            .map(|v| v as i64)
            .collect();
        assert_eq!(values, vec![5, 6, 7, 8, 9], "{round}: the range");

        // CSV, paged: a header and ten lines, and where the next page starts.
        let a = get(
            &gw,
            "/api/v1/readings?site=farm&device=d1&metric=temp&format=csv&limit=10",
            false,
        )?;
        assert_eq!(a.code, 200, "{}", a.body);
        assert!(
            a.headers.contains("content-type: text/csv"),
            "{}",
            a.headers
        );
        assert!(a.headers.contains("fogline-next:"), "{}", a.headers);
        let lines: Vec<&str> = a.body.lines().collect();
        assert_eq!(lines.len(), 11, "{round}: {}", a.body);
        assert!(lines[0].starts_with("time,ts_ms,value"), "{}", lines[0]);
        assert!(lines[1].contains(&format!(",{base},0,")), "{}", lines[1]);

        // Lists.
        let sites = get(&gw, "/api/v1/sites", false)?.json();
        assert_eq!(sites["sites"], serde_json::json!(["farm"]), "{round}");
        let devices = get(&gw, "/api/v1/devices?site=farm", false)?.json();
        assert_eq!(
            devices["devices"],
            serde_json::json!(["d1", "d2"]),
            "{round}"
        );
        let metrics = get(&gw, "/api/v1/metrics?site=farm&device=d2", false)?.json();
        assert_eq!(
            metrics["metrics"],
            serde_json::json!([{"metric": "temp", "readings": D2}]),
            "{round}"
        );

        // Window aggregates of d1: every reading counted in the 60 s windows.
        let counted = poll_until(Duration::from_secs(20), Duration::from_millis(300), || {
            let a = get(
                &gw,
                "/api/v1/aggregates?site=farm&device=d1&metric=temp&window=60",
                false,
            )
            .ok()?;
            let aggs = a.json()["aggregates"].as_array().cloned()?;
            let total: i64 = aggs.iter().filter_map(|g| g["count"].as_i64()).sum();
            (total == D1 && aggs.iter().all(|g| g["device"] == "d1")).then_some(aggs.len())
        });
        assert!(
            counted.is_some(),
            "{round}: d1's aggregates do not count its 25 readings"
        );

        if round == "before" {
            agent.stop(Duration::from_secs(30))?;
            gw.stop(Duration::from_secs(30))?;
            gw.restart()?;
        }
    }

    // Bad parameters: a 400 that says why.
    for (path, says) in [
        (
            "/api/v1/readings?device=d1&metric=temp",
            "missing parameter site",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&from=yesterday",
            "RFC 3339",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&from=20&to=10",
            "from is after to",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&limit=0",
            "limit",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&format=xml",
            "json or csv",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&after=nope",
            "cursor",
        ),
        (
            "/api/v1/readings?site=farm&device=d1&metric=temp&colour=red",
            "unknown parameter",
        ),
        (
            "/api/v1/aggregates?site=farm&device=d1&metric=temp&window=0",
            "window",
        ),
        ("/api/v1/devices", "missing parameter site"),
    ] {
        let a = get(&gw, path, false)?;
        assert_eq!(a.code, 400, "{path}: {}", a.body);
        let error = a.json()["error"].as_str().unwrap_or_default().to_owned();
        assert!(
            error.contains(says),
            "{path}: {error:?} does not say {says:?}"
        );
    }
    gw.stop(Duration::from_secs(30))?;
    Ok(())
}
