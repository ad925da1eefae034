use super::*;
use crate::sensor::{metric, sample_of, Sample};
use crate::wire::decode;
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::string::{String, ToString};
use std::vec::Vec;

/// A publisher that keeps every frame and can be told to refuse.
#[derive(Default)]
struct Recorder {
    sent: Vec<(String, Vec<u8>)>,
    refuse: bool,
}

impl Publisher for Recorder {
    type Error = &'static str;

    fn publish(&mut self, topic: &str, payload: &[u8]) -> Result<(), Self::Error> {
        if self.refuse {
            return Err("queue full");
        }
        self.sent.push((topic.to_string(), payload.to_vec()));
        Ok(())
    }
}

impl Recorder {
    /// Sequence numbers of what was published, in order.
    fn seqs(&self) -> Vec<u32> {
        self.sent
            .iter()
            .map(|(_, p)| decode(p).expect("valid frame").seq)
            .collect()
    }

    fn take(&mut self) -> Vec<(String, Vec<u8>)> {
        core::mem::take(&mut self.sent)
    }
}

struct NoDelay;

impl embedded_hal::delay::DelayNs for NoDelay {
    fn delay_ns(&mut self, _ns: u32) {}
}

/// A sensor that returns a scripted result per call.
struct Scripted(Vec<Result<Sample, ()>>);

impl Sensor<NoDelay> for Scripted {
    type Error = ();

    fn sample(&mut self, _delay: &mut NoDelay) -> Result<Sample, ()> {
        if self.0.is_empty() {
            Err(())
        } else {
            self.0.remove(0)
        }
    }
}

const BOOT: u32 = 7;

fn at(uptime_ms: u64) -> Now {
    Now {
        uptime_ms,
        wall_ms: Some(1_700_000_000_000 + uptime_ms),
    }
}

fn node(ring: usize, max_in_flight: usize) -> Node<Vec<Slot>> {
    let config = NodeConfig {
        max_in_flight,
        sample_period_ms: 1000,
        resend_after_ms: 5000,
        ..NodeConfig::new("dev-1", BOOT)
    };
    Node::new(config, std::vec![Slot::EMPTY; ring]).expect("valid config")
}

fn one(value: f64) -> [Measurement; 1] {
    [Measurement::new(metric::TEMPERATURE, value)]
}

fn ack(seq: u32) -> Ack {
    Ack { boot: BOOT, seq }
}

#[test]
fn readings_are_numbered_from_one_when_first_published() {
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.record(at(0), &one(1.0));
    n.record(at(1), &one(2.0));
    assert_eq!(n.last_seq(), 0, "no number before the first publish");
    assert_eq!(n.flush(2, &mut out), Ok(0), "not connected yet");
    n.on_connected(3);
    assert_eq!(n.flush(3, &mut out), Ok(2));
    assert_eq!(out.seqs(), [1, 2]);
    let (topic, frame) = &out.sent[0];
    assert_eq!(topic, "sensors/dev-1/temperature");
    let r = decode(frame).expect("valid frame");
    assert_eq!((r.device, r.boot, r.value), ("dev-1", BOOT, 1.0));
    assert_eq!(r.time, Timestamp::WallMs(1_700_000_000_000));
    assert_eq!((n.last_seq(), n.in_flight(), n.pending()), (2, 2, 2));
}

#[test]
fn an_ack_frees_everything_up_to_the_watermark_and_nothing_above() {
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    for v in 0..5 {
        n.record(at(v), &one(v as f64));
    }
    n.flush(5, &mut out).expect("publishes");
    assert_eq!(n.on_ack(ack(3), 6), AckOutcome::Advanced(3));
    assert_eq!((n.acked(), n.pending(), n.in_flight()), (3, 2, 2));
    assert_eq!(n.on_ack(ack(3), 7), AckOutcome::Stale);
    assert_eq!(
        n.on_ack(ack(2), 7),
        AckOutcome::Stale,
        "a lower watermark is ignored"
    );
    assert_eq!(
        n.on_ack(
            Ack {
                boot: BOOT + 1,
                seq: 5
            },
            7
        ),
        AckOutcome::OtherBoot
    );
    assert_eq!(n.on_ack(ack(5), 8), AckOutcome::Advanced(2));
    assert!(n.is_drained());
}

