//! Promise: a site survives the permanent loss of its leader. Sensors publish to all three
//! agents; the leader is killed with SIGKILL and never comes back. The other two elect a
//! new leader, the uplink resumes from the gateway's watermark of every origin (the dead
//! leader's included, from its replicas), and the gateway ends with every reading any
//! device saw acknowledged exactly once — also those the dead leader had acked to its
//! own sensors, because with `ack_after = "replicated"` an ack means "on two agents".

use std::time::{Duration, Instant};

use fogline_tests::{test_seed, Site, SiteOptions};

#[test]
fn killing_the_leader_loses_no_acked_reading() -> anyhow::Result<()> {
    let seed = test_seed("site_failover");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut site = Site::start(&SiteOptions::new("site-f", 3))?;
    let leader = site.wait_leader(Duration::from_secs(20), &[], &[0, 1, 2])?;
    let mut fleets = site.fleets(2, Duration::from_millis(2), 1 + (seed % 50) as u32)?;
    std::thread::sleep(Duration::from_millis(rng.u64(1500..3000)));
    let origins: Vec<String> = (0..3)
        .map(|i| site.origin(i))
        .collect::<anyhow::Result<_>>()?;
    let dead_origin = origins[leader].clone();
    assert!(
        site.gateway_next(&dead_origin)? > 0,
        "the leader forwards its own log before it dies"
    );

    site.agents[leader].kill9()?;
    let killed = Instant::now();
    // What the dead leader's devices saw acked is all that is promised for them.
    fleets[leader].stop_publishing();
    let dead_acked: Vec<(String, u32, u32)> = fleets[leader]
        .snapshots()
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.acked))
        .collect();
    fleets[leader].shutdown();
    let survivors: Vec<usize> = (0..3).filter(|&i| i != leader).collect();
    let before = site.gateway_marks(&origins)?;
    let new_leader = site.wait_leader(Duration::from_secs(15), &[leader], &survivors)?;
    let elected = killed.elapsed();
    // The first batch the gateway acks after the kill, from any origin.
    let resumed = site.wait_uplink_progress(&origins, &before, killed, Duration::from_secs(30))?;
    eprintln!(
        "[site_failover] seed {seed}: leader {} killed; {} elected after {:.0} ms; \
         first batch acked by the gateway {:.0} ms after the kill",
        site.ids[leader],
        site.ids[new_leader],
        elected.as_secs_f64() * 1000.0,
        resumed.as_secs_f64() * 1000.0
    );

    std::thread::sleep(Duration::from_secs(2));
    // /status tells who leads, in which term, and how far each peer holds this log.
    for &i in &survivors {
        let s = site.agents[i].status()?;
        assert_eq!(s["leader"], site.ids[new_leader].as_str(), "{s}");
        assert!(
            s["term"].as_u64() >= Some(2),
            "a new term after the kill: {s}"
        );
        let peers = s["peers"].as_array().cloned().unwrap_or_default();
        assert_eq!(peers.len(), 2, "{s}");
        for p in &peers {
            let live = survivors.iter().any(|&j| p["id"] == site.ids[j].as_str());
            assert!(p["lag"].is_u64(), "{p}");
            if live {
                assert!(
                    p["acked"].as_u64() > Some(0),
                    "the live peer holds this log: {p}"
                );
            } else {
                assert_ne!(
                    p["link"], "connected",
                    "the dead leader is not reachable: {p}"
                );
            }
        }
    }
    let mut live: Vec<_> = fleets
        .into_iter()
        .enumerate()
        .filter_map(|(i, f)| (i != leader).then_some(f))
        .collect();
    let mut expect = dead_acked;
    expect.extend(Site::finish_fleets(&mut live)?);
    let heads = site.known_heads()?;
    site.wait_gateway_has(&heads, Duration::from_secs(60))?;
    let stored = site.stop_and_check(&expect, seed)?;
    let acked_by_dead: u32 = expect
        .iter()
        .filter(|(d, _, _)| d.starts_with(&format!("{}-", site.ids[leader])))
        .map(|(_, _, n)| n)
        .sum();
    assert!(acked_by_dead > 0, "the dead leader had acked readings");
    eprintln!(
        "[site_failover] {} readings at the gateway, {acked_by_dead} of them acked by the dead leader",
        stored.len()
    );
    Ok(())
}
