//! Turning an MQTT publish on `sensors/<device>/<metric>` into a validated reading.
//!
//! Pure and synchronous: no I/O, no clock (the caller passes the arrival time). Three
//! payload forms are accepted — the firmware's postcard frame (first byte is the frame
//! version), a JSON object, or a plain number — and everything else is refused with a
//! [`Reject`] reason that the caller counts and logs.

use std::fmt;

use fogline_firmware::wire;
use serde::Deserialize;

/// Topic prefix sensors publish under.
pub const SENSOR_PREFIX: &str = "sensors/";
/// Subscription filter for everything sensors publish.
pub const SENSOR_FILTER: &str = "sensors/#";

/// A reading that passed validation, not yet stamped with an offset.
#[derive(Debug, Clone, PartialEq)]
pub struct Incoming {
    pub device: String,
    pub metric: String,
    pub boot: u32,
    /// `None` for readings without a sequence number (plain numbers, JSON without `seq`):
    /// those are stored but cannot be deduplicated or acknowledged.
    pub seq: Option<u32>,
    pub time: DeviceTime,
    pub value: f64,
    /// Agent wall clock at arrival, Unix milliseconds.
    pub received_ms: i64,
}

/// What the device said about when it sampled the value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceTime {
    /// Unix milliseconds from a clock that looks set.
    Wall(i64),
    /// Milliseconds since the device booted (or a wall clock that was never set).
    SinceBoot(u64),
    /// Nothing: the arrival time is used.
    Unknown,
    /// A wall time more than [`MAX_CLOCK_AHEAD_MS`] ahead of the agent's clock: a device
    /// clock that is wrong. The arrival time is used (counted).
    Ahead(i64),
}

/// How far ahead of the agent's clock a device's wall time may be and still be believed.
/// Beyond it the reading keeps its arrival time: a window far in the future would stay
/// open (and in memory) until that time comes.
pub const MAX_CLOCK_AHEAD_MS: i64 = 10 * 60 * 1000;

/// Why a publish was refused. Each has its own counter label.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reject {
    MalformedTopic,
    InvalidId,
    Oversized,
    MalformedPayload,
    NonFinite,
    UnsupportedVersion,
    TopicMismatch,
    /// More than `limits.device_rate` readings/s (after the burst) from one device.
    RateLimited,
    /// A new device beyond `limits.max_devices`.
    TooManyDevices,
    /// A JSON reading with `seq` but no `boot`: after a reboot its numbers start again at
    /// 1 under the same (missing) boot id and would be taken for re-sends.
    SeqWithoutBoot,
    /// The reading would open more gaps in its boot's sequence numbers than the agent
    /// keeps track of (`buffer::seq::MAX_RANGES`); the device sends it again later.
    TooManyGaps,
    /// A sequence number implausibly far above the highest stored for its boot.
    SeqJump,
}

