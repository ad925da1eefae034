//! One client connection, the I/O shell around [`Protocol`]: CONNECT ([`connect`]),
//! then bytes in, packets to the protocol, what it asks for done (readings offered to the
//! writer, messages routed, subscriptions told to the router), bytes out, until the
//! connection ends; then the will and the session's fate.
//!
//! [`connect`]: super::connect

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{
    DisconnectReasonCode, LastWill, LastWillProperties, Publish, PublishProperties,
};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::connect::{self, Opened};
use super::protocol::{Deliver, End, Protocol, Step, Subscribed, Violation};
use super::rights::Rights;
use super::session::Session;
use super::topic::Tag;
use super::Server;
use crate::ingest::{Commits, Done, Offered};

struct Conn<'a> {
    server: &'a Arc<Server>,
    session: Arc<Session>,
    generation: u64,
    proto: Protocol,
    /// The writer's commits of this connection's readings.
    commits: Arc<Commits>,
    will: Option<Box<(LastWill, Option<LastWillProperties>)>>,
    /// The client's address, for refusals logged while it is in.
    peer: SocketAddr,
}

/// Serves one client connection until it ends.
pub async fn serve<S>(server: &Arc<Server>, stream: S, peer: SocketAddr, rights: Rights)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let (mut reader, mut writer) = tokio::io::split(stream);
    let mut rbuf = BytesMut::with_capacity(512);
    // The CONNECT exchange holds far more state than the rest of a connection's life
    // (decoded packets, properties, credential checks), and a task is as large as its
    // largest state for as long as it lives: boxed, that state is freed once the client
    // is in, and an idle connection stays small.
    let opened = Box::pin(connect::open(
        server,
        &mut reader,
        &mut writer,
        &mut rbuf,
        peer,
        rights,
    ))
    .await;
    let Some(Opened {
        proto,
        session,
        generation,
        will,
        keep_alive,
    }) = opened
    else {
        return;
    };
    let mut conn = Conn {
        server,
        session,
        generation,
        proto,
        commits: Arc::new(Commits::default()),
        will,
        peer,
    };
    {
        let st = conn.session.lock();
        conn.proto.resend_inflight(&st, crate::now_ms());
    }
    let end = conn
        .run(&mut reader, &mut writer, &mut rbuf, keep_alive)
        .await;
    let _ = writer.shutdown().await;
    Box::pin(conn.finish(end)).await;
}

