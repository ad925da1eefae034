//! Listeners: who may connect on each (the guard), and TLS handshakes.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::security::auth::Authenticator;

use super::{conn, Rights, Server};

/// Who may connect on a listener, and with what rights.
#[derive(Clone)]
pub enum Guard {
    /// Anyone (`auth.mode = "open"`).
    Open,
    /// Devices with credentials, each under its own topics.
    Devices(Arc<Authenticator>),
    /// The site's node listener without TLS (a lab).
    Node,
    /// The site's node listener: TLS with a client certificate from the site CA.
    Tls(tokio_rustls::TlsAcceptor),
}

impl Server {
    /// Accepts connections on `listener` until the runtime stops.
    pub fn listen(
        self: &Arc<Self>,
        listener: StdListener,
        guard: Guard,
        max_connections: usize,
    ) -> std::io::Result<tokio::task::JoinHandle<()>> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let server = self.clone();
        Ok(tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("MQTT accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if server.open.load(Ordering::SeqCst) >= max_connections {
                    server.front.refuse(
                        "max_connections",
                        peer,
                        &format!("{max_connections} connections open (mqtt.max_connections)"),
                    );
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
                server.open.fetch_add(1, Ordering::SeqCst);
                server
                    .metrics
                    .connections
                    .set(i64::try_from(server.open.load(Ordering::SeqCst)).unwrap_or(0));
                let server = server.clone();
                let guard = guard.clone();
                tokio::spawn(async move {
                    match guard {
                        Guard::Open => conn::serve(&server, stream, peer, Rights::Open).await,
                        Guard::Devices(auth) => {
                            conn::serve(&server, stream, peer, Rights::Authenticate(auth)).await
                        }
                        Guard::Node => conn::serve(&server, stream, peer, Rights::All).await,
                        Guard::Tls(acceptor) => {
                            // Boxed: a TLS stream is large, and inline it would size
                            // every plain connection's task too.
                            Box::pin(async {
                                if let Some(tls) = server.tls_accept(&acceptor, stream, peer).await
                                {
                                    conn::serve(&server, tls, peer, Rights::All).await;
                                }
                            })
                            .await;
                        }
                    }
                    server.open.fetch_sub(1, Ordering::SeqCst);
                    server
                        .metrics
                        .connections
                        .set(i64::try_from(server.open.load(Ordering::SeqCst)).unwrap_or(0));
                });
            }
        }))
    }

    pub(super) async fn tls_accept(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<tokio::net::TcpStream>> {
        let accepted =
            tokio::time::timeout(self.settings.connect_timeout, acceptor.accept(stream)).await;
        match accepted {
            Ok(Ok(tls)) => {
                let node = crate::security::tls::peer_name(tls.get_ref().1.peer_certificates());
                tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), "node link authenticated");
                Some(tls)
            }
            Ok(Err(e)) => {
                let (reason, detail) = crate::security::tls::classify_tls(&e);
                self.front.refuse(reason, peer, &detail);
                None
            }
            Err(_) => {
                self.front
                    .refuse("tls_handshake", peer, "no handshake in time");
                None
            }
        }
    }
}