#[test]
fn a_reconnect_resends_everything_above_the_watermark_oldest_first() {
    let mut n = node(16, 16);
    let mut out = Recorder::default();
    n.on_connected(0);
    for v in 0..6 {
        n.record(at(v), &one(v as f64));
    }
    n.flush(6, &mut out).expect("publishes");
    n.on_ack(ack(2), 7);
    n.on_disconnected();
    // Sampled while the link was down: published after the re-sends.
    n.record(at(8), &one(6.0));
    assert_eq!(n.flush(9, &mut out), Ok(0));
    out.take();
    n.on_connected(10);
    assert_eq!(n.flush(10, &mut out), Ok(5));
    assert_eq!(out.seqs(), [3, 4, 5, 6, 7]);
    let values: Vec<f64> = out
        .sent
        .iter()
        .map(|(_, p)| decode(p).expect("frame").value)
        .collect();
    assert_eq!(
        values,
        [2.0, 3.0, 4.0, 5.0, 6.0],
        "same number, same reading"
    );
    assert_eq!(n.stats().resent, 4);
    assert_eq!(n.stats().connects, 2);
}

#[test]
fn the_in_flight_window_bounds_unacked_publishes() {
    let mut n = node(16, 3);
    let mut out = Recorder::default();
    n.on_connected(0);
    for v in 0..10 {
        n.record(at(v), &one(v as f64));
    }
    assert_eq!(n.flush(10, &mut out), Ok(3));
    assert!(!n.wants_flush());
    n.on_ack(ack(2), 11);
    assert!(n.wants_flush());
    assert_eq!(n.flush(11, &mut out), Ok(2));
    assert_eq!(out.seqs(), [1, 2, 3, 4, 5]);
}

#[test]
fn a_full_ring_drops_the_oldest_unpublished_reading_and_counts_it() {
    let mut n = node(4, 2);
    let mut out = Recorder::default();
    n.on_connected(0);
    for v in 0..4 {
        n.record(at(v), &one(v as f64));
    }
    n.flush(4, &mut out)
        .expect("publishes 0.0 and 1.0 as 1 and 2");
    n.on_disconnected();
    // Full: 2 in flight, 2.0 and 3.0 waiting. New readings push out the oldest waiting one.
    n.record(at(5), &one(4.0));
    n.record(at(6), &one(5.0));
    assert_eq!(n.stats().dropped, 2);
    n.on_connected(7);
    out.take();
    n.flush(7, &mut out).expect("re-sends");
    n.on_ack(ack(2), 8);
    n.flush(8, &mut out).expect("publishes");
    let sent: Vec<(u32, f64)> = out
        .sent
        .iter()
        .map(|(_, p)| decode(p).expect("frame"))
        .map(|r| (r.seq, r.value))
        .collect();
    // The numbers have no hole: 3 and 4 went to the readings that were kept.
    assert_eq!(sent, [(1, 0.0), (2, 1.0), (3, 4.0), (4, 5.0)]);
}

#[test]
fn a_ring_full_of_in_flight_readings_drops_the_new_reading() {
    let mut n = node(2, 2);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(at(0), &one(0.0));
    n.record(at(1), &one(1.0));
    n.flush(2, &mut out).expect("publishes");
    assert_eq!(n.record(at(3), &one(2.0)), 0);
    assert_eq!((n.stats().dropped, n.pending(), n.in_flight()), (1, 2, 2));
}

#[test]
fn a_publish_error_stops_the_flush_and_the_reading_is_sent_later() {
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(at(0), &one(0.0));
    n.record(at(1), &one(1.0));
    out.refuse = true;
    assert_eq!(n.flush(2, &mut out), Err("queue full"));
    assert_eq!(n.stats().published, 0);
    out.refuse = false;
    assert_eq!(n.flush(3, &mut out), Ok(2));
    assert_eq!(out.seqs(), [1, 2]);
    assert_eq!(n.stats().resent, 0, "the refused publish never went out");
}

