//! What a connection may do: publish and subscribe rights by who it is, at an agent
//! (devices, site nodes) and at the gateway (site nodes bound to their site, dashboards).

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
    /// At the gateway: a node shipping the logs of its site (of any site when `None`:
    /// a lab without TLS). Never an ack: only the gateway acks.
    Uplink(Option<Arc<str>>),
    /// At the gateway: a dashboard. It subscribes to aggregates and publishes nothing.
    Reader,
    /// At the gateway, a client without a certificate: its CONNECT credentials or the
    /// anonymous policy decide ([`GatewayLogin`]).
    GatewayLogin(Arc<GatewayLogin>),
}

/// What a client without a certificate becomes at the gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Refused.
    Refuse,
    /// A dashboard: subscribes to aggregates only.
    Read,
    /// A node of any site (a lab without TLS).
    Node,
}

/// How the gateway decides who a client without a certificate is.
pub struct GatewayLogin {
    /// Dashboards' user names and password hashes (`access.readers`).
    pub readers: Option<Authenticator>,
    pub anonymous: Anonymous,
}

const SITE_PREFIXES: [&str; 2] = ["fogline/cluster/", "fogline/repl/"];

impl Rights {
    /// May this connection ship a site's log batches (larger than any reading)?
    pub fn may_ship(&self, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private,
            Rights::Uplink(_) => true,
            Rights::Device(_) | Rights::Authenticate(_) | Rights::Reader => false,
            Rights::GatewayLogin(_) => false,
        }
    }

    pub fn may_publish(&self, topic: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| topic.starts_with(p)),
            Rights::Device(d) => own_topic(d, topic.as_bytes()),
            Rights::Uplink(site) => uplink_topic(site.as_deref(), topic),
            Rights::Authenticate(_) | Rights::Reader | Rights::GatewayLogin(_) => false,
        }
    }

    pub fn may_subscribe(&self, filter: &str, site_private: bool) -> bool {
        match self {
            Rights::All => true,
            Rights::Open => !site_private || !SITE_PREFIXES.iter().any(|p| filter.starts_with(p)),
            Rights::Device(d) => own_filter(d, filter.as_bytes()),
            Rights::Uplink(None) => true,
            Rights::Uplink(Some(site)) => site_filter(site, filter),
            Rights::Reader => filter.starts_with("agg/") || filter.starts_with("$SYS/"),
            Rights::Authenticate(_) | Rights::GatewayLogin(_) => false,
        }
    }

    /// Who, for a log line.
    pub fn describe(&self, client: &str) -> String {
        match self {
            Rights::Device(d) => format!("device {d:?}"),
            Rights::Uplink(Some(site)) => format!("node {client:?} of site {site:?}"),
            Rights::Reader => format!("dashboard {client:?}"),
            _ => format!("client {client:?}"),
        }
    }
}

/// May a node of `site` (any site: `None`) publish on `topic` at the gateway? Its
/// site's batches, syncs and aggregates (`fogline/uplink/<site>/<origin>/{log, sync,
/// agg/…}`, the shipping protocol's topics); never an ack, nothing else.
fn uplink_topic(site: Option<&str>, topic: &str) -> bool {
    let Some(rest) = topic.strip_prefix(UPLINK_PREFIX) else {
        return false;
    };
    let mut parts = rest.splitn(3, '/');
    let (Some(s), Some(origin), Some(kind)) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    let shipped = matches!(kind, "log" | "sync") || kind.starts_with("agg/");
    shipped && !origin.is_empty() && site.is_none_or(|own| own == s)
}

const UPLINK_PREFIX: &str = "fogline/uplink/";

/// May a node of `site` subscribe to `filter` at the gateway? Its site's uplink topics
/// (the acks) and its site's aggregates, the site named, not matched by a wildcard.
fn site_filter(site: &str, filter: &str) -> bool {
    [UPLINK_PREFIX, "agg/"].iter().any(|prefix| {
        filter
            .strip_prefix(prefix)
            .and_then(|r| r.strip_prefix(site))
            .is_some_and(|r| r.starts_with('/'))
    })
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

    #[test]
    fn a_node_at_the_gateway_ships_only_its_own_site_and_never_acks() {
        let node = Rights::Uplink(Some("farm".into()));
        assert!(node.may_publish("fogline/uplink/farm/pi-1.0a0b0c0d/log", false));
        assert!(node.may_publish("fogline/uplink/farm/pi-1.0a0b0c0d/sync", false));
        assert!(node.may_publish("fogline/uplink/farm/pi-1.0a0b0c0d/agg/d1/temp/60s", false));
        assert!(!node.may_publish("fogline/uplink/farm/pi-1.0a0b0c0d/ack", false));
        assert!(!node.may_publish("fogline/uplink/barn/pi-1.0a0b0c0d/log", false));
        assert!(!node.may_publish("agg/farm/d1/temp/60s", false));
        assert!(!node.may_publish("sensors/d1/temp", false));
        assert!(!node.may_publish("fogline/uplink/farm/x/unknown", false));
        assert!(node.may_ship(false));
        assert!(node.may_subscribe("fogline/uplink/farm/pi-1.0a0b0c0d/ack", false));
        assert!(node.may_subscribe("agg/farm/#", false));
        assert!(!node.may_subscribe("fogline/uplink/+/pi-1.0a0b0c0d/ack", false));
        assert!(!node.may_subscribe("fogline/uplink/farmhouse/x/ack", false));
        assert!(!node.may_subscribe("#", false));
        // Without TLS (a lab): any site, but still never an ack.
        let lab = Rights::Uplink(None);
        assert!(lab.may_publish("fogline/uplink/barn/x.00000000/log", false));
        assert!(!lab.may_publish("fogline/uplink/barn/x.00000000/ack", false));
        assert!(lab.may_subscribe("#", false));
    }

    #[test]
    fn a_dashboard_at_the_gateway_only_subscribes_to_aggregates() {
        let r = Rights::Reader;
        assert!(r.may_subscribe("agg/#", false));
        assert!(r.may_subscribe("agg/farm/+/temp/60s", false));
        assert!(!r.may_subscribe("fogline/uplink/#", false));
        assert!(!r.may_subscribe("#", false));
        assert!(!r.may_publish("agg/farm/d1/temp/60s", false));
        assert!(!r.may_publish("fogline/uplink/farm/x.00000000/log", false));
        assert!(!r.may_ship(false));
    }
}
