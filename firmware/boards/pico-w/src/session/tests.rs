//! The device loop against a scripted broker, in logical time.

use core::cell::RefCell;
use std::vec::Vec;

use fogline_firmware::node::{Node, NodeConfig, Slot};

use super::*;
use crate::testing::{drive, Broker, FakeClock, FakeConnector, FakeSensor, NoDelay, RecordingLed};

const BOOT: u32 = 0xB007;
const PERIOD_MS: u64 = 10_000;

struct Run {
    broker: Broker,
    node_acked: u32,
    node_last_seq: u32,
    node_pending: usize,
    sampled: u64,
    dropped: u64,
    sensor_errors: u64,
    resend_timeouts: u64,
    link: LinkStats,
    led: Vec<LedState>,
}

/// Runs a device with a 10 s period and a 64-slot ring against `broker` for `for_ms`,
/// with the sensor failing during `sensor_fails` (ms range).
fn run_device(broker: Broker, for_ms: u64, sensor_fails: core::ops::Range<u64>) -> Run {
    let broker = RefCell::new(broker);
    let clock = FakeClock::default();
    let config = NodeConfig {
        sample_period_ms: PERIOD_MS,
        max_in_flight: 8,
        resend_after_ms: 30_000,
        ..NodeConfig::new("pico-1", BOOT)
    };
    let node = Node::new(config, [Slot::EMPTY; 64]).expect("valid node config");
    let sensor = FakeSensor {
        clock: &clock,
        fails_ms: sensor_fails,
        taken: 0,
    };
    let mut device: Device<_, _, _, 2> = Device::new(node, sensor, NoDelay, LinkConfig::default());
    let mut connector = FakeConnector {
        broker: &broker,
        clock: &clock,
    };
    let mut led = RecordingLed::default();
    // The same "random" number every time: delays are the middle of their range.
    let mut random = || 0x8000_0000u32;
    let fut = run(&mut device, &mut connector, &clock, &mut led, &mut random);
    assert!(drive(fut, &clock, for_ms).is_none(), "run never returns");
    let stats = *device.node.stats();
    Run {
        node_acked: device.node.acked(),
        node_last_seq: device.node.last_seq(),
        node_pending: device.node.pending(),
        sampled: stats.sampled,
        dropped: stats.dropped,
        sensor_errors: stats.sensor_errors,
        resend_timeouts: stats.resend_timeouts,
        link: *device.link_stats(),
        led: led.shown,
        broker: broker.into_inner(),
    }
}

/// The agent holds sequence numbers 1..=n of this boot, each once, with no holes; their
/// readings are in the order they were taken (the fake sensor counts up); a re-send is
/// always the same reading; and every reading taken is stored and acked, still held by
/// the node, or counted as dropped from a full ring.
fn assert_exactly_once(run: &Run) {
    let seqs: Vec<(u32, u32)> = run.broker.stored.keys().copied().collect();
    let n = seqs.len() as u32;
    let want: Vec<(u32, u32)> = (1..=n).map(|s| (BOOT, s)).collect();
    assert_eq!(seqs, want, "sequence numbers 1..=n, once each");
    let values: Vec<f64> = run.broker.stored.values().copied().collect();
    assert!(values.windows(2).all(|w| w[0] < w[1]), "in sampling order");
    if run.dropped == 0 {
        let taken: Vec<f64> = (1..=n).map(f64::from).collect();
        assert_eq!(values, taken, "without drops, seq k is the k-th reading");
    }
    assert_eq!(
        run.broker.conflicting_resends, 0,
        "a re-send is the same reading"
    );
    assert!(
        n >= run.node_acked && n <= run.node_last_seq,
        "stored {n}, acked {}, last seq {}",
        run.node_acked,
        run.node_last_seq
    );
    assert_eq!(
        run.sampled,
        u64::from(run.node_acked) + run.node_pending as u64 + run.dropped,
        "every reading is acked, held, or counted as dropped"
    );
    assert_eq!(run.broker.publishes_before_subscribe, 0);
}

#[test]
fn readings_reach_the_agent_in_order_and_are_acked() {
    let run = run_device(Broker::acking(), 600_000, 0..0);
    // A sample at 0 s, then every 10 s: 61 in 600 s (the one at 600 s included).
    assert_eq!(run.sampled, 61);
    assert_eq!(run.node_last_seq, 61);
    assert_eq!(run.node_acked, 61);
    assert_eq!(run.node_pending, 0);
    assert_exactly_once(&run);
    // Sent once each, in sequence order.
    let seqs: Vec<u32> = run.broker.received.iter().map(|r| r.2).collect();
    assert_eq!(seqs, (1..=61).collect::<Vec<_>>());
    assert!(run
        .broker
        .received
        .iter()
        .all(|r| r.0 == "sensors/pico-1/temperature"));
    assert_eq!(run.broker.connections, 1);
    assert_eq!(run.broker.subscriptions, ["fogline/ack/pico-1"]);
    assert_eq!(run.led, [LedState::Online]);
}

