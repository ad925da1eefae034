//! The local HTTP surface: `/healthz`, `/metrics` (Prometheus text), `/status` (JSON).

use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use tokio::net::TcpListener;

use crate::ops::metrics::Metrics;
use crate::writer::BufferStatus;

pub struct AppState {
    pub node_id: String,
    pub site: String,
    pub metrics: Arc<Metrics>,
    pub buffer: Arc<Mutex<BufferStatus>>,
    pub uplink: Option<Arc<crate::uplink::Shared>>,
    /// The site cluster, when the agent has peers.
    pub site_status: Option<Arc<Mutex<crate::site::SiteStatus>>>,
    /// This agent's log id (`<node>.<incarnation>`).
    pub origin: String,
    pub started: Instant,
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/status", get(status))
        .with_state(state)
}

async fn metrics(State(s): State<Arc<AppState>>) -> impl IntoResponse {
    if let Some(up) = &s.uplink {
        s.metrics.uplink.set(&up.snapshot());
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        s.metrics.render(),
    )
}

async fn status(State(s): State<Arc<AppState>>) -> Json<serde_json::Value> {
    let b = s.buffer.lock().map(|b| *b).unwrap_or_default();
    let m = &s.metrics.ingest;
    let site = s
        .site_status
        .as_ref()
        .and_then(|st| st.lock().ok().map(|st| st.clone()));
    let (role, term, leader, peers, cluster) = match site {
        Some(st) => (
            st.role,
            st.term,
            st.leader.clone(),
            serde_json::to_value(&st.peers).unwrap_or_default(),
            serde_json::json!({
                "lease": st.lease,
                "insync_offset": st.insync,
                "replicas": st.replicas,
            }),
        ),
        // A lone agent is its own site's leader.
        None => (
            "leader",
            0,
            Some(s.node_id.clone()),
            serde_json::json!([]),
            serde_json::Value::Null,
        ),
    };
    Json(serde_json::json!({
        "node_id": s.node_id,
        "site": s.site,
        "origin": s.origin,
        "role": role,
        "term": term,
        "leader": leader,
        "peers": peers,
        "cluster": cluster,
        "uptime_secs": s.started.elapsed().as_secs(),
        "devices": b.devices,
        "buffer": {
            "bytes": b.meta.total_bytes(),
            "capacity_bytes": b.capacity_bytes,
            "raw_bytes": b.meta.raw_bytes,
            "rollup_bytes": b.meta.rollup_bytes,
            "readings": b.meta.raw_readings,
            "rollups": b.meta.rollup_rows,
            "next_offset": b.meta.next_offset,
            "downsampled": b.meta.downsampled,
            "dropped": b.meta.dropped,
            "open_windows": b.open_windows,
        },
        "ingest": {
            "received": m.received.get(),
            "accepted": m.accepted.get(),
            "duplicates": m.duplicates.get(),
            "rejected": m.rejected_total(),
        },
        "backlog": backlog(&s),
    }))
}

/// Per destination: link state, offsets, backlog and in-flight readings.
fn backlog(s: &AppState) -> serde_json::Value {
    let Some(up) = &s.uplink else {
        return serde_json::json!({});
    };
    let u = up.snapshot();
    serde_json::json!({
        "gateway": {
            "address": u.gateway,
            "addresses": u.gateways,
            "failovers": u.failovers,
            "link": u.link,
            "acked_offset": u.acked,
            "sent_offset": u.sent,
            "head_offset": u.head,
            "backlog": u.backlog(),
            "in_flight": u.in_flight(),
            "connects": u.connects,
            "batches_sent": u.batches_sent,
            "bytes_sent": u.bytes_sent,
            "last_error": u.last_error,
        }
    })
}

/// The HTTP server, running.
pub struct HttpHandle {
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl HttpHandle {
    /// Waits for the server to end (after the shutdown fired).
    pub async fn stop(self) {
        match self.task.await {
            Ok(Err(e)) => tracing::warn!("HTTP server: {e}"),
            Err(e) => tracing::warn!("HTTP task: {e}"),
            Ok(Ok(())) => {}
        }
    }
}

/// Serves `/healthz`, `/metrics` and `/status` on `listener` until `shutdown` fires.
pub fn spawn(
    listener: TcpListener,
    state: Arc<AppState>,
    mut shutdown: crate::shutdown::Shutdown,
) -> HttpHandle {
    let task = tokio::spawn(async move {
        axum::serve(listener, router(state))
            .with_graceful_shutdown(async move { shutdown.fired().await })
            .await
    });
    HttpHandle { task }
}
