//! Topic names and filters (MQTT 3.1.1 §4.7, MQTT 5 §4.7), and the tag the front end
//! puts on every publish it hands to rumqttd's router.
//!
//! The router forwards a message at the subscription's QoS and drops its retain flag, so
//! what the publisher sent is carried beside the message as one user property, read back
//! on delivery and removed before anything reaches a client.

use rumqttd::protocol::PublishProperties;

/// Does `filter` match `topic`? A topic that starts with `$` is not matched by a filter
/// that starts with a wildcard (MQTT-4.7.2-1).
pub fn matches(filter: &str, topic: &str) -> bool {
    if topic.starts_with('$') && (filter.starts_with('+') || filter.starts_with('#')) {
        return false;
    }
    let mut levels = topic.split('/');
    for f in filter.split('/') {
        if f == "#" {
            return true;
        }
        match levels.next() {
            Some(t) if f == "+" || f == t => {}
            _ => return false,
        }
    }
    levels.next().is_none()
}

/// A topic name a client may publish to: not empty, no wildcards, no NUL.
pub fn valid_topic(topic: &str) -> bool {
    !topic.is_empty() && !topic.contains(['+', '#', '\0'])
}

/// A topic filter: not empty; `#` only as the whole last level; `+` only as a whole level.
pub fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() || filter.contains('\0') {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(i, l)| {
        if l.contains('#') {
            *l == "#" && i + 1 == levels.len()
        } else {
            !l.contains('+') || *l == "+"
        }
    })
}

/// Could a message on a `sensors/…` topic match `filter`?
pub fn may_match_readings(filter: &str) -> bool {
    let first = filter.split('/').next().unwrap_or("");
    matches!(first, "sensors" | "+" | "#")
}

/// Could a wildcard `filter` match an agent-only topic (`fogline/ack/…`)?
pub fn may_match_local(filter: &str) -> bool {
    let mut levels = filter.split('/');
    let first = levels.next().unwrap_or("");
    let second = levels.next();
    match first {
        "#" => true,
        "+" | "fogline" => matches!(second, None | Some("#" | "+" | "ack")) && filter != "fogline",
        _ => false,
    }
}

const TAG: &str = "fogline";

/// What a publisher sent, beside what the router forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tag {
    pub qos: u8,
    pub retain: bool,
    /// When the front end took the message, Unix ms (for message expiry).
    pub at_ms: i64,
    /// The publishing client (for No Local).
    pub from: String,
}

impl Tag {
    /// Messages published inside the agent (acks, aggregates, site traffic) carry no tag:
    /// they are delivered as QoS 1, so a sleeping device's session keeps its acks.
    pub fn internal(now_ms: i64) -> Tag {
        Tag {
            qos: 1,
            retain: false,
            at_ms: now_ms,
            from: String::new(),
        }
    }

    fn encode(&self, id: u64) -> String {
        format!(
            "{}{}{},{id:x},{}",
            self.qos,
            u8::from(self.retain),
            self.at_ms,
            self.from
        )
    }

    fn decode(s: &str) -> Option<(Tag, u64)> {
        let (head, rest) = s.split_once(',')?;
        let (id, from) = rest.split_once(',')?;
        let mut chars = head.chars();
        let qos = chars.next()?.to_digit(10)?;
        let retain = chars.next()? == '1';
        let at_ms = chars.as_str().parse().ok()?;
        let tag = Tag {
            qos: u8::try_from(qos).ok()?.min(2),
            retain,
            at_ms,
            from: from.to_owned(),
        };
        Some((tag, u64::from_str_radix(id, 16).ok()?))
    }

    /// Adds the tag to a publish's properties (creating them), with an id no other
    /// message of this process has: the router forwards a message once per matching
    /// filter of a session, and the id lets the session deliver it once.
    pub fn attach(&self, props: Option<PublishProperties>) -> PublishProperties {
        static NEXT_ID: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        let id = NEXT_ID.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut props = props.unwrap_or_default();
        props.user_properties.retain(|(k, _)| k != TAG);
        props
            .user_properties
            .push((TAG.to_owned(), self.encode(id)));
        props
    }

    /// Takes the tag off: the tag and the message's id; `None` if it carried none.
    pub fn detach(props: &mut Option<PublishProperties>) -> Option<(Tag, u64)> {
        let p = props.as_mut()?;
        let at = p.user_properties.iter().position(|(k, _)| k == TAG)?;
        let (_, v) = p.user_properties.remove(at);
        Tag::decode(&v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_match_as_the_specification_says() {
        assert!(matches("a/b", "a/b"));
        assert!(matches("a/+", "a/b"));
        assert!(matches("a/#", "a"));
        assert!(matches("a/#", "a/b/c"));
        assert!(matches("#", "a/b"));
        assert!(matches("+/+", "/b"));
        assert!(!matches("a/+", "a/b/c"));
        assert!(!matches("a/b", "a"));
        assert!(!matches("#", "$SYS/broker/version"));
        assert!(!matches("+/broker/version", "$SYS/broker/version"));
        assert!(matches("$SYS/#", "$SYS/broker/version"));
        assert!(matches("$SYS/+/version", "$SYS/broker/version"));
    }

    #[test]
    fn filters_and_topics_are_validated() {
        for ok in ["a", "a/b", "#", "+", "a/+/c", "a/#", "/", "+/+"] {
            assert!(valid_filter(ok), "{ok}");
        }
        for bad in ["", "a#", "a/#/b", "a+", "a/b+", "#/a"] {
            assert!(!valid_filter(bad), "{bad}");
        }
        assert!(valid_topic("a/b"));
        assert!(!valid_topic("a/+"));
        assert!(!valid_topic("a/#"));
        assert!(!valid_topic(""));
        assert!(may_match_readings("sensors/#"));
        assert!(may_match_readings("#"));
        assert!(may_match_readings("+/d1/temp"));
        assert!(!may_match_readings("agg/#"));
        assert!(may_match_local("#"));
        assert!(may_match_local("fogline/#"));
        assert!(may_match_local("fogline/ack/+"));
        assert!(may_match_local("+/ack/d1"));
        assert!(!may_match_local("fogline/repl/#"));
        assert!(!may_match_local("agg/#"));
    }

    #[test]
    fn tags_round_trip_and_leave_other_properties() {
        let tag = Tag {
            qos: 2,
            retain: true,
            at_ms: 1_700_000_000_123,
            from: "dev,1".into(),
        };
        let mut props = PublishProperties::default();
        props.user_properties.push(("k".into(), "v".into()));
        let mut props = Some(tag.attach(Some(props)));
        let (back, id) = Tag::detach(&mut props).expect("tagged");
        assert_eq!(back, tag);
        let mut again = Some(tag.attach(None));
        assert_ne!(
            Tag::detach(&mut again).map(|(_, id)| id),
            Some(id),
            "ids differ"
        );
        assert_eq!(
            props.map(|p| p.user_properties),
            Some(vec![("k".to_owned(), "v".to_owned())])
        );
        let mut none = None;
        assert_eq!(Tag::detach(&mut none), None);
    }
}