#[test]
fn broken_connections_lose_and_duplicate_nothing_at_the_agent() {
    // (publishes per connection, connects that fail in between)
    let table = [(1u32, 0u32), (3, 0), (5, 2), (2, 7)];
    for (per_connection, failing_connects) in table {
        let broker = Broker {
            drop_after_publishes: Some(per_connection),
            fail_connects: failing_connects,
            ..Broker::acking()
        };
        let run = run_device(broker, 900_000, 0..0);
        assert_exactly_once(&run);
        assert!(run.broker.connections > 1, "{per_connection}: reconnected");
        assert_eq!(
            run.broker.connections,
            run.broker.subscriptions.len() as u32
        );
        // Each connection got at least its first publish through, and the retained ack
        // at the next subscribe moved the watermark past it.
        assert!(
            u64::from(run.node_acked) + 1 >= u64::from(run.broker.connections),
            "{per_connection}: acked {} over {} connections",
            run.node_acked,
            run.broker.connections
        );
        assert_eq!(run.link.connect_failures, u64::from(failing_connects));
    }
}

#[test]
fn readings_taken_while_the_agent_is_unreachable_are_kept_and_sent_later() {
    // 12 failed attempts: with backoff 1, 2, 4 ... 60 s (middle of the jitter) the device
    // is offline for several minutes.
    let broker = Broker {
        fail_connects: 12,
        ..Broker::acking()
    };
    let run = run_device(broker, 1_200_000, 0..0);
    let first_connect = run.broker.attempt_times[12];
    assert!(first_connect > 300_000, "offline until {first_connect} ms");
    // Sampling never stopped: one reading per period over the whole run.
    assert_eq!(run.sampled, 121);
    assert_exactly_once(&run);
    assert_eq!(run.node_acked, 121);
    assert_eq!(
        run.led.first(),
        Some(&LedState::ConnectingToAgent),
        "slow blink while the agent is unreachable"
    );
    assert_eq!(run.led.last(), Some(&LedState::Online));
}

#[test]
fn sampling_goes_on_while_a_connection_attempt_takes_long() {
    // Joining Wi-Fi and connecting takes 45 s per attempt.
    let broker = Broker {
        connect_takes_ms: 45_000,
        fail_connects: 1,
        ..Broker::acking()
    };
    let run = run_device(broker, 300_000, 0..0);
    assert_eq!(run.sampled, 31);
    assert_exactly_once(&run);
    assert_eq!(run.node_acked, 31);
}

#[test]
fn reconnect_attempts_back_off_exponentially_up_to_the_ceiling() {
    let broker = Broker {
        fail_connects: 10,
        ..Broker::acking()
    };
    let run = run_device(broker, 1_000_000, 0..0);
    let gaps: Vec<u64> = run
        .broker
        .attempt_times
        .windows(2)
        .map(|w| w[1] - w[0])
        .collect();
    // The delays the backoff gives for the same random number each time (the backoff's
    // own tests check its numbers), give or take nothing: the attempts take no time here.
    let link = LinkConfig::default();
    let mut backoff = Backoff::new(
        link.backoff_first_ms,
        link.backoff_max_ms,
        link.stable_after_ms,
    );
    let want: Vec<u64> = (0..10)
        .map(|_| backoff.on_failure(0, 0x8000_0000))
        .collect();
    assert_eq!(gaps, want);
    assert!(want.windows(2).all(|w| w[1] >= w[0]), "growing: {want:?}");
    assert!(want[9] <= link.backoff_max_ms && want[9] > link.backoff_max_ms / 2);
    assert_eq!(run.broker.connections, 1, "connected at the 11th attempt");
}

#[test]
fn a_busy_client_holds_frames_until_pubacks_free_room() {
    // Offline for about a minute first, so a backlog waits when the connection comes up.
    let broker = Broker {
        puback_window: Some(1),
        fail_connects: 7,
        ..Broker::acking()
    };
    let run = run_device(broker, 600_000, 0..0);
    assert!(run.link.busy > 0, "the window filled at least once");
    assert_exactly_once(&run);
    assert_eq!(run.node_acked, 61);
}

#[test]
fn without_acks_in_flight_readings_are_resent_and_stored_once() {
    // The agent stores but never acks: the node re-sends its window every 30 s.
    let broker = Broker {
        acking: false,
        ..Broker::default()
    };
    let run = run_device(broker, 200_000, 0..0);
    assert!(
        run.resend_timeouts >= 5,
        "resend timeouts: {}",
        run.resend_timeouts
    );
    assert!(
        run.broker.received.len() > run.broker.stored.len(),
        "re-sends happened"
    );
    assert_exactly_once(&run);
    assert_eq!(run.node_acked, 0);
    // At most max_in_flight (8) numbered; the rest wait unnumbered in the ring.
    assert_eq!(run.node_last_seq, 8);
    assert_eq!(run.node_pending, 21);
}

#[test]
fn the_led_shows_a_failing_sensor_and_its_recovery() {
    let run = run_device(Broker::acking(), 120_000, 30_000..60_000);
    assert_eq!(
        run.led,
        [LedState::Online, LedState::SensorFault, LedState::Online]
    );
    assert_eq!(run.sensor_errors, 3);
    assert_eq!(run.sampled, 13 - 3);
    assert_exactly_once(&run);
}
