//! The log-shipping protocol over MQTT: between a site's leader agent and the gateway
//! ([`UPLINK`], topics below) and, with the same frames and acks, from each agent to its
//! peers ([`REPLICATION`], `fogline/repl/…`, plus `gwack` for the gateway's ack).
//!
//! | topic | from | payload |
//! |---|---|---|
//! | `fogline/uplink/<site>/<origin>/log` | agent, QoS 1 | [`BatchFrame`]: one stored block of the origin's log |
//! | `fogline/uplink/<site>/<origin>/sync` | agent, QoS 1 | empty: "tell me where you are" |
//! | `fogline/uplink/<site>/<origin>/ack` | gateway, retained | [`UplinkAck`] JSON `{"next":N}` |
//! | `fogline/uplink/<site>/<origin>/agg/<device>/<metric>/<len>s` | agent, QoS 1 | window JSON, republished by the gateway on `agg/<site>/<device>/<metric>/<len>s` |
//!
//! The gateway acks per (site, origin) the next offset it expects: every reading of that
//! origin below it is durable at the gateway. It accepts a batch only if the batch joins
//! its log without a hole, so the log at the gateway is complete and in offset order, and
//! a re-sent batch is recognised by its offsets and stored once.

use serde::{Deserialize, Serialize};

/// First byte of every batch frame.
pub const VERSION: u8 = 1;

/// One batch of an origin's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchFrame<'a> {
    /// The agent vouches that offsets in `start..first_offset` do not exist any more
    /// (dropped or downsampled at the edge before they could be sent).
    pub start: u64,
    /// Offset of the block's first reading.
    pub first_offset: u64,
    /// The block exactly as the agent stores it (`buffer::block`).
    #[serde(borrow)]
    pub block: &'a [u8],
}

/// The gateway's durable watermark for one origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct UplinkAck {
    /// Every reading below this offset is stored at the gateway.
    pub next: u64,
}

impl UplinkAck {
    /// The ack's one encoding, `{"next":N}`.
    pub fn encode(&self) -> String {
        format!("{{\"next\":{}}}", self.next)
    }

    pub fn decode(payload: &[u8]) -> Result<UplinkAck, serde_json::Error> {
        serde_json::from_slice(payload)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unknown frame version {0}")]
    Version(u8),
    #[error("malformed frame")]
    Malformed,
    #[error("batch starts after its first offset")]
    BadRange,
}

impl BatchFrame<'_> {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![VERSION];
        out.extend(postcard::to_allocvec(self).unwrap_or_default());
        out
    }
}

/// Decodes a batch frame. Never panics on any input.
pub fn decode_batch(bytes: &[u8]) -> Result<BatchFrame<'_>, FrameError> {
    let (&version, body) = bytes.split_first().ok_or(FrameError::Empty)?;
    if version != VERSION {
        return Err(FrameError::Version(version));
    }
    let frame: BatchFrame<'_> = postcard::from_bytes(body).map_err(|_| FrameError::Malformed)?;
    if frame.start > frame.first_offset {
        return Err(FrameError::BadRange);
    }
    Ok(frame)
}

/// What an uplink (or replication) topic is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Topic<'a> {
    Log {
        site: &'a str,
        origin: &'a str,
    },
    Sync {
        site: &'a str,
        origin: &'a str,
    },
    Ack {
        site: &'a str,
        origin: &'a str,
    },
    /// Replication only: the site leader tells a peer the gateway's ack of `origin`, so
    /// that it may delete what the gateway has.
    GatewayAck {
        site: &'a str,
        origin: &'a str,
    },
    /// `rest` is `<device>/<metric>/<len>s`.
    Agg {
        site: &'a str,
        origin: &'a str,
        rest: &'a str,
    },
}

/// A family of log-shipping topics: the same frames and acks serve the uplink to the
/// gateway (`fogline/uplink/…`) and replication to a site's peers (`fogline/repl/…`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scheme {
    prefix: &'static str,
}

/// Agent → gateway.
pub const UPLINK: Scheme = Scheme {
    prefix: "fogline/uplink/",
};
/// Agent → the other agents of its site.
pub const REPLICATION: Scheme = Scheme {
    prefix: "fogline/repl/",
};

