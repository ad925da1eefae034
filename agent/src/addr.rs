//! `HOST:PORT`, the one way an address is written in the configuration (`uplink.gateway`,
//! `cluster.peers`): a name or an IPv4 address, or an IPv6 address in brackets.

use std::fmt;
use std::str::FromStr;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostPort {
    /// Without brackets: what a resolver or a socket takes.
    pub host: String,
    pub port: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not HOST:PORT (an IPv6 address goes in brackets: [::1]:1883)")]
pub struct NotHostPort(pub String);

impl FromStr for HostPort {
    type Err = NotHostPort;

    fn from_str(s: &str) -> Result<HostPort, NotHostPort> {
        let bad = || NotHostPort(s.to_owned());
        let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
        let host = match host.strip_prefix('[') {
            Some(inner) => inner.strip_suffix(']').ok_or_else(bad)?,
            // A colon left in the host is an IPv6 address without its brackets.
            None if host.contains(':') || host.contains(']') => return Err(bad()),
            None => host,
        };
        if host.is_empty() || host.contains(char::is_whitespace) {
            return Err(bad());
        }
        let port = port.parse::<u16>().map_err(|_| bad())?;
        if port == 0 {
            return Err(bad());
        }
        Ok(HostPort {
            host: host.to_owned(),
            port,
        })
    }
}

impl fmt::Display for HostPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.host.contains(':') {
            write!(f, "[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_parse_as_written_in_the_configuration() {
        let ok = |s: &str, host: &str, port| {
            let hp: HostPort = s.parse().expect(s);
            assert_eq!((hp.host.as_str(), hp.port), (host, port), "{s}");
            assert_eq!(hp.to_string(), s, "round trip");
        };
        ok("gw.local:1883", "gw.local", 1883);
        ok("127.0.0.1:8883", "127.0.0.1", 8883);
        ok("[::1]:1883", "::1", 1883);
        ok("[fe80::1%eth0]:1883", "fe80::1%eth0", 1883);
        for bad in [
            "",
            "nohost",
            ":1883",
            "h:",
            "h:notaport",
            "h:70000",
            "h:0",
            "::1:1883",
            "[::1:1883",
            "::1]:1883",
            "a b:1883",
            "[]:1883",
        ] {
            assert!(bad.parse::<HostPort>().is_err(), "{bad:?} parsed");
        }
    }
}
