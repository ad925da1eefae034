//! The replicas this agent keeps of its peers' logs: what happens when one commits or
//! the gateway acks it, and the leader's uplink source reading them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;

use crate::shipping::receiver::Hooks;
use crate::shipping::store::{Store, StoreReader};
use crate::uplink::{Shared, Source};

/// Starts the leader's uplink of a replicated origin: (origin, its head, its status).
pub(super) type SpawnUplink = Arc<dyn Fn(String, watch::Receiver<u64>, Arc<Shared>) + Send + Sync>;

/// Per origin replicated here: its head and, at the leader, its uplink.
pub(super) struct ReplicaOrigin {
    pub(super) head: watch::Sender<u64>,
    pub(super) gateway: Arc<Shared>,
}

/// Links the replica store's writer to the rest of the site.
pub(super) struct ReplicaHooks {
    pub(super) site: String,
    pub(super) own_origin: String,
    pub(super) own_gateway: Arc<Shared>,
    pub(super) origins: Arc<Mutex<HashMap<String, ReplicaOrigin>>>,
    pub(super) spawn_uplink: SpawnUplink,
}

impl Hooks for ReplicaHooks {
    fn committed(&mut self, store: &Store) {
        let Ok(mut origins) = self.origins.lock() else {
            return;
        };
        for ((site, origin), state) in store.origins() {
            if *site != self.site || *origin == self.own_origin {
                continue;
            }
            match origins.get(origin) {
                Some(o) => {
                    o.head.send_if_modified(|h| {
                        let changed = *h < state.next;
                        *h = (*h).max(state.next);
                        changed
                    });
                }
                None => {
                    let (head, head_rx) = watch::channel(state.next);
                    let gateway = Arc::new(Shared::default());
                    (self.spawn_uplink)(origin.clone(), head_rx, gateway.clone());
                    origins.insert(origin.clone(), ReplicaOrigin { head, gateway });
                }
            }
        }
    }

    fn aggregate(&mut self, origin: &str, topic: &str, json: &str) {
        if let Ok(origins) = self.origins.lock() {
            if let Some(o) = origins.get(origin) {
                o.gateway.relay.offer(topic, json);
            }
        }
    }

    fn gateway_ack(&mut self, store: &mut Store, site: &str, origin: &str, next: u64) {
        if site != self.site {
            return;
        }
        if origin == self.own_origin {
            // The writer deletes its own log after the retention period.
            self.own_gateway.acked.fetch_max(next, Ordering::SeqCst);
            return;
        }
        if let Ok(origins) = self.origins.lock() {
            if let Some(o) = origins.get(origin) {
                o.gateway.acked.fetch_max(next, Ordering::SeqCst);
            }
        }
        match store.delete_below(site, origin, next) {
            Ok(0) => {}
            Ok(n) => tracing::debug!(origin, readings = n, "deleted replicas the gateway has"),
            Err(e) => tracing::warn!(origin, "cannot delete replicas the gateway has: {e}"),
        }
    }
}

/// The replica source of one origin, for the leader's uplink.
pub(super) struct ReplicaSource {
    pub(super) reader: StoreReader,
    pub(super) site: String,
    pub(super) origin: String,
}

impl Source for ReplicaSource {
    fn blocks_from(
        &self,
        from: u64,
        max_readings: u64,
        head: u64,
    ) -> anyhow::Result<Vec<crate::buffer::StoredBlock>> {
        Ok(self
            .reader
            .blocks_from(&self.site, &self.origin, from, max_readings, head)?)
    }
}

/// Where the replicas live.
pub fn replica_path(data_dir: &Path) -> PathBuf {
    data_dir.join("replicas.redb")
}
