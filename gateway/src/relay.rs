//! The gateway's TLS front end: rumqttd's own TLS needs its `verify-client-cert` feature,
//! a second rustls and x509 stack, and only logs a refused handshake. So the gateway's
//! public listener is this relay: TLS with a client certificate signed by the site CA
//! (rustls), each refusal logged with its reason and the peer address and counted, then
//! the bytes copied to rumqttd on a loopback port. Connections beyond `max_connections`
//! are refused and counted.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fogline_agent::mqtt::refusals::FrontMetrics;
use fogline_agent::security::tls::classify_tls;
use tokio::net::{TcpListener, TcpStream};

/// What a front end checks before relaying.
#[derive(Clone)]
pub enum Guard {
    /// TLS with a client certificate signed by the site CA.
    Tls(tokio_rustls::TlsAcceptor),
    /// Nothing: a plain relay (the relay's own tests).
    #[cfg(test)]
    Plain,
}

/// A public listener and where it relays to.
pub struct Front {
    pub listener: StdListener,
    pub backend: SocketAddr,
    pub guard: Guard,
    pub max_connections: usize,
    pub connect_timeout: Duration,
    pub metrics: Arc<FrontMetrics>,
}

/// A free loopback address for rumqttd to listen on behind a front end. (Bound and
/// released: the broker binds it again a moment later.)
pub fn internal_addr() -> std::io::Result<SocketAddr> {
    StdListener::bind("127.0.0.1:0")?.local_addr()
}

impl Front {
    /// Accepts connections until the runtime stops.
    pub fn spawn(self) -> std::io::Result<tokio::task::JoinHandle<()>> {
        self.listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(self.listener)?;
        let shared = Arc::new(Shared {
            backend: self.backend,
            guard: self.guard,
            connect_timeout: self.connect_timeout,
            metrics: self.metrics,
        });
        let open = Arc::new(AtomicUsize::new(0));
        let max = self.max_connections;
        Ok(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        // EMFILE and friends: wait instead of spinning.
                        tracing::warn!("front end accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if open.load(Ordering::SeqCst) >= max {
                    shared.metrics.refuse(
                        "max_connections",
                        peer,
                        &format!("{max} connections open (mqtt.max_connections)"),
                    );
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                open.fetch_add(1, Ordering::SeqCst);
                let shared = shared.clone();
                let open = open.clone();
                tokio::spawn(async move {
                    shared.serve(stream, peer).await;
                    open.fetch_sub(1, Ordering::SeqCst);
                });
            }
        }))
    }
}

struct Shared {
    backend: SocketAddr,
    guard: Guard,
    connect_timeout: Duration,
    metrics: Arc<FrontMetrics>,
}

impl Shared {
    async fn serve(&self, stream: TcpStream, peer: SocketAddr) {
        match &self.guard {
            Guard::Tls(acceptor) => self.serve_tls(acceptor, stream, peer).await,
            #[cfg(test)]
            Guard::Plain => {
                let mut stream = stream;
                if let Some(mut backend) = self.backend().await {
                    let _ = tokio::io::copy_bidirectional(&mut stream, &mut backend).await;
                }
            }
        }
    }

    async fn backend(&self) -> Option<TcpStream> {
        match TcpStream::connect(self.backend).await {
            Ok(s) => {
                let _ = s.set_nodelay(true);
                Some(s)
            }
            Err(e) => {
                tracing::error!(backend = %self.backend, "front end cannot reach the broker: {e}");
                None
            }
        }
    }

    async fn serve_tls(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: TcpStream,
        peer: SocketAddr,
    ) {
        let accepted = tokio::time::timeout(self.connect_timeout, acceptor.accept(stream)).await;
        let mut tls = match accepted {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                let (reason, detail) = classify_tls(&e);
                self.metrics.refuse(reason, peer, &detail);
                return;
            }
            Err(_) => {
                self.metrics
                    .refuse("tls_handshake", peer, "no handshake in time");
                return;
            }
        };
        let node = fogline_agent::security::tls::peer_name(tls.get_ref().1.peer_certificates());
        tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), "node link authenticated");
        let Some(mut backend) = self.backend().await else {
            return;
        };
        let _ = tokio::io::copy_bidirectional(&mut tls, &mut backend).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_counted() {
        let backend = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let listener = StdListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let metrics = FrontMetrics::new(Duration::from_secs(10));
        let front = Front {
            listener,
            backend: backend.local_addr().expect("addr"),
            guard: Guard::Plain,
            max_connections: 1,
            connect_timeout: Duration::from_secs(5),
            metrics: metrics.clone(),
        };
        let task = front.spawn().expect("spawn");
        // The first connection holds the only slot (relayed to a backend that never
        // answers).
        let _first = TcpStream::connect(addr).await.expect("connect");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut second = TcpStream::connect(addr).await.expect("connect");
        let mut buf = [0u8; 1];
        let n = tokio::time::timeout(Duration::from_secs(5), second.read(&mut buf))
            .await
            .expect("closed in time")
            .unwrap_or(0);
        assert_eq!(n, 0, "the second connection is closed");
        assert_eq!(metrics.refused_total("max_connections"), 1);
        task.abort();
    }
}