impl Conn<'_> {
    async fn run<R, W>(
        &mut self,
        reader: &mut R,
        writer: &mut W,
        rbuf: &mut BytesMut,
        keep_alive: Duration,
    ) -> End
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let mut deadline = tokio::time::Instant::now() + keep_alive;
        loop {
            // Everything already read.
            loop {
                match self.proto.read(rbuf) {
                    Ok(Some((packet, meta))) => {
                        deadline = tokio::time::Instant::now() + keep_alive;
                        let step = {
                            let mut st = self.session.lock();
                            self.proto.step(packet, meta, &mut st)
                        };
                        // Boxed: carrying out a step needs a large future (a decoded
                        // PUBLISH and its properties, the ingest queue's send) for a
                        // moment; inline, every idle connection would carry its room.
                        if let Some(end) = Box::pin(self.carry_out(step)).await {
                            let _ = write_out(writer, self.proto.output()).await;
                            return end;
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let _ = write_out(writer, self.proto.output()).await;
                        self.refuse(&e.0);
                        return End::Abnormal;
                    }
                }
            }
            if self.session.lock().conn != self.generation {
                self.proto
                    .disconnect(DisconnectReasonCode::SessionTakenOver);
                let _ = write_out(writer, self.proto.output()).await;
                return End::TakenOver;
            }
            if self.commits.failed() {
                // A batch with one of our readings was not stored: never ack it.
                return End::Abnormal;
            }
            if let Some(end) = self.flush_acks() {
                let _ = write_out(writer, self.proto.output()).await;
                return end;
            }
            {
                let mut st = self.session.lock();
                if st.conn == self.generation {
                    let server = self.server;
                    self.proto
                        .pump(&mut st, crate::now_ms(), |d| server.dropped(d));
                }
            }
            let out = self.proto.output();
            if !out.is_empty() {
                if write_out(writer, out).await.is_err() {
                    return End::Abnormal;
                }
                out.clear();
            }
            let closing = self.proto.closing();
            tokio::select! {
                r = reader.read_buf(rbuf), if !closing => match r {
                    Ok(0) | Err(_) => return End::Abnormal,
                    Ok(_) => {}
                },
                () = self.session.wake.notified() => {}
                () = self.session.kick.notified() => {}
                () = self.commits.notify.notified() => {}
                () = tokio::time::sleep_until(deadline), if !keep_alive.is_zero() => {
                    tracing::debug!(client = %self.session.client_id, "keep alive expired");
                    return End::Abnormal;
                }
            }
        }
    }

    fn refuse(&self, why: &Violation) {
        self.server.front.refuse(why.reason, self.peer, &why.detail);
    }

    /// Does what a step of the protocol asks; `Some` ends the connection.
    async fn carry_out(&mut self, step: Step) -> Option<End> {
        match step {
            Step::Done => None,
            Step::Publish {
                publish,
                props,
                qos,
                pkid,
                deliver,
            } => self.deliver(publish, props, qos, pkid, deliver).await,
            Step::Subscribed(s) => {
                self.subscribed(s).await;
                None
            }
            Step::Unsubscribed(filters) => {
                for f in &filters {
                    self.server.unsubscribed(&self.session, f);
                }
                None
            }
            Step::End(end, why) => {
                if let Some(why) = why {
                    self.refuse(&why);
                }
                Some(end)
            }
        }
    }

    async fn deliver(
        &mut self,
        publish: Publish,
        props: Option<PublishProperties>,
        qos: u8,
        pkid: u16,
        deliver: Deliver,
    ) -> Option<End> {
        let mut token = None;
        let mut refused = None;
        match deliver {
            Deliver::Drop(why) => self.server.dropped(why),
            Deliver::Reading => {
                let done = (qos > 0).then(|| Done {
                    commits: self.commits.clone(),
                    token: self.proto.next_token(),
                });
                token = done.as_ref().map(|d| d.token);
                match self
                    .server
                    .ingest
                    .offer(&publish.topic, &publish.payload, done)
                    .await
                {
                    Offered::Queued => {}
                    Offered::Rejected(why) => {
                        token = None;
                        refused = Some(why);
                    }
                    Offered::Closed => return Some(End::Abnormal),
                }
                if self.server.readings_wanted() {
                    Box::pin(self.route(publish, props, qos)).await;
                }
            }
            // Routing is boxed: its future is larger than a reading's whole path, and
            // inline it would size the future of every reading a connection waits with.
            Deliver::Route => Box::pin(self.route(publish, props, qos)).await,
        }
        self.proto.owe_ack(qos, pkid, token, refused);
        None
    }

    async fn route(&self, publish: Publish, props: Option<PublishProperties>, qos: u8) {
        let tag = Tag {
            qos,
            retain: publish.retain,
            at_ms: crate::now_ms(),
            from: self.session.client_id.clone(),
        };
        self.server
            .route(publish.topic, publish.payload, props, &tag)
            .await;
    }

    async fn subscribed(&self, s: Subscribed) {
        for f in &s.refused {
            self.server.front.refuse(
                "foreign_subscription",
                self.peer,
                &format!(
                    "client {:?} subscribed to {:?}",
                    self.session.client_id,
                    super::protocol::printable(f)
                ),
            );
        }
        for f in &s.replaced {
            // Replaced: the router is asked again (and sends retained messages).
            self.server.unsubscribed(&self.session, f);
        }
        for f in &s.added {
            self.server.subscribed(&self.session, f).await;
        }
    }

    /// The acks whose turn has come; `Some` ends the connection (a 3.1.1 client's reading
    /// refused for a reason that may pass: it sends it again after reconnecting).
    fn flush_acks(&mut self) -> Option<End> {
        let committed = self.commits.committed();
        let commits = &self.commits;
        let flushed = {
            let mut st = self.session.lock();
            self.proto
                .flush_acks(committed, |t| commits.take_refusal(t), &mut st)
        };
        let why = flushed.err()?;
        self.server.front.refuse(
            "reading_not_stored",
            self.peer,
            &format!(
                "MQTT 3.1.1 client {:?} disconnected instead of acknowledging a reading \
                 that was not stored ({}); it sends it again",
                self.session.client_id,
                why.as_str()
            ),
        );
        Some(End::Normal { will: false })
    }

    /// After the connection: the will, and the session's fate.
    async fn finish(self, end: End) {
        let client = self.session.client_id.clone();
        let publish_will = match end {
            End::TakenOver => return,
            End::Normal { will } => will,
            End::Abnormal => true,
        };
        let expiry = {
            let mut st = self.session.lock();
            if st.conn != self.generation {
                return;
            }
            st.conn = 0;
            st.rec.disconnected_at = Some(crate::now_ms());
            st.dirty = true;
            st.rec.expiry_secs
        };
        tracing::debug!(client = %client, "client disconnected");
        if publish_will {
            if let Some((will, props)) = self.will.map(|b| *b) {
                let delay = props
                    .as_ref()
                    .and_then(|p| p.delay_interval)
                    .unwrap_or(0)
                    .min(expiry);
                let server = self.server.clone();
                let session = self.session.clone();
                tokio::spawn(async move {
                    if delay > 0 {
                        tokio::time::sleep(Duration::from_secs(u64::from(delay))).await;
                        // A client back within the delay keeps its will unsent.
                        if session.lock().conn != 0 {
                            return;
                        }
                    }
                    let props = props.map(|p| PublishProperties {
                        payload_format_indicator: p.payload_format_indicator,
                        message_expiry_interval: p.message_expiry_interval,
                        topic_alias: None,
                        response_topic: p.response_topic,
                        correlation_data: p.correlation_data,
                        user_properties: p.user_properties,
                        subscription_identifiers: Vec::new(),
                        content_type: p.content_type,
                    });
                    let tag = Tag {
                        qos: will.qos as u8,
                        retain: will.retain,
                        at_ms: crate::now_ms(),
                        from: session.client_id.clone(),
                    };
                    server.route(will.topic, will.message, props, &tag).await;
                });
            }
        }
        if expiry == 0 {
            self.server.remove(&client).await;
        }
    }
}

/// Writes `bytes` and flushes: a stream that frames what it is given (a WebSocket, TLS)
/// sends it only then; on plain TCP the flush costs nothing.
pub(super) async fn write_out<W>(writer: &mut W, bytes: &[u8]) -> std::io::Result<()>
where
    W: AsyncWrite + Unpin + ?Sized,
{
    writer.write_all(bytes).await?;
    writer.flush().await
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every connection is one task holding this future: it must stay small for a Pi with
    /// a thousand sensors.
    #[tokio::test]
    async fn a_connection_task_is_small() {
        let dir = tempfile::tempdir().expect("tempdir");
        let server = super::super::tests::server(dir.path());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let fut = serve(&server, stream, addr, Rights::Open);
        let size = std::mem::size_of_val(&fut);
        eprintln!("connection future: {size} bytes");
        assert!(size < 2048, "a connection's future takes {size} bytes");
    }
}
