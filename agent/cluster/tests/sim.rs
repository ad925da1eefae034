//! Multi-node tests on the in-memory network harness (`fogline_cluster::sim`).
//!
//! Seeds are printed; pin one with `FOGLINE_SEED=<n>` to reproduce a failure.

use fogline_cluster::sim::Cluster;
use fogline_cluster::{Config, Role};

const IDS: [u64; 3] = [1, 2, 3];

fn base() -> Config {
    // 10..=20 ticks election timeout, heartbeat every 2, lease 8: the defaults.
    Config::new(0, [])
}

fn seed(default: u64) -> u64 {
    let s = std::env::var("FOGLINE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default);
    println!("seed = {s} (FOGLINE_SEED={s} to reproduce)");
    s
}

fn sole_leader(c: &Cluster) -> Option<u64> {
    let l = c.leaders();
    // Everyone else must agree on the term and the leader, or the election is not over.
    let leader = *l.first()?;
    let term = c.node(leader)?.term();
    let agreed = c.ids().iter().all(|&id| {
        c.node(id)
            .is_some_and(|n| n.term() == term && n.leader() == Some(leader))
    });
    (l.len() == 1 && agreed).then_some(leader)
}

#[test]
fn a_healthy_site_elects_one_leader_and_it_holds_the_lease() {
    let mut c = Cluster::new(&IDS, &base(), seed(42));
    let took = c
        .run_until(100, |c| sole_leader(c).is_some())
        .expect("a leader within 100 ticks");
    println!("elected after {took} ticks");
    c.run(50);
    let l = sole_leader(&c).expect("still one leader");
    assert_eq!(c.lease_holders(), [l], "a healthy leader keeps its lease");
    assert!(c.violations.is_empty(), "{:?}", c.violations);
}

#[test]
fn an_isolated_leader_loses_its_lease_before_a_new_one_is_elected() {
    let mut c = Cluster::new(&IDS, &base(), seed(7));
    c.run_until(100, |c| sole_leader(c).is_some())
        .expect("first leader");
    let old = sole_leader(&c).expect("leader");
    let old_term = c.node(old).expect("node").term();
    c.isolate(old);
    let took = c
        .run_until(100, |c| {
            c.leaders().iter().any(|&l| l != old)
                && c.node(old).is_some_and(|n| n.role() != Role::Leader)
        })
        .expect("a new leader within 100 ticks of isolating the old one");
    println!("new leader after {took} ticks");
    let new = *c.leaders().iter().find(|&&l| l != old).expect("new leader");
    assert!(c.node(new).expect("node").term() > old_term);
    c.run(5);
    assert_eq!(c.lease_holders(), [new]);
    // Healing: the old leader rejoins as a follower and does not disrupt the new term.
    c.heal();
    c.run(30);
    assert_eq!(sole_leader(&c), Some(new));
    assert!(c.violations.is_empty(), "{:?}", c.violations);
}

#[test]
fn a_minority_partition_cannot_elect_and_does_not_disrupt_on_return() {
    let mut c = Cluster::new(&IDS, &base(), seed(3));
    c.run_until(100, |c| sole_leader(c).is_some())
        .expect("first leader");
    let leader = sole_leader(&c).expect("leader");
    let follower = *IDS.iter().find(|&&i| i != leader).expect("follower");
    let term = c.node(leader).expect("node").term();
    c.isolate(follower);
    c.run(200);
    let f = c.node(follower).expect("node");
    assert_ne!(f.role(), Role::Leader);
    assert_eq!(f.term(), term, "pre-vote keeps the isolated node's term");
    c.heal();
    c.run(30);
    assert_eq!(sole_leader(&c), Some(leader), "no needless re-election");
    assert_eq!(c.node(leader).expect("node").term(), term);
    assert!(c.violations.is_empty(), "{:?}", c.violations);
}

#[test]
fn restarting_every_node_keeps_votes_and_elects_again() {
    let mut c = Cluster::new(&IDS, &base(), seed(11));
    c.run_until(100, |c| sole_leader(c).is_some())
        .expect("first leader");
    for id in IDS {
        c.restart(id);
    }
    c.run_until(200, |c| sole_leader(c).is_some())
        .expect("a leader after a full restart");
    assert!(c.violations.is_empty(), "{:?}", c.violations);
}

/// Random faults over many seeds: drops, duplicates, delays (reordering), flapping
/// partitions and restarts. The harness checks the safety invariants after every step.
#[test]
fn random_faults_never_break_safety_and_the_site_recovers() {
    let first = seed(1000);
    let runs = 40;
    let mut elections = 0;
    for s in first..first + runs {
        let mut c = Cluster::new(&IDS, &base(), s);
        let mut r = fogline_cluster::rng::SplitMix64::new(s ^ 0xfeed);
        c.set_default_drop(0.2);
        c.set_duplicate(0.1);
        c.set_max_delay(3);
        for round in 0..20 {
            match r.in_range(0, 5) {
                0 => c.isolate(r.in_range(1, 3)),
                1 => c.partition(&[1], &[2]),
                2 => c.restart(r.in_range(1, 3)),
                _ => c.heal(),
            }
            c.run(r.in_range(5, 40));
            assert!(
                c.violations.is_empty(),
                "seed {s}, round {round}: {:?}",
                c.violations
            );
        }
        // Then a healthy network: the site must settle on one leader.
        c.heal();
        c.set_default_drop(0.0);
        c.set_duplicate(0.0);
        c.set_max_delay(0);
        c.run_until(200, |c| sole_leader(c).is_some())
            .unwrap_or_else(|| panic!("seed {s}: no leader 200 ticks after healing"));
        elections += c
            .ids()
            .iter()
            .filter_map(|&i| c.node(i))
            .map(|n| n.term())
            .max()
            .unwrap_or(0);
        assert!(c.violations.is_empty(), "seed {s}: {:?}", c.violations);
    }
    println!("{runs} runs from seed {first}: {elections} terms in total");
    assert!(elections > runs, "faults should force re-elections");
}
