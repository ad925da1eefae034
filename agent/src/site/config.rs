//! `[cluster]`: the site's members, replication and election timing.

use serde::{Deserialize, Serialize};

/// When the ack on `fogline/ack/<device>` is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AckAfter {
    /// `replicated` when the site has peers, `local` otherwise.
    Auto,
    /// Once the reading is committed on this agent.
    Local,
    /// Once the reading is durable on `cluster.min_insync` agents.
    Replicated,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// The other agents of the site, `ID=HOST:PORT` (their node listener, `listen`, or
    /// their MQTT 3.1.1 listener when they have none).
    pub peers: Vec<String>,
    /// Where the other agents of the site connect (`HOST:PORT`): over TLS with a client
    /// certificate from the site CA when `[tls]` is set. Empty: through `mqtt.listen`.
    pub listen: String,
    /// Largest replication batch accepted from a peer, in bytes.
    pub max_batch_bytes: usize,
    pub ack_after: AckAfter,
    pub min_insync: usize,
    /// Agents holding each origin's log, the origin included; 0: every agent.
    pub replication_factor: usize,
    pub tick_ms: u64,
    pub election_timeout_min_ticks: u64,
    pub election_timeout_max_ticks: u64,
    pub heartbeat_ticks: u64,
    pub lease_ticks: u64,
}

/// One peer from `cluster.peers`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub id: String,
    /// `HOST:PORT` of its MQTT listener.
    pub addr: String,
}

impl ClusterConfig {
    /// The peers, parsed and checked.
    pub fn peers(&self) -> Result<Vec<Peer>, String> {
        let mut out: Vec<Peer> = Vec::new();
        for entry in &self.peers {
            let bad = || format!("cluster.peers entry {entry:?}: expected ID=HOST:PORT");
            let (id, addr) = entry.split_once('=').ok_or_else(bad)?;
            if addr.parse::<crate::addr::HostPort>().is_err() {
                return Err(bad());
            }
            if !fogline_firmware::wire::valid_id(id) {
                return Err(format!(
                    "cluster.peers: peer id {id:?}: use 1-32 characters of [A-Za-z0-9_.-]"
                ));
            }
            if out.iter().any(|p| p.id == id) {
                return Err(format!("cluster.peers: peer {id} is listed twice"));
            }
            out.push(Peer {
                id: id.to_owned(),
                addr: addr.to_owned(),
            });
        }
        Ok(out)
    }

    /// Whether device acks wait for replication.
    pub fn replicated_acks(&self) -> bool {
        match self.ack_after {
            AckAfter::Auto => !self.peers.is_empty(),
            AckAfter::Local => false,
            AckAfter::Replicated => true,
        }
    }
}
