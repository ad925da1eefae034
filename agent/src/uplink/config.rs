//! `[uplink]`: the link to the gateway (and, with the same shape, to each peer).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::addr::HostPort;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UplinkConfig {
    /// The gateway's MQTT listeners, tried in order; empty: no uplink.
    pub gateway: Gateways,
    pub batch_readings: u64,
    pub max_inflight_readings: u64,
    pub max_inflight_batches: u16,
    pub drain_rate: u64,
    pub backoff_min_ms: u64,
    pub backoff_max_ms: u64,
    pub keepalive_secs: u64,
    pub ack_timeout_ms: u64,
    pub retention_secs: u64,
}

/// `uplink.gateway`: `HOST:PORT` entries in the order the uplink tries them.
///
/// Written as a TOML array or as one string, comma-separated, because the environment
/// (`FOGLINE_UPLINK__GATEWAY=a:1883,b:1883`) and `--gateway` only carry strings. An empty
/// string or array is no uplink. Entries are kept as written; [`Gateways::addresses`]
/// checks them. Serialized as an array.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Gateways(Vec<String>);

impl Gateways {
    pub fn new(entries: Vec<String>) -> Gateways {
        Gateways(entries)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// The entries as written.
    pub fn as_slice(&self) -> &[String] {
        &self.0
    }

    /// The entries, parsed and checked: every one `HOST:PORT`, none twice.
    pub fn addresses(&self) -> Result<Vec<HostPort>, String> {
        let mut out: Vec<HostPort> = Vec::with_capacity(self.0.len());
        for entry in &self.0 {
            let hp: HostPort = entry.parse().map_err(|e| format!("uplink.gateway: {e}"))?;
            if out
                .iter()
                .any(|o| o.port == hp.port && o.host.eq_ignore_ascii_case(&hp.host))
            {
                return Err(format!("uplink.gateway lists {entry:?} twice"));
            }
            out.push(hp);
        }
        Ok(out)
    }
}

/// One string: comma-separated entries, each trimmed; "" is the empty list. Never fails:
/// a bad entry is reported by [`Gateways::addresses`], with the rest of the config.
impl FromStr for Gateways {
    type Err = std::convert::Infallible;

    fn from_str(s: &str) -> Result<Gateways, Self::Err> {
        if s.trim().is_empty() {
            return Ok(Gateways::default());
        }
        Ok(Gateways(
            s.split(',').map(|e| e.trim().to_owned()).collect(),
        ))
    }
}

impl fmt::Display for Gateways {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0.join(","))
    }
}

impl<'de> Deserialize<'de> for Gateways {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Gateways, D::Error> {
        struct Visitor;

        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Gateways;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"HOST:PORT\", \"HOST:PORT,HOST:PORT,…\" or an array of HOST:PORT")
            }

            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Gateways, E> {
                let Ok(g) = s.parse::<Gateways>();
                Ok(g)
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Gateways, A::Error> {
                let mut out = Vec::new();
                while let Some(entry) = seq.next_element::<String>()? {
                    out.push(entry);
                }
                Ok(Gateways(out))
            }
        }

        d.deserialize_any(Visitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use figment::providers::{Format, Toml};
    use figment::Figment;

    #[derive(Debug, Deserialize)]
    struct Doc {
        gateway: Gateways,
    }

    fn doc(toml_value: &str) -> Result<Doc, String> {
        Figment::from(Toml::string(&format!("gateway = {toml_value}")))
            .extract()
            .map_err(|e| e.to_string())
    }

    fn parse(toml_value: &str) -> Result<Vec<String>, String> {
        let addrs = doc(toml_value)?.gateway.addresses()?;
        Ok(addrs.iter().map(HostPort::to_string).collect())
    }

    #[test]
    fn one_address_a_comma_string_and_an_array_give_the_same_list() {
        assert_eq!(parse(r#""gw1:1883""#), Ok(vec!["gw1:1883".to_owned()]));
        let two = Ok(vec!["gw1:1883".to_owned(), "[::1]:8883".to_owned()]);
        assert_eq!(parse(r#""gw1:1883,[::1]:8883""#), two);
        assert_eq!(parse(r#""gw1:1883, [::1]:8883""#), two);
        assert_eq!(parse(r#"["gw1:1883", "[::1]:8883"]"#), two);
    }

    #[test]
    fn an_empty_string_or_array_is_no_uplink() {
        for empty in [r#""""#, r#"" ""#, "[]"] {
            let g = doc(empty).expect(empty).gateway;
            assert!(g.is_empty(), "{empty}");
            assert_eq!(g.addresses(), Ok(Vec::new()));
        }
    }

    #[test]
    fn a_bad_entry_is_named_in_the_error() {
        for (value, bad) in [
            (r#""gw1:1883,gw2""#, "\"gw2\""),
            (r#"["gw1:1883", "gw2:http"]"#, "\"gw2:http\""),
            (r#""gw1:1883,""#, "\"\""),
        ] {
            let err = parse(value).expect_err(value);
            assert!(err.contains("uplink.gateway") && err.contains(bad), "{err}");
        }
        assert!(doc("1883").is_err());
        assert!(doc("[1883]").is_err());
    }

    #[test]
    fn a_gateway_listed_twice_is_refused() {
        let err = parse(r#""gw1:1883,gw2:1883,GW1:1883""#).expect_err("duplicate");
        assert!(err.contains("twice") && err.contains("GW1:1883"), "{err}");
        assert!(parse(r#""gw1:1883,gw1:8883""#).is_ok(), "another port");
    }

    #[test]
    fn the_list_serializes_as_an_array() {
        let g: Gateways = "a:1,b:2".parse().unwrap_or_default();
        assert_eq!(
            serde_json::to_string(&g).ok().as_deref(),
            Some(r#"["a:1","b:2"]"#)
        );
        assert_eq!(g.to_string(), "a:1,b:2");
    }
}
