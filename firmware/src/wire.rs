//! The sensor → agent wire format, shared by firmware, agent, gateway and tools.
//!
//! A frame is one version byte followed by a postcard-encoded [`Reading`]. Strings are
//! borrowed from the input on decode, so neither side needs an allocator. This is the
//! only copy of the codec in the project: everybody else calls [`encode`] / [`decode`].
//!
//! The end-to-end acknowledgement travels the other way on `fogline/ack/<device>` as a
//! small JSON object described by [`Ack`]: a watermark W for a boot means every reading
//! of that boot with `seq <= W` is durable at the agent. Sequence numbers start at 1 in
//! each boot, so W = 0 means "nothing yet". [`Ack::parse`] reads that JSON without an
//! allocator; [`reading_topic`] and [`ack_topic`] build the two topics.

use serde::{Deserialize, Serialize};

/// The version byte in front of every frame this code writes.
pub const VERSION: u8 = 1;
/// Longest device id or metric name, in bytes.
pub const MAX_ID_LEN: usize = 32;
/// Upper bound on an encoded frame: version byte, two ids with their length
/// prefixes, seq, boot, timestamp tag and varint, value.
pub const MAX_FRAME_LEN: usize = 1 + 2 * (1 + MAX_ID_LEN) + 5 + 5 + 1 + 10 + 8;
/// Readings are published on `sensors/<device>/<metric>`.
pub const READING_TOPIC_PREFIX: &str = "sensors/";
/// The agent publishes each device's watermark, retained, on `fogline/ack/<device>`.
pub const ACK_TOPIC_PREFIX: &str = "fogline/ack/";
/// Longest topic [`reading_topic`] or [`ack_topic`] builds.
pub const MAX_TOPIC_LEN: usize = ACK_TOPIC_PREFIX.len() + 2 * MAX_ID_LEN + 1;
/// Longest ack payload [`Ack::parse`] looks at; the agent's are about 30 bytes.
pub const MAX_ACK_LEN: usize = 256;

/// An MQTT topic built without an allocator.
pub type Topic = heapless::String<MAX_TOPIC_LEN>;
/// Unix milliseconds of 2001-01-01T00:00:00Z. A wall clock below this was never set
/// (devices without an RTC start in 1970), so the agent re-bases such timestamps.
pub const CLOCK_SET_AFTER_MS: u64 = 978_307_200_000;

/// When a reading was taken, as the device knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Timestamp {
    /// Milliseconds since the Unix epoch, from a clock the device believes is set.
    WallMs(u64),
    /// Milliseconds since the device booted; the agent re-bases it to wall time.
    BootMs(u64),
}

/// One sensor reading as it travels from a device to its agent.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Reading<'a> {
    /// Device id: 1..=32 bytes of `[A-Za-z0-9_.-]`.
    pub device: &'a str,
    /// Metric name, same charset as the device id.
    pub metric: &'a str,
    /// Per-(device, boot) sequence number, starting at 1.
    pub seq: u32,
    /// Changes on every reboot of the device (random or persisted counter).
    pub boot: u32,
    /// When the value was sampled.
    pub time: Timestamp,
    /// The measured value; must be finite.
    pub value: f64,
}

/// The agent's durable watermark for one device, published on `fogline/ack/<device>`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ack {
    /// The boot this watermark covers.
    pub boot: u32,
    /// Every reading of `boot` with a sequence number `<= seq` is durable.
    pub seq: u32,
}

/// Why a frame could not be encoded or decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    /// The input ended before the frame did; more bytes might make it whole.
    Truncated,
    /// The frame's version byte is not one this code understands.
    UnsupportedVersion(u8),
    /// The bytes are not a valid frame (bad varint, bad UTF-8, unknown tag…).
    Malformed,
    /// Bytes were left over after a complete frame.
    TrailingBytes,
    /// The device id or metric name is empty, too long, or uses other characters.
    InvalidId,
    /// The value is NaN or infinite.
    NonFinite,
    /// The output buffer is too small.
    BufferFull,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::Truncated => f.write_str("frame is truncated"),
            Error::UnsupportedVersion(v) => write!(f, "unsupported frame version {v}"),
            Error::Malformed => f.write_str("frame is malformed"),
            Error::TrailingBytes => f.write_str("trailing bytes after the frame"),
            Error::InvalidId => {
                f.write_str("device id or metric must be 1-32 characters of [A-Za-z0-9_.-]")
            }
            Error::NonFinite => f.write_str("value is not a finite number"),
            Error::BufferFull => f.write_str("output buffer too small"),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for Error {}

/// True when `id` is a valid device id or metric name.
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
}