#[test]
fn without_ack_progress_the_in_flight_readings_are_sent_again() {
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(at(0), &one(0.0));
    n.record(at(0), &one(1.0));
    n.flush(0, &mut out).expect("publishes");
    assert_eq!(n.resend_at(), Some(5000));
    assert_eq!(n.flush(4999, &mut out), Ok(0));
    n.on_ack(ack(1), 3000);
    assert_eq!(n.resend_at(), Some(8000), "progress restarts the timer");
    assert_eq!(n.flush(7999, &mut out), Ok(0));
    out.take();
    assert_eq!(n.flush(8000, &mut out), Ok(1));
    assert_eq!(out.seqs(), [2]);
    assert_eq!((n.stats().resend_timeouts, n.stats().resent), (1, 1));
}

#[test]
fn an_ack_above_everything_published_renumbers_above_it() {
    // The previous boot used the same boot id and got as far as 100.
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(at(0), &one(0.0));
    n.record(at(0), &one(1.0));
    n.flush(0, &mut out).expect("publishes 1 and 2");
    assert_eq!(n.on_ack(ack(100), 1), AckOutcome::Renumbered);
    assert_eq!((n.acked(), n.pending()), (100, 2));
    out.take();
    n.flush(2, &mut out).expect("publishes");
    assert_eq!(out.seqs(), [101, 102]);
    n.on_ack(ack(102), 3);
    assert!(n.is_drained());
    assert_eq!(n.stats().bad_acks, 1);
}

