//! Listeners: who may connect on each (the guard), and TLS handshakes.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::security::auth::Authenticator;

use super::rights::GatewayLogin;
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
    /// The gateway's listener: nodes known by their certificate, bound to the site it
    /// names; everyone else by [`GatewayLogin`].
    Gateway(Arc<GatewayDoor>),
}

/// Who may connect to the gateway.
pub struct GatewayDoor {
    /// `None`: no TLS (a lab): nobody has a certificate.
    pub tls: Option<GatewayTls>,
    pub login: Arc<GatewayLogin>,
}

/// The gateway's TLS: the CAs it trusts, and which of them are bound to a site.
pub struct GatewayTls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    /// Raw subject name of a per-site CA → its site ([`crate::security::tls`]).
    pub ca_sites: std::collections::HashMap<Vec<u8>, String>,
}

impl GatewayTls {
    /// The rights of a client that presented `certs` (none: it logs in instead).
    /// `Err((reason, detail))`: refused.
    pub fn rights(
        &self,
        certs: Option<&[rustls::pki_types::CertificateDer<'_>]>,
        login: &Arc<GatewayLogin>,
    ) -> Result<Rights, (&'static str, String)> {
        use crate::security::tls::{cert_issuer, cert_site, peer_name};
        let Some(cert) = certs.and_then(<[_]>::first) else {
            return Ok(Rights::GatewayLogin(login.clone()));
        };
        let node = peer_name(certs).unwrap_or_else(|| "?".into());
        let Some(site) = cert_site(cert) else {
            return Err((
                "no_site",
                format!(
                    "the certificate of node {node:?} names no site \
                     (make it with `fogline-agent certs node --site <site>`)"
                ),
            ));
        };
        if let Some(bound) = cert_issuer(cert).and_then(|i| self.ca_sites.get(&i)) {
            if *bound != site {
                return Err((
                    "foreign_site",
                    format!("node {node:?} claims site {site:?}, but its CA is site {bound:?}'s"),
                ));
            }
        }
        Ok(Rights::Uplink(Some(site.into())))
    }
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
                if !server.admit(peer, max_connections) {
                    drop(stream);
                    continue;
                }
                let _ = stream.set_nodelay(true);
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
                                    let certs = tls.get_ref().1.peer_certificates();
                                    let node = crate::security::tls::peer_name(certs);
                                    tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), "node link authenticated");
                                    conn::serve(&server, tls, peer, Rights::All).await;
                                }
                            })
                            .await;
                        }
                        Guard::Gateway(door) => {
                            Box::pin(server.gateway_serve(&door, stream, peer)).await;
                        }
                    }
                    server.left();
                });
            }
        }))
    }

    /// Serves one connection that came in some other way than a listener of its own (MQTT
    /// over a WebSocket on the gateway's HTTP listener), counted and limited as theirs.
    pub async fn serve_stream<S>(
        self: &Arc<Self>,
        stream: S,
        peer: SocketAddr,
        rights: Rights,
        max_connections: usize,
    ) where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        if !self.admit(peer, max_connections) {
            return;
        }
        conn::serve(self, stream, peer, rights).await;
        self.left();
    }

    /// Counts a connection in, unless `max_connections` are open (then refused).
    fn admit(&self, peer: SocketAddr, max_connections: usize) -> bool {
        if self.open.load(Ordering::SeqCst) >= max_connections {
            self.front.refuse(
                "max_connections",
                peer,
                &format!("{max_connections} connections open (mqtt.max_connections)"),
            );
            return false;
        }
        self.open.fetch_add(1, Ordering::SeqCst);
        self.count_open();
        true
    }

    /// Counts a connection out.
    fn left(&self) {
        self.open.fetch_sub(1, Ordering::SeqCst);
        self.count_open();
    }

    fn count_open(&self) {
        self.metrics
            .connections
            .set(i64::try_from(self.open.load(Ordering::SeqCst)).unwrap_or(0));
    }

    async fn gateway_serve(
        self: &Arc<Self>,
        door: &GatewayDoor,
        stream: tokio::net::TcpStream,
        peer: SocketAddr,
    ) {
        let Some(tls) = &door.tls else {
            let rights = Rights::GatewayLogin(door.login.clone());
            return conn::serve(self, stream, peer, rights).await;
        };
        let Some(stream) = self.tls_accept(&tls.acceptor, stream, peer).await else {
            return;
        };
        let certs = stream.get_ref().1.peer_certificates();
        match tls.rights(certs, &door.login) {
            Ok(rights) => {
                if let Rights::Uplink(Some(site)) = &rights {
                    let node = crate::security::tls::peer_name(certs);
                    tracing::info!(%peer, node = node.as_deref().unwrap_or("?"), site = &**site, "node link authenticated");
                }
                conn::serve(self, stream, peer, rights).await
            }
            Err((reason, detail)) => self.front.refuse(reason, peer, &detail),
        }
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
            Ok(Ok(tls)) => Some(tls),
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