impl Reading<'_> {
    /// Checks the rules a frame must obey beyond its shape.
    pub fn validate(&self) -> Result<(), Error> {
        if !valid_id(self.device) || !valid_id(self.metric) {
            return Err(Error::InvalidId);
        }
        if !self.value.is_finite() {
            return Err(Error::NonFinite);
        }
        Ok(())
    }
}

/// Encodes `reading` into `buf` and returns the used prefix.
pub fn encode<'b>(reading: &Reading<'_>, buf: &'b mut [u8]) -> Result<&'b mut [u8], Error> {
    reading.validate()?;
    let (first, rest) = buf.split_first_mut().ok_or(Error::BufferFull)?;
    *first = VERSION;
    let used = postcard::to_slice(reading, rest)
        .map_err(|_| Error::BufferFull)?
        .len();
    Ok(&mut buf[..=used])
}

/// Decodes and validates one frame. Never panics, whatever the input.
pub fn decode(bytes: &[u8]) -> Result<Reading<'_>, Error> {
    let (&version, body) = bytes.split_first().ok_or(Error::Truncated)?;
    if version != VERSION {
        return Err(Error::UnsupportedVersion(version));
    }
    let (reading, rest): (Reading<'_>, _) =
        postcard::take_from_bytes(body).map_err(|e| match e {
            postcard::Error::DeserializeUnexpectedEnd => Error::Truncated,
            _ => Error::Malformed,
        })?;
    if !rest.is_empty() {
        return Err(Error::TrailingBytes);
    }
    reading.validate()?;
    Ok(reading)
}

/// `sensors/<device>/<metric>`, the topic a reading is published on.
pub fn reading_topic(device: &str, metric: &str) -> Result<Topic, Error> {
    if !valid_id(device) || !valid_id(metric) {
        return Err(Error::InvalidId);
    }
    let mut topic = Topic::new();
    for part in [READING_TOPIC_PREFIX, device, "/", metric] {
        topic.push_str(part).map_err(|()| Error::BufferFull)?;
    }
    Ok(topic)
}

/// `fogline/ack/<device>`, the topic the agent acknowledges a device's readings on.
pub fn ack_topic(device: &str) -> Result<Topic, Error> {
    if !valid_id(device) {
        return Err(Error::InvalidId);
    }
    let mut topic = Topic::new();
    for part in [ACK_TOPIC_PREFIX, device] {
        topic.push_str(part).map_err(|()| Error::BufferFull)?;
    }
    Ok(topic)
}

impl Ack {
    /// Parses the agent's ack payload, the JSON object `{"boot":B,"seq":W}`.
    ///
    /// The agent writes it with a general JSON library, so field order, whitespace and
    /// extra fields are allowed; both numbers must fit a `u32`. Never panics, whatever the
    /// input: the payload comes from the network.
    pub fn parse(payload: &[u8]) -> Result<Ack, Error> {
        if payload.len() > MAX_ACK_LEN {
            return Err(Error::Malformed);
        }
        let (ack, used) = serde_json_core::from_slice::<Ack>(payload).map_err(|e| match e {
            serde_json_core::de::Error::EofWhileParsingObject
            | serde_json_core::de::Error::EofWhileParsingString
            | serde_json_core::de::Error::EofWhileParsingNumber
            | serde_json_core::de::Error::EofWhileParsingValue => Error::Truncated,
            _ => Error::Malformed,
        })?;
        let rest = payload.get(used..).unwrap_or_default();
        if !rest.iter().all(u8::is_ascii_whitespace) {
            return Err(Error::TrailingBytes);
        }
        Ok(ack)
    }

