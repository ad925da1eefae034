//! Messages between sessions: subscriptions through each session's router link, client
//! publishes into the router, deliveries at min(publish, granted) QoS with retain,
//! expiry and No Local applied; the agent's own `fogline/ack/…` topics and `$SYS` served
//! without the router.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::Notification;

use super::session::{Dropped, Msg, Props, Session};
use super::topic::{self, Tag};
use super::Server;

pub(super) struct SessionLink {
    pub(super) tx: LinkTx,
    pub(super) task: tokio::task::AbortHandle,
}

/// Topics only the agent publishes, served by the front end itself.
pub const LOCAL_PREFIX: &str = "fogline/ack/";

pub(super) fn is_local_exact(filter: &str) -> bool {
    filter.starts_with(LOCAL_PREFIX) && !filter.contains(['+', '#'])
}

#[derive(Default)]
pub(super) struct LocalTopics {
    /// The latest message of each topic.
    pub(super) retained: HashMap<String, Bytes>,
    /// Sessions subscribed to each topic by its exact name.
    pub(super) exact: HashMap<String, Vec<std::sync::Weak<Session>>>,
}

/// Watches the link every client publish enters the router by. The router disconnects a
/// link whose publish it refuses (a topic alias it does not know, say): after that every
/// client's publishes would go nowhere. The front end never passes such a publish on
/// (aliases are resolved per connection); if the router closes the link anyway, a new one
/// takes over.
pub(super) async fn watch_front_link(server: std::sync::Weak<Server>, mut rx: LinkRx) {
    loop {
        let closed = match rx.next().await {
            Ok(Some(Notification::Disconnect(..))) | Err(_) => true,
            Ok(_) => false,
        };
        if !closed {
            continue;
        }
        let Some(server) = server.upgrade() else {
            return;
        };
        let name = format!("fogline-front-{}", server.next_generation());
        let maker = server.clone();
        let made = tokio::task::spawn_blocking(move || (maker.make_link)(&name)).await;
        match made {
            Ok(Ok((tx, new_rx))) => {
                tracing::error!(
                    "the router closed the link of client publishes; a new one took over"
                );
                *server.publish.lock().await = tx;
                rx = new_rx;
            }
            Ok(Err(e)) => {
                tracing::error!("the router closed the link of client publishes: {e}");
                return;
            }
            Err(e) => {
                tracing::error!("the router closed the link of client publishes: {e}");
                return;
            }
        }
    }
}

/// Reads a session's router link for as long as the session lives.
pub(super) async fn drain(server: Arc<Server>, session: std::sync::Weak<Session>, mut rx: LinkRx) {
    loop {
        match rx.next().await {
            Ok(Some(Notification::Forward(f))) => {
                let Some(session) = session.upgrade() else {
                    return;
                };
                server.offer(&session, f.publish, f.properties);
            }
            Ok(Some(Notification::Unschedule)) => {
                if rx.wake().await.is_err() {
                    return;
                }
            }
            Ok(_) => {}
            Err(_) => return,
        }
    }
}

impl Server {
    pub(super) fn lock_local(&self) -> std::sync::MutexGuard<'_, LocalTopics> {
        self.local.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts what a subscription to `filter` asks of the router; true when it is served
    /// here instead (an exact `fogline/ack/…` topic).
    pub(super) fn track(&self, session: &Arc<Session>, filter: &str) -> bool {
        if topic::may_match_readings(filter) {
            self.reading_subs.fetch_add(1, Ordering::SeqCst);
        }
        if is_local_exact(filter) {
            let mut local = self.lock_local();
            local
                .exact
                .entry(filter.to_owned())
                .or_default()
                .push(Arc::downgrade(session));
            return true;
        }
        if topic::may_match_local(filter) {
            self.local_wildcards.fetch_add(1, Ordering::SeqCst);
        }
        false
    }

