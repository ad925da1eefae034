//! [`MqttConn`] for minimq: the MQTT 5 client of the image.
//!
//! Why minimq (0.13) rather than rust-mqtt (0.6): both are `no_std`, async over
//! embedded-io-async and MQTT 5. minimq keeps the protocol chores inside — keepalive
//! pings, QoS 1 retransmission and in-flight accounting against the broker's receive
//! maximum — in caller-owned buffers with no allocator, and its `poll` is cancel-safe, so
//! it can be raced against the node's next deadline. rust-mqtt deliberately leaves
//! keepalive and retries to the application and needs a buffer provider (an allocator or
//! a bump arena) for packets. Reconnect timing is ours in both, which is what the node
//! and [`crate::backoff`] want.
//!
//! The transport is any embedded-io-async stream: embassy-net's `TcpSocket` in the image.
//! TLS would be another such stream (embedded-tls) — the agent has no TLS listener for
//! devices yet, so the image speaks plain MQTT.

use embassy_time::{with_deadline, Instant};
use minimq::{Connection, Error, Io, PubError, Publication, QoS, SubscriptionOptions, TopicFilter};

use crate::session::{Admission, MqttConn};

/// Why a minimq connection failed (the transport error type is erased: the loop only
/// logs and reconnects).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkError {
    /// The TCP stream failed or closed.
    Transport,
    /// The broker refused something or sent what the client could not accept.
    Broker,
    /// The client's own buffers were too small for the request.
    Resources,
}

impl<E> From<Error<E>> for LinkError {
    fn from(e: Error<E>) -> Self {
        match e {
            Error::Transport(_) | Error::WriteZero | Error::Disconnected => LinkError::Transport,
            Error::Peer(_) => LinkError::Broker,
            Error::NotReady | Error::InvalidRequest | Error::Resource(_) => LinkError::Resources,
            // minimq's error is non-exhaustive: anything new ends the connection too.
            _ => LinkError::Broker,
        }
    }
}

/// One minimq connection (a [`Connection`] borrows the session and owns the transport).
pub struct MinimqConn<'c, 'buf, IO: Io> {
    conn: Connection<'c, 'buf, IO>,
}

impl<'c, 'buf, IO: Io> MinimqConn<'c, 'buf, IO> {
    /// Wraps a connection returned by `Session::connect`.
    pub fn new(conn: Connection<'c, 'buf, IO>) -> Self {
        MinimqConn { conn }
    }
}

impl<IO: Io> MqttConn for MinimqConn<'_, '_, IO> {
    type Error = LinkError;

    async fn subscribe_qos1(&mut self, topic: &str) -> Result<(), LinkError> {
        let filter = TopicFilter::new(topic)
            .options(SubscriptionOptions::default().maximum_qos(QoS::AtLeastOnce));
        self.conn.subscribe(&[filter], &[]).await?;
        Ok(())
    }

    async fn publish_qos1(&mut self, topic: &str, payload: &[u8]) -> Result<Admission, LinkError> {
        let publication = Publication::bytes(topic, payload).qos(QoS::AtLeastOnce);
        match self.conn.publish(publication).await {
            Ok(_) => Ok(Admission::Sent),
            // The broker's receive maximum or our TX buffer is used up until PUBACKs come.
            Err(PubError::Session(Error::NotReady)) => Ok(Admission::Busy),
            Err(PubError::Session(e)) => Err(e.into()),
            // A byte slice cannot fail to serialise.
            Err(PubError::Payload(_)) => Err(LinkError::Resources),
        }
    }

    async fn poll_until(
        &mut self,
        deadline_ms: u64,
        on_message: &mut dyn FnMut(&str, &[u8]),
    ) -> Result<(), LinkError> {
        // minimq's poll is cancel-safe: leaving it at the deadline loses nothing.
        match with_deadline(Instant::from_millis(deadline_ms), self.conn.poll()).await {
            Err(_timeout) => Ok(()),
            Ok(Ok(Some(message))) => {
                on_message(message.topic(), message.payload());
                Ok(())
            }
            Ok(Ok(None)) => Ok(()),
            Ok(Err(e)) => Err(e.into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_map_to_what_the_loop_needs_to_know() {
        let table: [(Error<()>, LinkError); 5] = [
            (Error::Transport(()), LinkError::Transport),
            (Error::WriteZero, LinkError::Transport),
            (Error::Disconnected, LinkError::Transport),
            (Error::InvalidRequest, LinkError::Resources),
            (Error::NotReady, LinkError::Resources),
        ];
        for (error, want) in table {
            let what = std::format!("{error:?}");
            assert_eq!(LinkError::from(error), want, "{what}");
        }
    }
}
