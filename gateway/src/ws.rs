//! MQTT over WebSocket on the gateway's HTTP listener: path `/mqtt`, subprotocol `mqtt`
//! (what MQTT.js, Paho and HiveMQ's clients use), for dashboards in a browser. Each
//! WebSocket carries one MQTT connection, served by the same front end and with the same
//! rights as a client of `mqtt.listen` without a certificate: a dashboard login or the
//! `access.anonymous` policy (read-only unless the lab policy `"node"` says otherwise).
//!
//! The WebSocket framing is axum's (tokio-tungstenite); [`WsIo`] only turns its binary
//! messages into the byte stream the MQTT codec reads.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, State};
use axum::response::Response;
use fogline_agent::mqtt::{GatewayLogin, Rights, Server};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// What the `/mqtt` route needs.
pub struct WsDoor {
    pub server: Arc<Server>,
    pub login: Arc<GatewayLogin>,
    pub max_connections: usize,
    pub max_packet: usize,
}

/// The route, on the gateway's HTTP router.
pub fn routes(door: Arc<WsDoor>) -> axum::Router {
    axum::Router::new()
        .route("/mqtt", axum::routing::get(upgrade))
        .with_state(door)
}

async fn upgrade(
    State(door): State<Arc<WsDoor>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    ws: WebSocketUpgrade,
) -> Response {
    let max_packet = door.max_packet;
    ws.protocols(["mqtt"])
        .max_message_size(max_packet.saturating_add(16))
        .on_upgrade(move |socket| async move {
            let rights = Rights::GatewayLogin(door.login.clone());
            door.server
                .serve_stream(WsIo::new(socket), peer, rights, door.max_connections)
                .await;
        })
}

/// A WebSocket as a byte stream: binary messages in, one binary message per write out.
pub struct WsIo {
    ws: WebSocket,
    /// The rest of the last message read.
    pending: bytes::Bytes,
}

impl WsIo {
    pub fn new(ws: WebSocket) -> WsIo {
        WsIo {
            ws,
            pending: bytes::Bytes::new(),
        }
    }
}

fn io_error(e: axum::Error) -> std::io::Error {
    std::io::Error::other(e)
}

impl AsyncRead for WsIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        loop {
            if !self.pending.is_empty() {
                let n = self.pending.len().min(buf.remaining());
                let chunk = self.pending.split_to(n);
                buf.put_slice(&chunk);
                return Poll::Ready(Ok(()));
            }
            match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                // The end of the stream: EOF.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(data))) => self.pending = data,
                // Pings are answered by the WebSocket itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        "MQTT over WebSocket is binary; a text message is not MQTT",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(io_error(e))),
            }
        }
    }
}

impl AsyncWrite for WsIo {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io_error)?;
        ws.start_send(Message::Binary(bytes::Bytes::copy_from_slice(data)))
            .map_err(io_error)?;
        Poll::Ready(Ok(data.len()))
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_flush(cx).map_err(io_error)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.ws).poll_close(cx).map_err(io_error)
    }
}