    /// Undoes [`Server::track`].
    pub(super) fn untrack(&self, session: &Session, filter: &str) {
        let dec = |n: &AtomicUsize| {
            let _ = n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
        };
        if topic::may_match_readings(filter) {
            dec(&self.reading_subs);
        }
        if is_local_exact(filter) {
            let mut local = self.lock_local();
            if let Some(list) = local.exact.get_mut(filter) {
                list.retain(|w| w.strong_count() > 0 && !std::ptr::eq(w.as_ptr(), session));
                if list.is_empty() {
                    local.exact.remove(filter);
                }
            }
        } else if topic::may_match_local(filter) {
            dec(&self.local_wildcards);
        }
    }

    /// The agent's own messages on `fogline/ack/…` (retained): kept here and delivered to
    /// exact subscribers directly, and to the router only when a wildcard subscription
    /// could want them.
    pub fn publish_local(&self, messages: &[(String, String)]) -> bool {
        let now = crate::now_ms();
        for (topic, payload) in messages {
            let payload = Bytes::from(payload.clone());
            let subscribers: Vec<Arc<Session>> = {
                let mut local = self.lock_local();
                local.retained.insert(topic.clone(), payload.clone());
                local
                    .exact
                    .get(topic)
                    .map(|l| l.iter().filter_map(std::sync::Weak::upgrade).collect())
                    .unwrap_or_default()
            };
            for session in subscribers {
                let publish = Publish::new(Bytes::from(topic.clone()), payload.clone(), false);
                self.offer_at(&session, publish, None, Tag::internal(now), now);
            }
        }
        self.local_wildcards.load(Ordering::SeqCst) > 0
    }

    /// Does anyone subscribe to something that matches readings?
    pub fn readings_wanted(&self) -> bool {
        self.reading_subs.load(Ordering::SeqCst) > 0
    }

    /// After a session added `filter`: subscribe its router link (made on first use).
    /// `$` filters are served from `Server::sys` instead.
    pub async fn subscribed(self: &Arc<Self>, session: &Arc<Session>, filter: &str) {
        if self.track(session, filter) {
            let retained = self.lock_local().retained.get(filter).cloned();
            if let Some(payload) = retained {
                let publish = Publish::new(Bytes::from(filter.to_owned()), payload, true);
                let now = crate::now_ms();
                self.offer_at(session, publish, None, Tag::internal(now), now);
            }
            return;
        }
        if filter.starts_with('$') {
            self.offer_sys(session, filter);
            return;
        }
        let client = session.client_id.clone();
        let has_link = self.lock_links().contains_key(&client);
        if !has_link {
            let name = format!("fl{}-{}", self.next_generation(), client);
            let server = self.clone();
            let made = tokio::task::spawn_blocking(move || (server.make_link)(&name)).await;
            let (tx, rx) = match made {
                Ok(Ok(link)) => link,
                Ok(Err(e)) => {
                    tracing::error!(client = %client, "no router link for a session: {e}");
                    return;
                }
                Err(e) => {
                    tracing::error!(client = %client, "no router link for a session: {e}");
                    return;
                }
            };
            let task = tokio::spawn(drain(self.clone(), Arc::downgrade(session), rx));
            self.lock_links().insert(
                client.clone(),
                SessionLink {
                    tx,
                    task: task.abort_handle(),
                },
            );
        }
        // rumqttd forwards retained messages on every SUBSCRIBE of a local link, whatever
        // its retain rule; Retain Handling is applied in `offer`.
        if let Some(link) = self.lock_links().get_mut(&client) {
            if let Err(e) = link.tx.subscribe(filter) {
                tracing::error!(client = %client, "router subscribe failed: {e}");
            }
        }
    }

    /// After a session dropped `filter`.
    pub fn unsubscribed(&self, session: &Session, filter: &str) {
        self.untrack(session, filter);
        if filter.starts_with('$') || is_local_exact(filter) {
            return;
        }
        if let Some(link) = self.lock_links().get_mut(&session.client_id) {
            let _ = link.tx.unsubscribe(filter);
        }
    }