impl Reject {
    pub const ALL: [Reject; 12] = [
        Reject::MalformedTopic,
        Reject::InvalidId,
        Reject::Oversized,
        Reject::MalformedPayload,
        Reject::NonFinite,
        Reject::UnsupportedVersion,
        Reject::TopicMismatch,
        Reject::RateLimited,
        Reject::TooManyDevices,
        Reject::SeqWithoutBoot,
        Reject::TooManyGaps,
        Reject::SeqJump,
    ];

    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Reject::MalformedTopic => "malformed_topic",
            Reject::InvalidId => "invalid_id",
            Reject::Oversized => "oversized",
            Reject::MalformedPayload => "malformed_payload",
            Reject::NonFinite => "non_finite",
            Reject::UnsupportedVersion => "unsupported_version",
            Reject::TopicMismatch => "topic_mismatch",
            Reject::RateLimited => "rate_limited",
            Reject::TooManyDevices => "too_many_devices",
            Reject::SeqWithoutBoot => "seq_without_boot",
            Reject::TooManyGaps => "seq_gaps",
            Reject::SeqJump => "seq_jump",
        }
    }

    /// A refusal that may not hold when the reading comes again (a rate, a cap, a gap
    /// that fills): the reading must never be acknowledged, so that the device keeps it
    /// and sends it again. Other refusals are about the reading itself and never change.
    pub fn is_temporary(self) -> bool {
        matches!(
            self,
            Reject::RateLimited | Reject::TooManyDevices | Reject::TooManyGaps | Reject::SeqJump
        )
    }

    fn explain(self) -> &'static str {
        match self {
            Reject::MalformedTopic => "topic must be sensors/<device>/<metric>",
            Reject::InvalidId => "device and metric must be 1-32 characters of [A-Za-z0-9_.-]",
            Reject::Oversized => "payload is larger than ingest.max_payload_bytes",
            Reject::MalformedPayload => {
                "payload is neither a fogline frame, a JSON object with a numeric \"value\", nor a number"
            }
            Reject::NonFinite => "value is NaN or infinite",
            Reject::UnsupportedVersion => "binary frame with an unknown version byte",
            Reject::TopicMismatch => "frame's device/metric differ from the topic's",
            Reject::RateLimited => "device publishes faster than limits.device_rate",
            Reject::TooManyDevices => "a new device beyond limits.max_devices",
            Reject::SeqWithoutBoot => {
                "a JSON reading with \"seq\" must carry \"boot\" (a new id at every boot), \
                 or numbers that restart at 1 after a reboot would look like re-sends"
            }
            Reject::TooManyGaps => {
                "too many sequence numbers of this boot are missing below it; send the \
                 missing ones first (it is not acknowledged and will be taken later)"
            }
            Reject::SeqJump => {
                "sequence number far above the highest stored for this boot (not \
                 acknowledged)"
            }
        }
    }
}

impl fmt::Display for Reject {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.as_str(), self.explain())
    }
}

/// The JSON form: `{"value": 21.5, "seq": 5, "boot": 1, "ts": 1700000000000}`.
/// Unknown fields (a unit, a label) are ignored.
#[derive(Deserialize)]
struct JsonReading {
    value: f64,
    #[serde(default)]
    seq: Option<u32>,
    #[serde(default)]
    boot: Option<u32>,
    /// Unix milliseconds; below 2001 it is taken as time since boot.
    #[serde(default)]
    ts: Option<u64>,
    /// Milliseconds since boot, for devices that know no wall time.
    #[serde(default)]
    uptime_ms: Option<u64>,
}

/// Splits `sensors/<device>/<metric>` into its ids.
pub fn parse_topic(topic: &str) -> Result<(&str, &str), Reject> {
    let rest = topic
        .strip_prefix(SENSOR_PREFIX)
        .ok_or(Reject::MalformedTopic)?;
    let mut parts = rest.split('/');
    let (Some(device), Some(metric), None) = (parts.next(), parts.next(), parts.next()) else {
        return Err(Reject::MalformedTopic);
    };
    if !wire::valid_id(device) || !wire::valid_id(metric) {
        return Err(Reject::InvalidId);
    }
    Ok((device, metric))
}

fn time_from_wall(ms: u64, received_ms: i64) -> DeviceTime {
    if ms < wire::CLOCK_SET_AFTER_MS {
        return DeviceTime::SinceBoot(ms);
    }
    let ms = i64::try_from(ms).unwrap_or(i64::MAX);
    if ms > received_ms.saturating_add(MAX_CLOCK_AHEAD_MS) {
        DeviceTime::Ahead(ms)
    } else {
        DeviceTime::Wall(ms)
    }
}