#[test]
fn ack_payloads_are_parsed_and_garbage_is_counted() {
    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(at(0), &one(0.0));
    n.flush(0, &mut out).expect("publishes");
    assert_eq!(
        n.on_ack_payload(br#"{"boot":7,"seq":1}"#, 1),
        Ok(AckOutcome::Advanced(1))
    );
    assert!(n.on_ack_payload(b"garbage", 2).is_err());
    assert_eq!(n.stats().bad_acks, 1);
    assert_eq!(n.ack_topic(), "fogline/ack/dev-1");
}

#[test]
fn an_unset_wall_clock_stamps_uptime_instead() {
    let unset = Now {
        uptime_ms: 5000,
        wall_ms: Some(5000),
    };
    assert_eq!(unset.timestamp(), Timestamp::BootMs(5000));
    let none = Now {
        uptime_ms: 42,
        wall_ms: None,
    };
    assert_eq!(none.timestamp(), Timestamp::BootMs(42));
    let set = Now {
        uptime_ms: 42,
        wall_ms: Some(CLOCK_SET_AFTER_MS),
    };
    assert_eq!(set.timestamp(), Timestamp::WallMs(CLOCK_SET_AFTER_MS));

    let mut n = node(8, 8);
    let mut out = Recorder::default();
    n.on_connected(0);
    n.record(unset, &one(1.0));
    n.flush(5000, &mut out).expect("publishes");
    assert_eq!(
        decode(&out.sent[0].1).expect("frame").time,
        Timestamp::BootMs(5000)
    );
}

#[test]
fn non_finite_values_and_bad_metric_names_are_refused() {
    let mut n = node(8, 8);
    let kept = n.record(
        at(0),
        &[
            Measurement::new("temperature", f64::NAN),
            Measurement::new("temperature", f64::INFINITY),
            Measurement::new("bad/name", 1.0),
            Measurement::new("", 1.0),
            Measurement::new("ok", 1.0),
        ],
    );
    assert_eq!((kept, n.stats().invalid, n.pending()), (1, 4, 1));
}

#[test]
fn samples_follow_the_schedule_and_skip_what_was_missed() {
    let mut n = node(64, 8);
    let reading = || Ok(sample_of(one(1.0)));
    let mut sensor = Scripted((0..10).map(|_| reading()).collect());
    let mut d = NoDelay;
    assert_eq!(
        n.sample_if_due(at(500), &mut sensor, &mut d),
        Ok(1),
        "first is due at once"
    );
    assert_eq!(n.next_sample_at(), Some(1500));
    assert_eq!(n.sample_if_due(at(1499), &mut sensor, &mut d), Ok(0));
    assert_eq!(n.sample_if_due(at(1500), &mut sensor, &mut d), Ok(1));
    // The loop stalled for 3.2 s: no burst of stale samples, the missed slots are counted.
    assert_eq!(n.sample_if_due(at(5700), &mut sensor, &mut d), Ok(1));
    assert_eq!(n.next_sample_at(), Some(6700));
    assert_eq!(n.stats().skipped_samples, 3);
    assert_eq!(n.pending(), 3);
}

#[test]
fn a_load_generator_catches_up_on_missed_samples() {
    let config = NodeConfig {
        sample_period_ms: 10,
        max_catch_up: 100,
        ..NodeConfig::new("gen", 1)
    };
    let mut n = Node::new(config, std::vec![Slot::EMPTY; 64]).expect("valid");
    let mut sensor = Scripted((0..64).map(|_| Ok(sample_of(one(1.0)))).collect());
    let mut d = NoDelay;
    n.sample_if_due(at(0), &mut sensor, &mut d).expect("first");
    // 50 ms late: the five overdue samples are taken back-to-back.
    let mut taken = 0;
    while n.sample_due(55) {
        taken += n
            .sample_if_due(at(55), &mut sensor, &mut d)
            .expect("sample");
        assert!(taken <= 10, "bounded");
    }
    assert_eq!((taken, n.stats().skipped_samples), (5, 0));
}

#[test]
fn sensor_errors_are_counted_and_the_schedule_moves_on() {
    let mut n = node(8, 8);
    let mut sensor = Scripted(std::vec![Err(()), Ok(sample_of(one(2.0)))]);
    let mut d = NoDelay;
    assert_eq!(n.sample_if_due(at(0), &mut sensor, &mut d), Err(()));
    assert_eq!(
        n.sample_if_due(at(500), &mut sensor, &mut d),
        Ok(0),
        "not retried early"
    );
    assert_eq!(n.sample_if_due(at(1000), &mut sensor, &mut d), Ok(1));
    assert_eq!(n.stats().sensor_errors, 1);
}

#[test]
fn bad_configs_are_refused() {
    let slots = || std::vec![Slot::EMPTY; 4];
    let bad_device = NodeConfig::new("no/slash", 1);
    assert_eq!(
        Node::new(bad_device, slots()).err(),
        Some(ConfigError::InvalidDevice)
    );
    let ok = NodeConfig::new("d", 1);
    assert_eq!(
        Node::new(ok, Vec::new()).err(),
        Some(ConfigError::EmptyRing)
    );
    let zero = NodeConfig {
        max_in_flight: 0,
        ..ok
    };
    assert_eq!(
        Node::new(zero, slots()).err(),
        Some(ConfigError::ZeroInFlight)
    );
    let zero = NodeConfig {
        sample_period_ms: 0,
        ..ok
    };
    assert_eq!(
        Node::new(zero, slots()).err(),
        Some(ConfigError::ZeroPeriod)
    );
}

#[test]
fn a_fixed_array_works_as_storage() {
    let mut n = Node::new(NodeConfig::new("mcu", 3), [Slot::EMPTY; 4]).expect("valid");
    assert_eq!(n.capacity(), 4);
    n.record(at(0), &one(1.0));
    assert_eq!(n.pending(), 1);
}

/// The agent as the node sees it: stores each (seq) once, acks the contiguous watermark.
#[derive(Default)]
struct ModelAgent {
    stored: BTreeMap<u32, (u64, u64)>,
    conflicting: u32,
}

impl ModelAgent {
    fn receive(&mut self, frame: &[u8]) {
        let r = decode(frame).expect("the node only sends valid frames");
        let content = (
            r.value.to_bits(),
            match r.time {
                Timestamp::WallMs(t) | Timestamp::BootMs(t) => t,
            },
        );
        match self.stored.get(&r.seq) {
            Some(c) if *c != content => self.conflicting += 1,
            Some(_) => {}
            None => {
                self.stored.insert(r.seq, content);
            }
        }
    }

    fn watermark(&self) -> u32 {
        let mut w = 0;
        while self.stored.contains_key(&(w + 1)) {
            w += 1;
        }
        w
    }
}

#[derive(Debug, Clone)]
enum Op {
    Sample(u8),
    Flush,
    /// Deliver the frames in flight to the agent (a random share of them is lost).
    Deliver(u8),
    Ack,
    Disconnect,
    Connect,
    Refuse(bool),
    Wait(u16),
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (1u8..4).prop_map(Op::Sample),
        4 => Just(Op::Flush),
        3 => (0u8..=100).prop_map(Op::Deliver),
        3 => Just(Op::Ack),
        1 => Just(Op::Disconnect),
        1 => Just(Op::Connect),
        1 => any::<bool>().prop_map(Op::Refuse),
        1 => (0u16..8000).prop_map(Op::Wait),
    ]
}