/// An origin is a node id, a dot and the 8 hex digits of its buffer's incarnation.
pub fn valid_origin(origin: &str) -> bool {
    origin.len() <= 48
        && !origin.is_empty()
        && origin
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Scheme {
    /// "uplink" or "repl", for client ids and logs.
    pub fn name(self) -> &'static str {
        self.prefix
            .trim_start_matches("fogline/")
            .trim_end_matches('/')
    }

    /// The filter a receiver subscribes to.
    pub fn filter(self) -> String {
        format!("{}#", self.prefix)
    }

    pub fn log_topic(self, site: &str, origin: &str) -> String {
        format!("{}{site}/{origin}/log", self.prefix)
    }

    pub fn sync_topic(self, site: &str, origin: &str) -> String {
        format!("{}{site}/{origin}/sync", self.prefix)
    }

    pub fn ack_topic(self, site: &str, origin: &str) -> String {
        format!("{}{site}/{origin}/ack", self.prefix)
    }

    pub fn gateway_ack_topic(self, site: &str, origin: &str) -> String {
        format!("{}{site}/{origin}/gwack", self.prefix)
    }

    /// `agg/<device>/<metric>/<len>s` at the agent → its relay topic.
    pub fn agg_relay_topic(self, site: &str, origin: &str, local_topic: &str) -> Option<String> {
        let rest = local_topic.strip_prefix("agg/")?;
        Some(format!("{}{site}/{origin}/agg/{rest}", self.prefix))
    }

    /// Parses a topic of this scheme; ids are checked with the sensor id rules.
    pub fn parse_topic(self, topic: &str) -> Option<Topic<'_>> {
        let rest = topic.strip_prefix(self.prefix)?;
        let mut parts = rest.splitn(4, '/');
        let (site, origin, kind) = (parts.next()?, parts.next()?, parts.next()?);
        if !fogline_firmware::wire::valid_id(site) || !valid_origin(origin) {
            return None;
        }
        match (kind, parts.next()) {
            ("log", None) => Some(Topic::Log { site, origin }),
            ("sync", None) => Some(Topic::Sync { site, origin }),
            ("ack", None) => Some(Topic::Ack { site, origin }),
            ("gwack", None) => Some(Topic::GatewayAck { site, origin }),
            ("agg", Some(rest)) => {
                let mut p = rest.split('/');
                let ok = matches!(
                    (p.next(), p.next(), p.next(), p.next()),
                    (Some(d), Some(m), Some(w), None)
                        if fogline_firmware::wire::valid_id(d)
                            && fogline_firmware::wire::valid_id(m)
                            && w.strip_suffix('s').is_some_and(|n| n.parse::<u32>().is_ok())
                );
                ok.then_some(Topic::Agg { site, origin, rest })
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The gateway's rights (`mqtt::Rights::Uplink`) spell the uplink's topics out
    /// themselves (the front end sits below this module): they must agree with them.
    #[test]
    fn the_gateway_lets_a_node_publish_exactly_what_the_uplink_sends() {
        use crate::mqtt::Rights;
        let node = Rights::Uplink(Some("farm".into()));
        let origin = "pi-1.0a0b0c0d";
        for topic in [
            UPLINK.log_topic("farm", origin),
            UPLINK.sync_topic("farm", origin),
            UPLINK
                .agg_relay_topic("farm", origin, "agg/d1/temp/60s")
                .expect("agg"),
        ] {
            assert!(node.may_publish(&topic, false), "{topic}");
            assert!(UPLINK.parse_topic(&topic).is_some(), "{topic}");
        }
        assert!(!node.may_publish(&UPLINK.ack_topic("farm", origin), false));
        assert!(!node.may_publish(&UPLINK.log_topic("barn", origin), false));
        assert!(node.may_subscribe(&UPLINK.ack_topic("farm", origin), false));
    }

    #[test]
    fn frames_round_trip() {
        let block = [1u8, 2, 3];
        let frame = BatchFrame {
            start: 5,
            first_offset: 7,
            block: &block,
        };
        assert_eq!(decode_batch(&frame.encode()), Ok(frame));
        assert_eq!(decode_batch(&[]), Err(FrameError::Empty));
        assert_eq!(decode_batch(&[9, 0]), Err(FrameError::Version(9)));
        let bad = BatchFrame {
            start: 8,
            first_offset: 7,
            block: &block,
        };
        assert_eq!(decode_batch(&bad.encode()), Err(FrameError::BadRange));
    }

    #[test]
    fn topics_parse_and_refuse_strangers() {
        assert_eq!(
            UPLINK.parse_topic(&UPLINK.log_topic("s1", "a1")),
            Some(Topic::Log {
                site: "s1",
                origin: "a1"
            })
        );
        assert_eq!(
            UPLINK.parse_topic("fogline/uplink/s1/a1/agg/d1/temp/60s"),
            Some(Topic::Agg {
                site: "s1",
                origin: "a1",
                rest: "d1/temp/60s"
            })
        );
        assert_eq!(
            UPLINK
                .agg_relay_topic("s1", "a1", "agg/d1/temp/60s")
                .as_deref(),
            Some("fogline/uplink/s1/a1/agg/d1/temp/60s")
        );
        assert_eq!(UPLINK.parse_topic("fogline/uplink/s1/a1/agg/d1/temp"), None);
        assert_eq!(UPLINK.parse_topic("fogline/uplink/s 1/a1/log"), None);
        assert_eq!(UPLINK.parse_topic("fogline/uplink/s1/a1/log/x"), None);
        assert_eq!(UPLINK.parse_topic("sensors/d/m"), None);
        assert_eq!(
            REPLICATION.parse_topic("fogline/repl/s1/a1.0badf00d/gwack"),
            Some(Topic::GatewayAck {
                site: "s1",
                origin: "a1.0badf00d"
            })
        );
        assert_eq!(REPLICATION.parse_topic(&UPLINK.log_topic("s1", "a1")), None);
    }

    proptest! {
        #[test]
        fn arbitrary_frames_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_batch(&bytes);
        }
    }
}