/// Validates one publish. `max_payload` is `ingest.max_payload_bytes`.
pub fn parse(
    topic: &[u8],
    payload: &[u8],
    max_payload: usize,
    received_ms: i64,
) -> Result<Incoming, Reject> {
    let topic = std::str::from_utf8(topic).map_err(|_| Reject::MalformedTopic)?;
    let (device, metric) = parse_topic(topic)?;
    if payload.len() > max_payload {
        return Err(Reject::Oversized);
    }
    let mut reading = Incoming {
        device: device.to_owned(),
        metric: metric.to_owned(),
        boot: 0,
        seq: None,
        time: DeviceTime::Unknown,
        value: 0.0,
        received_ms,
    };
    match payload.first() {
        None => return Err(Reject::MalformedPayload),
        Some(&b) if is_binary(b) => {
            if b != wire::VERSION {
                return Err(Reject::UnsupportedVersion);
            }
            let frame = wire::decode(payload).map_err(|e| match e {
                wire::Error::InvalidId => Reject::InvalidId,
                wire::Error::NonFinite => Reject::NonFinite,
                wire::Error::UnsupportedVersion(_) => Reject::UnsupportedVersion,
                _ => Reject::MalformedPayload,
            })?;
            if frame.device != device || frame.metric != metric {
                return Err(Reject::TopicMismatch);
            }
            reading.boot = frame.boot;
            reading.seq = Some(frame.seq);
            reading.time = match frame.time {
                wire::Timestamp::WallMs(ms) => time_from_wall(ms, received_ms),
                wire::Timestamp::BootMs(ms) => DeviceTime::SinceBoot(ms),
            };
            reading.value = frame.value;
        }
        Some(_) => {
            let text = std::str::from_utf8(payload).map_err(|_| Reject::MalformedPayload)?;
            let text = text.trim();
            if text.starts_with('{') {
                let json: JsonReading =
                    serde_json::from_str(text).map_err(|_| Reject::MalformedPayload)?;
                if json.seq.is_some() && json.boot.is_none() {
                    return Err(Reject::SeqWithoutBoot);
                }
                reading.value = json.value;
                reading.seq = json.seq;
                reading.boot = json.boot.unwrap_or(0);
                reading.time = match (json.ts, json.uptime_ms) {
                    (Some(ts), _) => time_from_wall(ts, received_ms),
                    (None, Some(up)) => DeviceTime::SinceBoot(up),
                    (None, None) => DeviceTime::Unknown,
                };
            } else {
                reading.value = text.parse().map_err(|_| Reject::MalformedPayload)?;
            }
        }
    }
    if !reading.value.is_finite() {
        return Err(Reject::NonFinite);
    }
    if reading.seq == Some(0) {
        // Sequence numbers start at 1; 0 would make the "nothing acked yet" watermark
        // ambiguous.
        return Err(Reject::MalformedPayload);
    }
    Ok(reading)
}