proptest! {
    /// Whatever happens to the link, the agent never sees one number with two readings,
    /// the numbers it ends up with have no holes, and every reading that was not counted
    /// as dropped gets delivered once the link is good again.
    #[test]
    fn every_kept_reading_arrives_once_under_any_schedule_of_failures(
        ops in proptest::collection::vec(op(), 1..200),
        ring in 1usize..12,
        window in 1usize..12,
    ) {
        let mut n = node(ring, window);
        let mut agent = ModelAgent::default();
        let mut wire: Vec<Vec<u8>> = Vec::new();
        let mut out = Recorder::default();
        let mut now = 0u64;
        let mut value = 0.0;
        for op in ops {
            now += 1;
            match op {
                Op::Sample(k) => {
                    for _ in 0..k {
                        value += 1.0;
                        n.record(at(now), &one(value));
                    }
                }
                Op::Flush => {
                    let _ = n.flush(now, &mut out);
                    wire.extend(out.take().into_iter().map(|(_, p)| p));
                }
                Op::Deliver(keep_pct) => {
                    for (i, frame) in wire.drain(..).enumerate() {
                        if (i * 37 % 100) < usize::from(keep_pct) {
                            agent.receive(&frame);
                        }
                    }
                }
                Op::Ack => { n.on_ack(ack(agent.watermark()), now); }
                Op::Disconnect => { n.on_disconnected(); wire.clear(); }
                Op::Connect => n.on_connected(now),
                Op::Refuse(r) => out.refuse = r,
                Op::Wait(ms) => now += u64::from(ms),
            }
            prop_assert!(n.pending() <= ring);
            prop_assert!(n.in_flight() <= window);
            let s = n.stats();
            prop_assert_eq!(s.sampled - s.dropped, u64::from(n.acked()) + n.pending() as u64);
        }
        // Then the link is good until everything is acked (bounded).
        out.refuse = false;
        n.on_disconnected();
        n.on_connected(now);
        for _ in 0..(4 * ring + 4) {
            n.flush(now, &mut out).expect("accepting publisher");
            for (_, frame) in out.take() {
                agent.receive(&frame);
            }
            n.on_ack(ack(agent.watermark()), now);
            if n.is_drained() {
                break;
            }
        }
        prop_assert!(n.is_drained(), "pending {} after draining", n.pending());
        prop_assert_eq!(agent.conflicting, 0);
        let last = n.last_seq();
        prop_assert_eq!(agent.watermark(), last);
        prop_assert_eq!(agent.stored.len() as u32, last, "no numbers above the last one");
        let s = n.stats();
        prop_assert_eq!(s.sampled - s.dropped, u64::from(last), "taken = delivered + dropped");
    }
}
