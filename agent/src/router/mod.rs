//! rumqttd's router inside the agent (and the gateway): its configuration, the in-process
//! links the stages talk to it through ([`receive`] for what a link subscribed to), and
//! [`Worker`], the thread that reads one. The agent's own retained messages go in
//! through the MQTT front end's `Publisher`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rumqttd::local::LinkBuilder;
pub use rumqttd::local::{LinkError, LinkRx, LinkTx};
use rumqttd::protocol::Publish;
use rumqttd::{Notification, Router, RouterConfig};

/// Makes an in-process link to the router, by name.
pub type MakeLink = dyn Fn(&str) -> Result<(LinkTx, LinkRx), Box<LinkError>> + Send + Sync;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BrokerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the broker did not start listening on {0} within 5 s")]
    NotListening(SocketAddr),
    #[error("broker link: {0}")]
    Link(Box<LinkError>),
    #[error("{0}")]
    Config(String),
}

impl From<LinkError> for BrokerError {
    fn from(e: LinkError) -> Self {
        BrokerError::Link(Box::new(e))
    }
}

/// Receives the publishes a link subscribed to and hands each to `on_publish` until `stop`
/// is set, the link closes, or `on_publish` returns false. Answers rumqttd's
/// `Unschedule` (sent after `max_outgoing_packet_count` forwards), without which
/// delivery stops.
pub fn receive(mut rx: LinkRx, stop: &AtomicBool, mut on_publish: impl FnMut(Publish) -> bool) {
    while !stop.load(Ordering::SeqCst) {
        let notification = match rx.recv_deadline(Instant::now() + Duration::from_millis(100)) {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            Err(LinkError::RecvTimeout(flume::RecvTimeoutError::Timeout)) => continue,
            Err(e) => {
                tracing::error!("a broker link closed: {e}");
                return;
            }
        };
        let keep_going = match notification {
            Notification::Forward(forward) => on_publish(forward.publish),
            Notification::Unschedule => match rx.ready() {
                Ok(()) => true,
                Err(e) => {
                    tracing::error!("a broker link closed: {e}");
                    false
                }
            },
            _ => true,
        };
        if !keep_going {
            return;
        }
    }
}

/// A background thread that runs until [`Worker::stop`].
pub struct Worker {
    handle: Option<std::thread::JoinHandle<()>>,
    stop: Arc<AtomicBool>,
}

impl Worker {
    pub fn spawn(
        name: &str,
        f: impl FnOnce(&AtomicBool) + Send + 'static,
    ) -> std::io::Result<Worker> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || f(&flag))?;
        Ok(Worker {
            handle: Some(handle),
            stop,
        })
    }

    /// Asks the thread to stop and waits for it.
    pub fn stop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(handle) = self.handle.take() {
            let _ = handle.join();
        }
    }
}

/// Both ends of an in-process link to the broker.
pub type Link = (LinkTx, LinkRx);

/// rumqttd keeps an in-memory log per subscription filter. Its sample sizes (100 MB × 10)
/// are absurd for a Pi: every filter gets a small log, and the filters that carry bulk
/// traffic (`bulk_filters`: site traffic, dashboards) a larger one.
pub fn router_config(max_connections: usize, bulk_filters: &[&str]) -> RouterConfig {
    let big = rumqttd::SegmentConfig {
        max_segment_size: 1 << 20,
        max_segment_count: 4,
    };
    RouterConfig {
        // A link per session that subscribes, and sessions outlive connections.
        max_connections: 2 * max_connections + 16,
        max_outgoing_packet_count: 200,
        max_segment_size: 4 << 10,
        max_segment_count: 2,
        custom_segment: Some(
            bulk_filters
                .iter()
                .map(|f| ((*f).to_owned(), big.clone()))
                .collect(),
        ),
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
    }
}

/// Starts rumqttd's router on its own thread and returns a maker of in-process links.
pub fn start_router(config: RouterConfig) -> Box<MakeLink> {
    let router_tx = Router::new(0, config).spawn();
    Box::new(move |name: &str| {
        LinkBuilder::new(name, router_tx.clone())
            .dynamic_filters(true)
            .build()
            .map(|(tx, rx, _)| (tx, rx))
            .map_err(Box::new)
    })
}
