//! Promise: a leader cut off from the rest of its site stops forwarding within its lease
//! (while its own link to the gateway stays up), the majority elects a new leader, the
//! gateway stores nothing twice, and after the partition heals the old leader follows
//! and its buffered readings reach the gateway.

use std::time::{Duration, Instant};

use fogline_tests::{test_seed, Site, SiteOptions};

/// What observing the step-down adds to the lease: the status poll (10 ms), the agent's
/// tick (50 ms) on which it checks the lease, and the uplink task's reaction — on a debug
/// build sharing two cores with two other agents and the load.
const LEASE_SLACK: Duration = Duration::from_millis(250);

#[test]
fn a_partitioned_leader_steps_down_and_follows_after_healing() -> anyhow::Result<()> {
    let seed = test_seed("site_partition");
    let mut rng = fastrand::Rng::with_seed(seed);
    let mut site = Site::start(&SiteOptions::new("site-p", 3))?;
    let old = site.wait_leader(Duration::from_secs(20), &[], &[0, 1, 2])?;
    let mut fleets = site.fleets(2, Duration::from_millis(3), 1 + (seed % 50) as u32)?;
    std::thread::sleep(Duration::from_millis(rng.u64(1000..2500)));

    site.isolate(old);
    let cut = Instant::now();
    // The promise: it stops forwarding within its lease. The lease runs from the last
    // heartbeat round a majority answered, which was sent before the cut; what this loop
    // adds is its own polling and the uplink's reaction, a few ticks at most.
    let lease = site.lease();
    let allowed = lease + LEASE_SLACK;
    let mut stepped_down = None;
    while cut.elapsed() < allowed + Duration::from_secs(5) {
        let s = site.agents[old].status()?;
        if s["cluster"]["lease"] == false && s["backlog"]["gateway"]["link"] != "connected" {
            stepped_down = Some(cut.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let stepped_down = stepped_down.ok_or_else(|| {
        anyhow::anyhow!(
            "seed {seed}: the isolated leader still held its uplink 5 s after its lease"
        )
    })?;
    anyhow::ensure!(
        stepped_down <= allowed,
        "seed {seed}: the isolated leader gave up its uplink {:.0} ms after the cut; its \
         lease is {:.0} ms (allowed {:.0} ms with the observation's slack)",
        stepped_down.as_secs_f64() * 1000.0,
        lease.as_secs_f64() * 1000.0,
        allowed.as_secs_f64() * 1000.0
    );
    let majority: Vec<usize> = (0..3).filter(|&i| i != old).collect();
    let new = site.wait_leader(Duration::from_secs(15), &[old], &majority)?;
    eprintln!(
        "[site_partition] seed {seed}: {} isolated; it released the uplink after {:.0} ms; \
         {} leads after {:.0} ms",
        site.ids[old],
        stepped_down.as_secs_f64() * 1000.0,
        site.ids[new],
        cut.elapsed().as_secs_f64() * 1000.0
    );
    // While cut off, the old leader must not lead again (it cannot win a majority).
    std::thread::sleep(Duration::from_secs(3));
    let s = site.agents[old].status()?;
    assert_ne!(s["role"], "leader", "an isolated agent leads: {s}");
    assert_eq!(
        s["cluster"]["lease"], false,
        "an isolated agent holds a lease: {s}"
    );

    site.heal(old);
    let healed = Instant::now();
    let all: Vec<usize> = (0..3).collect();
    let leader = site.wait_leader(Duration::from_secs(20), &[], &all)?;
    eprintln!(
        "[site_partition] healed: {} follows {} after {:.0} ms",
        site.ids[old],
        site.ids[leader],
        healed.elapsed().as_secs_f64() * 1000.0
    );
    let expect = Site::finish_fleets(&mut fleets)?;
    let heads = site.known_heads()?;
    site.wait_gateway_has(&heads, Duration::from_secs(60))?;
    site.stop_and_check(&expect, seed)?;
    Ok(())
}