    /// Hands a client's (or a will's) publish to the router.
    pub async fn route(
        &self,
        topic: Bytes,
        payload: Bytes,
        props: Option<PublishProperties>,
        tag: &Tag,
    ) {
        let publish = Publish::new(topic, payload, tag.retain);
        let props = tag.attach(props);
        let mut link = self.publish.lock().await;
        if let Err(e) = link.send(Packet::Publish(publish, Some(props))).await {
            tracing::error!("the router is gone: {e}");
        }
    }

    /// A message from the router for `session`: delivered per its subscriptions, once
    /// (the router forwards it once per matching filter).
    pub(super) fn offer(
        &self,
        session: &Session,
        publish: Publish,
        mut props: Option<PublishProperties>,
    ) {
        let now = crate::now_ms();
        let tagged = Tag::detach(&mut props);
        // The router marks retained messages it sends right after a SUBSCRIBE: those
        // come through the new filter only.
        if let (Some((_, id)), false) = (&tagged, publish.retain) {
            let Ok(topic) = std::str::from_utf8(&publish.topic) else {
                return;
            };
            if session.lock().repeated(*id, topic) {
                return;
            }
        }
        let tag = tagged.map_or_else(|| Tag::internal(now), |(t, _)| t);
        self.offer_at(session, publish, props, tag, now);
    }

    pub(super) fn offer_at(
        &self,
        session: &Session,
        publish: Publish,
        props: Option<PublishProperties>,
        tag: Tag,
        now: i64,
    ) {
        // The router marks retained messages it sends right after a SUBSCRIBE.
        let retained_delivery = publish.retain;
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return;
        };
        let expires_at = props
            .as_ref()
            .and_then(|p| p.message_expiry_interval)
            .map(|s| tag.at_ms.saturating_add(i64::from(s) * 1000));
        let mut st = session.lock();
        let v5 = st.rec.v5;
        let mut granted: Option<u8> = None;
        let (mut rap, mut retained_ok, mut ids) = (false, false, Vec::new());
        for s in st.matching(topic) {
            if s.no_local && !tag.from.is_empty() && tag.from == session.client_id {
                continue;
            }
            granted = Some(granted.map_or(s.qos, |g| g.max(s.qos)));
            rap |= s.retain_as_published;
            retained_ok |= s.retained_ok;
            ids.extend(s.id);
        }
        let Some(granted) = granted else {
            return;
        };
        if retained_delivery && !retained_ok {
            return;
        }
        if expires_at.is_some_and(|at| at <= now) {
            self.dropped(Dropped::Expired);
            return;
        }
        let mut p = Props::from_publish(props);
        if v5 {
            p.subscription_ids = ids;
        }
        let msg = Msg {
            topic: publish.topic.to_vec(),
            payload: publish.payload.to_vec(),
            qos: tag.qos.min(granted),
            retain: retained_delivery || (v5 && rap && tag.retain),
            expires_at,
            props: p,
            sent: false,
        };
        let queued = st.queue(msg, self.settings.max_queued);
        drop(st);
        if let Err(d) = queued {
            self.dropped(d);
        }
        session.wake.notify_one();
    }

    /// The `$SYS` messages matching `filter`, as retained messages.
    pub(super) fn offer_sys(&self, session: &Session, filter: &str) {
        let mut st = session.lock();
        for (topic, payload) in &self.sys {
            if !topic::matches(filter, topic) {
                continue;
            }
            let msg = Msg {
                topic: topic.as_bytes().to_vec(),
                payload: payload.to_vec(),
                qos: 0,
                retain: true,
                expires_at: None,
                props: Props::default(),
                sent: false,
            };
            let _ = st.queue(msg, self.settings.max_queued);
        }
        drop(st);
        session.wake.notify_one();
    }
}