/// Binary frames start with a small version byte; text starts with a printable
/// character or whitespace.
fn is_binary(first: u8) -> bool {
    first < 0x20 && !matches!(first, b'\t' | b'\n' | b'\r' | b' ')
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn ok(topic: &str, payload: &[u8]) -> Incoming {
        parse(topic.as_bytes(), payload, 1024, 1_700_000_000_000).expect("accepted")
    }

    fn err(topic: &str, payload: &[u8]) -> Reject {
        parse(topic.as_bytes(), payload, 1024, 0).expect_err("refused")
    }

    #[test]
    fn a_plain_number_is_an_unsequenced_reading() {
        let r = ok("sensors/d1/temp", b" 21.5\n");
        assert_eq!((r.device.as_str(), r.metric.as_str()), ("d1", "temp"));
        assert_eq!((r.value, r.seq, r.time), (21.5, None, DeviceTime::Unknown));
    }

    #[test]
    fn json_carries_seq_boot_and_time() {
        let r = ok(
            "sensors/d1/temp",
            br#"{"value":-3.25,"seq":7,"boot":2,"ts":1700000000123,"unit":"C"}"#,
        );
        assert_eq!((r.value, r.seq, r.boot), (-3.25, Some(7), 2));
        assert_eq!(r.time, DeviceTime::Wall(1_700_000_000_123));
        let unset_clock = ok("sensors/d1/temp", br#"{"value":1,"ts":5000}"#);
        assert_eq!(unset_clock.time, DeviceTime::SinceBoot(5000));
    }

    #[test]
    fn a_clock_far_ahead_is_not_believed() {
        let now = 1_700_000_000_000i64;
        let ahead = ok(
            "sensors/d1/temp",
            format!(r#"{{"value":1,"ts":{}}}"#, now + MAX_CLOCK_AHEAD_MS + 1).as_bytes(),
        );
        assert_eq!(ahead.time, DeviceTime::Ahead(now + MAX_CLOCK_AHEAD_MS + 1));
        let edge = ok(
            "sensors/d1/temp",
            format!(r#"{{"value":1,"ts":{}}}"#, now + MAX_CLOCK_AHEAD_MS).as_bytes(),
        );
        assert_eq!(edge.time, DeviceTime::Wall(now + MAX_CLOCK_AHEAD_MS));
        let max = ok(
            "sensors/d1/temp",
            br#"{"value":1,"ts":18446744073709551615}"#,
        );
        assert_eq!(max.time, DeviceTime::Ahead(i64::MAX));
    }

    #[test]
    fn a_firmware_frame_must_match_its_topic() {
        let frame = wire::Reading {
            device: "d1",
            metric: "temp",
            seq: 3,
            boot: 9,
            time: wire::Timestamp::BootMs(42),
            value: 20.0,
        };
        let mut buf = [0u8; wire::MAX_FRAME_LEN];
        let bytes = wire::encode(&frame, &mut buf).expect("encode").to_vec();
        let r = ok("sensors/d1/temp", &bytes);
        assert_eq!(
            (r.seq, r.boot, r.time),
            (Some(3), 9, DeviceTime::SinceBoot(42))
        );
        assert_eq!(err("sensors/d2/temp", &bytes), Reject::TopicMismatch);
    }

    #[test]
    fn each_kind_of_bad_input_has_its_reason() {
        assert_eq!(err("sensors/d1", b"1"), Reject::MalformedTopic);
        assert_eq!(err("sensors/d1/temp/x", b"1"), Reject::MalformedTopic);
        assert_eq!(err("other/d1/temp", b"1"), Reject::MalformedTopic);
        assert_eq!(err("sensors/bad id/temp", b"1"), Reject::InvalidId);
        assert_eq!(err("sensors/d1/temp", &[b'1'; 2000]), Reject::Oversized);
        assert_eq!(
            err("sensors/d1/temp", b"{\"value\":"),
            Reject::MalformedPayload
        );
        assert_eq!(err("sensors/d1/temp", b"hello"), Reject::MalformedPayload);
        assert_eq!(err("sensors/d1/temp", b""), Reject::MalformedPayload);
        assert_eq!(err("sensors/d1/temp", b"NaN"), Reject::NonFinite);
        assert_eq!(err("sensors/d1/temp", b"-inf"), Reject::NonFinite);
        assert_eq!(
            err("sensors/d1/temp", &[7, 1, 2]),
            Reject::UnsupportedVersion
        );
        assert_eq!(
            err("sensors/d1/temp", &[1, 0xff, 0xff]),
            Reject::MalformedPayload
        );
        assert_eq!(
            err("sensors/d1/temp", br#"{"value":1,"seq":0,"boot":1}"#),
            Reject::MalformedPayload
        );
        assert_eq!(
            err("sensors/d1/temp", br#"{"value":1,"seq":3}"#),
            Reject::SeqWithoutBoot
        );
    }

    proptest! {
        #[test]
        fn arbitrary_publishes_never_panic(
            topic in proptest::collection::vec(any::<u8>(), 0..64),
            payload in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            let _ = parse(&topic, &payload, 128, 0);
        }
    }
}
