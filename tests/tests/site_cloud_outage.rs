//! Promise: a site keeps working without the cloud. With the gateway unreachable for
//! 30 s, every agent keeps serving the whole site's aggregates (windows that began during
//! the outage, for the devices of every agent) on its own broker, and once the link
//! returns the gateway gets every reading exactly once.

use std::time::{Duration, Instant};

use fogline_tests::{mosquitto, now_ms, test_seed, Site, SiteOptions};

const OUTAGE: Duration = Duration::from_secs(30);

#[test]
fn a_30s_cloud_outage_keeps_the_site_serving_and_loses_nothing() -> anyhow::Result<()> {
    mosquitto::require_clients()?;
    let seed = test_seed("site_cloud_outage");
    let mut site =
        Site::start(&SiteOptions::new("site-o", 3).env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 2000))?;
    site.wait_leader(Duration::from_secs(20), &[], &[0, 1, 2])?;
    let mut fleets = site.fleets(2, Duration::from_millis(3), 1 + (seed % 50) as u32)?;
    std::thread::sleep(Duration::from_secs(2));

    site.cut_cloud();
    let cut_at = Instant::now();
    let cut_ms = now_ms();
    let devices: Vec<String> = fleets
        .iter()
        .flat_map(|f| f.snapshots().into_iter().map(|s| s.device))
        .collect();
    // Wait for a 10 s window that began after the cut to be published.
    std::thread::sleep(Duration::from_secs(22));
    let mut stale = Vec::new();
    for (i, agent) in site.agents.iter().enumerate() {
        for device in &devices {
            let topic = format!("agg/{device}/temp/10s");
            let json = mosquitto::subscribe_one(agent.mqtt_port(), &topic, 5)?;
            let v: serde_json::Value = match json.as_deref().map(serde_json::from_str) {
                Some(Ok(v)) => v,
                _ => {
                    stale.push(format!("{}: nothing on {topic}", site.ids[i]));
                    continue;
                }
            };
            let start = v["start_ms"].as_i64().unwrap_or(0);
            if start < cut_ms || v["count"].as_u64().unwrap_or(0) == 0 {
                stale.push(format!(
                    "{}: {topic} is from before the outage: {v}",
                    site.ids[i]
                ));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "seed {seed}: during the outage some agent did not serve the site's aggregates:\n{}",
        stale.join("\n")
    );
    let during: u64 = site
        .ids
        .iter()
        .map(|id| site.gateway.next_offset(&site.site, id))
        .collect::<anyhow::Result<Vec<u64>>>()?
        .iter()
        .sum();
    std::thread::sleep(OUTAGE.saturating_sub(cut_at.elapsed()));
    site.restore_cloud();
    eprintln!(
        "[site_cloud_outage] cloud restored after {:.1}s",
        cut_at.elapsed().as_secs_f64()
    );

    let expect = Site::finish_fleets(&mut fleets)?;
    let heads = site.known_heads()?;
    let drained = Instant::now();
    site.wait_gateway_has(&heads, Duration::from_secs(90))?;
    eprintln!(
        "[site_cloud_outage] backlog drained {:.1}s after the fleets stopped",
        drained.elapsed().as_secs_f64()
    );
    let stored = site.stop_and_check(&expect, seed)?;
    assert!(
        stored.len() as u64 > during,
        "the gateway received the backlog after the outage"
    );
    Ok(())
}