    /// The ack payload as the agent publishes it, `{"boot":B,"seq":W}`, written into `buf`
    /// (at most [`MAX_ACK_LEN`] bytes): the one encoding of it, which [`Ack::parse`] reads.
    pub fn encode<'b>(&self, buf: &'b mut [u8]) -> Result<&'b [u8], Error> {
        let n = serde_json_core::to_slice(self, buf).map_err(|_| Error::BufferFull)?;
        buf.get(..n).ok_or(Error::BufferFull)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id() -> impl Strategy<Value = std::string::String> {
        "[A-Za-z0-9_.-]{1,32}"
    }

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        prop_oneof![
            any::<u64>().prop_map(Timestamp::WallMs),
            any::<u64>().prop_map(Timestamp::BootMs)
        ]
    }

    proptest! {
        #[test]
        fn every_valid_reading_round_trips(
            device in id(), metric in id(), seq: u32, boot: u32,
            time in timestamp(), value in proptest::num::f64::NORMAL | proptest::num::f64::ZERO,
        ) {
            let reading = Reading { device: &device, metric: &metric, seq, boot, time, value };
            let mut buf = [0u8; MAX_FRAME_LEN];
            let frame = encode(&reading, &mut buf).expect("fits in MAX_FRAME_LEN");
            prop_assert_eq!(decode(frame), Ok(reading));
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn every_strict_prefix_is_truncated_or_invalid(cut in 0usize..40) {
            let reading = Reading { device: "dev-1", metric: "temp", seq: 7, boot: 3,
                time: Timestamp::BootMs(1234), value: 21.5 };
            let mut buf = [0u8; MAX_FRAME_LEN];
            let frame = encode(&reading, &mut buf).expect("fits");
            let cut = cut.min(frame.len() - 1);
            prop_assert!(decode(&frame[..cut]).is_err());
        }
    }

    #[test]
    fn decode_rejects_an_unknown_version() {
        assert_eq!(decode(&[9, 1, 2]), Err(Error::UnsupportedVersion(9)));
    }

    #[test]
    fn decode_rejects_trailing_bytes_and_non_finite_values() {
        let mut buf = [0u8; MAX_FRAME_LEN + 1];
        let reading = Reading {
            device: "d",
            metric: "m",
            seq: 1,
            boot: 1,
            time: Timestamp::WallMs(0),
            value: 1.0,
        };
        let len = encode(&reading, &mut buf).expect("fits").len();
        assert_eq!(decode(&buf[..=len]), Err(Error::TrailingBytes));
        let nan = Reading {
            value: f64::NAN,
            ..reading
        };
        assert_eq!(encode(&nan, &mut buf), Err(Error::NonFinite));
    }

    #[test]
    fn an_encoded_ack_parses_back() {
        let mut buf = [0u8; MAX_ACK_LEN];
        let ack = Ack {
            boot: u32::MAX,
            seq: 1234,
        };
        let bytes = ack.encode(&mut buf).expect("fits");
        assert_eq!(bytes, br#"{"boot":4294967295,"seq":1234}"#);
        assert_eq!(Ack::parse(bytes), Ok(ack));
    }

    #[test]
    fn the_agents_ack_json_parses_in_any_field_order() {
        // The exact text the agent publishes (serde_json, fields in struct order)...
        assert_eq!(
            Ack::parse(br#"{"boot":7,"seq":12}"#),
            Ok(Ack { boot: 7, seq: 12 })
        );
        // ...and what any other JSON writer could make of the same object.
        assert_eq!(
            Ack::parse(b" { \"seq\" : 0 , \"boot\" : 4294967295 }\n"),
            Ok(Ack {
                boot: u32::MAX,
                seq: 0
            })
        );
        assert_eq!(
            Ack::parse(br#"{"boot":1,"seq":2,"note":"later agents may add fields"}"#),
            Ok(Ack { boot: 1, seq: 2 })
        );
    }

    #[test]
    fn a_broken_ack_is_an_error_not_a_watermark() {
        for bad in [
            &b""[..],
            br#"{"boot":1}"#,
            br#"{"boot":1,"seq":-1}"#,
            br#"{"boot":1,"seq":4294967296}"#,
            br#"{"boot":1,"seq":2.5}"#,
            br#"{"boot":"1","seq":2}"#,
            br#"[1,2]"#,
            br#"{"boot":1,"seq":2} {"boot":1,"seq":3}"#,
            br#"{"boot":1,"seq":2"#,
            b"\xff\xfe",
        ] {
            assert!(
                Ack::parse(bad).is_err(),
                "{:?} parsed",
                core::str::from_utf8(bad)
            );
        }
        let huge = [b' '; MAX_ACK_LEN + 1];
        assert_eq!(Ack::parse(&huge), Err(Error::Malformed));
    }

    #[test]
    fn topics_are_built_from_valid_ids_only() {
        assert_eq!(
            reading_topic("dev-1", "temperature").as_deref(),
            Ok("sensors/dev-1/temperature")
        );
        assert_eq!(ack_topic("dev-1").as_deref(), Ok("fogline/ack/dev-1"));
        let longest = "x".repeat(MAX_ID_LEN);
        assert!(reading_topic(&longest, &longest).is_ok());
        assert!(ack_topic(&longest).is_ok());
        assert_eq!(reading_topic("a/b", "m"), Err(Error::InvalidId));
        assert_eq!(reading_topic("d", "#"), Err(Error::InvalidId));
        assert_eq!(ack_topic("+"), Err(Error::InvalidId));
    }

    proptest! {
        #[test]
        fn arbitrary_ack_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Ack::parse(&bytes);
        }
    }

    #[test]
    fn ids_outside_the_charset_are_refused() {
        assert!(valid_id("sensor-01.a_b"));
        assert!(!valid_id(""));
        assert!(!valid_id("has space"));
        assert!(!valid_id("plus+"));
        assert!(!valid_id(&"x".repeat(33)));
    }
}
