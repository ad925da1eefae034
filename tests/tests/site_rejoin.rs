//! Promise: a follower that was down catches up, and one that lost its disk loses the
//! site nothing. A follower is killed while sensors keep publishing, comes back and
//! catches up its replicas of the other agents' logs. Then its data directory is wiped
//! while it is down: it rejoins with a new log (a new incarnation, so its offsets never
//! collide with the old log's), and the readings it had acknowledged before the wipe
//! still reach the gateway from the replicas its peers hold.

use std::time::{Duration, Instant};

use fogline_tests::{test_seed, Site, SiteOptions};

#[test]
fn a_returning_or_wiped_follower_loses_nothing() -> anyhow::Result<()> {
    let seed = test_seed("site_rejoin");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut site =
        Site::start(&SiteOptions::new("site-r", 3).env("FOGLINE_UPLINK__BACKOFF_MAX_MS", 2000))?;
    let leader = site.wait_leader(Duration::from_secs(20), &[], &[0, 1, 2])?;
    let f = (leader + 1 + rng.usize(0..2)) % 3;
    let mut fleets = site.fleets(2, Duration::from_millis(3), 1 + (seed % 50) as u32)?;
    std::thread::sleep(Duration::from_secs(1));

    // 1. Down for a while, then back: it catches up the replicas it missed.
    site.agents[f].kill9()?;
    std::thread::sleep(Duration::from_millis(rng.u64(3000..6000)));
    site.agents[f].restart()?;
    let back = Instant::now();
    let others: Vec<usize> = (0..3).filter(|&i| i != f).collect();
    let targets: Vec<(String, u64)> = others
        .iter()
        .map(|&i| {
            let s = site.agents[i].status()?;
            Ok((
                s["origin"].as_str().unwrap_or_default().to_owned(),
                s["buffer"]["next_offset"].as_u64().unwrap_or(0),
            ))
        })
        .collect::<anyhow::Result<_>>()?;
    loop {
        let s = site.agents[f].status()?;
        let replicas = s["cluster"]["replicas"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let caught_up = targets.iter().all(|(origin, head)| {
            replicas
                .iter()
                .any(|r| r["origin"] == origin.as_str() && r["next"].as_u64() >= Some(*head))
        });
        if caught_up {
            break;
        }
        anyhow::ensure!(
            back.elapsed() < Duration::from_secs(30),
            "seed {seed}: {} did not catch up its replicas within 30 s: {}",
            site.ids[f],
            s["cluster"]
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "[site_rejoin] seed {seed}: {} caught up its replicas {:.0} ms after restarting",
        site.ids[f],
        back.elapsed().as_secs_f64() * 1000.0
    );

    // 2. Its disk is wiped while it is down — and the cloud is away, so part of its log
    //    exists nowhere but in its peers' replicas.
    site.cut_cloud();
    std::thread::sleep(Duration::from_secs(1));
    fleets[f].stop_publishing();
    fleets[f].wait_all_acked(Duration::from_secs(60))?;
    let before_wipe: Vec<(String, u32, u32)> = fleets[f]
        .snapshots()
        .iter()
        .map(|s| (s.device.clone(), s.boot, s.acked))
        .collect();
    fleets[f].shutdown();
    let old_origin = site.origin(f)?;
    let old_head = site.agents[f].status()?["buffer"]["next_offset"]
        .as_u64()
        .unwrap_or(0);
    site.agents[f].kill9()?;
    let at_gateway = site.gateway_next(&old_origin)?;
    assert!(
        at_gateway < old_head,
        "seed {seed}: the test needs readings not yet at the gateway ({at_gateway} of {old_head})"
    );
    std::fs::remove_dir_all(site.agents[f].data_dir())?;
    site.agents[f].restart()?;
    site.restore_cloud();
    let new_origin = site.origin(f)?;
    assert_ne!(new_origin, old_origin, "a wiped agent starts a new log");
    let all: Vec<usize> = (0..3).collect();
    site.wait_leader(Duration::from_secs(20), &[], &all)?;

    std::thread::sleep(Duration::from_secs(1));
    let mut expect = before_wipe;
    for &i in &others {
        fleets[i].stop_publishing();
        fleets[i].wait_all_acked(Duration::from_secs(60))?;
        expect.extend(
            fleets[i]
                .snapshots()
                .iter()
                .map(|s| (s.device.clone(), s.boot, s.sent)),
        );
        fleets[i].shutdown();
    }
    let heads = site.known_heads()?;
    assert!(
        heads.iter().any(|(o, h)| *o == old_origin && *h > 0),
        "the peers still hold the wiped agent's old log: {heads:?}"
    );
    site.wait_gateway_has(&heads, Duration::from_secs(60))?;
    let stored = site.stop_and_check(&expect, seed)?;
    let from_old = stored.iter().filter(|r| r.origin == old_origin).count();
    eprintln!(
        "[site_rejoin] {} readings at the gateway, {from_old} from {}'s wiped log \
         ({} of them only in replicas when it was wiped)",
        stored.len(),
        site.ids[f],
        old_head - at_gateway
    );
    Ok(())
}
