//! What a connection may do: publish and subscribe rights by who it is.

use std::sync::Arc;

use crate::security::auth::Authenticator;

/// What a connection may do.
#[derive(Clone)]
pub enum Rights {
    /// Anything but the site's private topics when the site has its own listener.
    Open,
    /// Check CONNECT credentials; then a device, under its own topics.
    Authenticate(Arc<Authenticator>),
    /// An authenticated device.
    Device(String),
    /// A node of the site: anything.
    All,
}

const SITE_PREFIXES: [&str; 2] = ["fogline/cluster/", "fogline/repl/"];

impl Rights {
    /// May this connection ship a site's log batches (larger than any reading)?
    pub fn may_ship(&self, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private,
            Rights::Device(_) | Rights::Authenticate(_) => false,
        }
    }

    pub fn may_publish(&self, topic: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| topic.starts_with(p)),
            Rights::Device(d) => own_topic(d, topic.as_bytes()),
            Rights::Authenticate(_) => false,
        }
    }

    pub fn may_subscribe(&self, filter: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| filter.starts_with(p)),
            Rights::Device(d) => own_filter(d, filter.as_bytes()),
            Rights::Authenticate(_) => false,
        }
    }
}

/// May `device` publish on (or leave a will on) `topic`? Only its own readings.
pub fn own_topic(device: &str, topic: &[u8]) -> bool {
    topic
        .strip_prefix(crate::ingest::SENSOR_PREFIX.as_bytes())
        .and_then(|rest| rest.strip_prefix(device.as_bytes()))
        .is_some_and(|rest| rest.first() == Some(&b'/'))
}

/// May `device` subscribe to `filter`? Its own ack topic and its own aggregates.
fn own_filter(device: &str, filter: &[u8]) -> bool {
    let Ok(filter) = std::str::from_utf8(filter) else {
        return false;
    };
    filter == format!("fogline/ack/{device}")
        || filter
            .strip_prefix("agg/")
            .and_then(|r| r.strip_prefix(device))
            .is_some_and(|r| r.starts_with('/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_may_publish_only_under_its_own_prefix() {
        assert!(own_topic("d1", b"sensors/d1/temp"));
        assert!(!own_topic("d1", b"sensors/d10/temp"));
        assert!(!own_topic("d1", b"sensors/d1"));
        assert!(!own_topic("d1", b"fogline/ack/d1"));
        assert!(!own_topic("d1", b""));
        assert!(own_filter("d1", b"fogline/ack/d1"));
        assert!(own_filter("d1", b"agg/d1/#"));
        assert!(!own_filter("d1", b"fogline/ack/#"));
        assert!(!own_filter("d1", b"sensors/#"));
        assert!(!own_filter("d1", b"agg/#"));
    }

    #[test]
    fn rights_follow_the_guard() {
        let device = Rights::Device("d1".into());
        assert!(device.may_publish("sensors/d1/temp", false));
        assert!(!device.may_publish("sensors/d2/temp", false));
        assert!(device.may_subscribe("fogline/ack/d1", false));
        assert!(!device.may_subscribe("sensors/#", false));
        assert!(Rights::Open.may_publish("fogline/repl/x", false));
        assert!(!Rights::Open.may_publish("fogline/repl/x", true));
        assert!(!Rights::Open.may_subscribe("fogline/cluster/#", true));
        assert!(Rights::All.may_publish("fogline/repl/x", true));
    }
}
