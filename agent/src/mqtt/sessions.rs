//! Sessions: restored from `sessions.redb` at start, attached to a connection (taking
//! one over from another connection), removed when they expire, written back every
//! 100 ms while they change.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::{Disconnect, DisconnectReasonCode, Packet};

use super::session::{Record, Session};
use super::Server;

/// How often changed sessions are written to `sessions.redb`.
const PERSIST_EVERY: Duration = Duration::from_millis(100);

/// Writes sessions every `PERSIST_EVERY` (100 ms) until `stop`, then once more.
pub async fn persist_loop(server: Arc<Server>, mut stop: crate::shutdown::Shutdown) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(PERSIST_EVERY) => {}
            () = stop.fired() => break,
        }
        server.persist().await;
    }
    server.persist().await;
}

impl Server {
    /// Loads the sessions kept in `sessions.redb` and subscribes them again.
    pub async fn restore(self: &Arc<Self>) -> Result<usize, String> {
        let Some(store) = &self.store else {
            return Ok(0);
        };
        let records = store.load().map_err(|e| e.to_string())?;
        let now = crate::now_ms();
        let mut kept = 0;
        for (client, mut rec) in records {
            let since = *rec.disconnected_at.get_or_insert(now);
            let expires = since.saturating_add(i64::from(rec.expiry_secs) * 1000);
            if rec.expiry_secs == 0 || expires <= now {
                self.forget(&client);
                continue;
            }
            let filters: Vec<String> = rec.subs.iter().map(|s| s.filter.clone()).collect();
            let session = Session::new(client.clone(), rec);
            session.lock().stored = true;
            self.lock_sessions().insert(client.clone(), session.clone());
            for f in filters {
                self.subscribed(&session, &f).await;
            }
            kept += 1;
        }
        self.metrics
            .sessions
            .set(i64::try_from(self.lock_sessions().len()).unwrap_or(0));
        Ok(kept)
    }

    pub fn next_generation(&self) -> u64 {
        self.generation.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// Takes the session of `client` for a new connection: a fresh one when `clean` or
    /// when none exists. Returns it and whether an old one was resumed. The connection
    /// that held it before is told to go.
    pub async fn attach(
        self: &Arc<Self>,
        client: &str,
        clean: bool,
        rec: Record,
        generation: u64,
    ) -> (Arc<Session>, bool) {
        let old = self.lock_sessions().get(client).cloned();
        if let Some(old) = &old {
            // Whoever held it goes first (session takeover).
            old.lock().conn = 0;
            old.kick.notify_waiters();
        }
        let resumed = match old {
            Some(old) if !clean => {
                {
                    let mut st = old.lock();
                    st.rec.v5 = rec.v5;
                    st.rec.expiry_secs = rec.expiry_secs;
                    st.rec.disconnected_at = None;
                    st.conn = generation;
                    st.dirty = true;
                }
                return (old, true);
            }
            Some(_) => {
                self.remove(client).await;
                false
            }
            None => false,
        };
        let session = Session::new(client.to_owned(), rec);
        session.lock().conn = generation;
        let mut sessions = self.lock_sessions();
        sessions.insert(client.to_owned(), session.clone());
        self.metrics
            .sessions
            .set(i64::try_from(sessions.len()).unwrap_or(0));
        (session, resumed)
    }

    /// Ends a session: its subscriptions, its router link, its record.
    pub async fn remove(&self, client: &str) {
        let session = {
            let mut sessions = self.lock_sessions();
            let s = sessions.remove(client);
            self.metrics
                .sessions
                .set(i64::try_from(sessions.len()).unwrap_or(0));
            s
        };
        let mut stored = false;
        if let Some(session) = session {
            let subs = {
                let mut st = session.lock();
                stored = st.stored;
                std::mem::take(&mut st.rec.subs)
            };
            for s in subs {
                self.untrack(&session, &s.filter);
            }
        }
        let link = self.lock_links().remove(client);
        if let Some(mut link) = link {
            link.task.abort();
            let bye = Packet::Disconnect(
                Disconnect {
                    reason_code: DisconnectReasonCode::NormalDisconnection,
                },
                None,
            );
            let _ = link.tx.send(bye).await;
        }
        // Clean sessions never reach the store: nothing to delete (and no transaction).
        if stored {
            self.forget(client);
        }
    }

    pub(super) fn forget(&self, client: &str) {
        self.deleted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(client.to_owned());
    }

    /// Writes changed persistent sessions and deletes ended ones; drops sessions whose
    /// expiry passed.
    pub async fn persist(self: &Arc<Self>) {
        let now = crate::now_ms();
        // Deletes first, taken before the records are read: a session removed after this
        // point is deleted in the next round, one created again is written after its
        // old record went.
        let delete: Vec<String> =
            std::mem::take(&mut *self.deleted.lock().unwrap_or_else(|e| e.into_inner()));
        let sessions: Vec<Arc<Session>> = self.lock_sessions().values().cloned().collect();
        let mut put = Vec::new();
        let mut expired = Vec::new();
        for s in sessions {
            let mut st = s.lock();
            if st.conn == 0 {
                if let Some(at) = st.rec.disconnected_at {
                    if at.saturating_add(i64::from(st.rec.expiry_secs) * 1000) <= now {
                        expired.push(s.client_id.clone());
                        continue;
                    }
                }
            }
            if st.dirty && st.rec.expiry_secs > 0 {
                st.dirty = false;
                st.stored = true;
                match postcard::to_allocvec(&st.rec) {
                    Ok(bytes) => put.push((s.client_id.clone(), bytes)),
                    Err(e) => {
                        tracing::error!(client = %s.client_id, "cannot encode a session: {e}")
                    }
                }
            }
        }
        for client in expired {
            tracing::debug!(client = %client, "session expired");
            self.remove(&client).await;
        }
        if put.is_empty() && delete.is_empty() {
            return;
        }
        let server = self.clone();
        let written = tokio::task::spawn_blocking(move || match &server.store {
            Some(store) => store.write(&put, &delete).map_err(|e| e.to_string()),
            None => Ok(()),
        })
        .await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!("could not save sessions: {e}"),
            Err(e) => tracing::error!("could not save sessions: {e}"),
        }
    }
}
