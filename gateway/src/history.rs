//! The history API on the gateway's HTTP listener, served from the embedded store's
//! series index (`fogline_agent::shipping::store::history`) or from PostgreSQL's tables
//! and their time indexes ([`crate::pg::PgHistory`]), never by scanning the log:
//!
//! | path | parameters | answer |
//! |---|---|---|
//! | `/api/v1/readings` | `site`, `device`, `metric`, `from`, `to`, `limit`, `after`, `format` | a page of one series' readings, oldest first |
//! | `/api/v1/aggregates` | the same and `window` (seconds, default 60) | a page of that series' window aggregates |
//! | `/api/v1/sites` | — | every site with history |
//! | `/api/v1/devices` | `site` | the devices of a site |
//! | `/api/v1/metrics` | `site`, `device` | the metrics of a device, with readings counts |
//!
//! Times are RFC 3339 (`2026-12-03T10:00:00Z`) or Unix milliseconds; `from` is inclusive,
//! `to` exclusive; left out, the range is everything. `limit` is 1..=10000 (default
//! 1000). A page that is not the last says where the next starts: `next` in the JSON,
//! the `fogline-next` header with CSV; pass it back as `after`. Bad parameters get a 400
//! with `{"error": …}`. With `[access.readers]` and `access.anonymous` not `"read"`, the
//! API needs HTTP Basic credentials of a reader.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use fogline_agent::security::auth::Authenticator;
use fogline_agent::shipping::store::history::{Cursor, HistoryReading, Range};
use fogline_agent::shipping::store::{StoreError, StoreReader};
use serde_json::json;

/// Where the history comes from: the embedded store's index, or PostgreSQL's tables.
pub trait HistorySource: Send + Sync + 'static {
    /// A page of one series' readings, by time, then origin and offset.
    fn readings(
        &self,
        range: &Range<'_>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<HistoryReading>, Option<Cursor>), StoreError>;
    /// A page of one series' aggregates at one window length, by window start.
    fn aggregates(
        &self,
        range: &Range<'_>,
        window_secs: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<i64>), StoreError>;
    /// Every series with history: (site, device, metric, readings), in that order.
    fn series(
        &self,
        site: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<(String, String, String, u64)>, StoreError>;
}

impl HistorySource for StoreReader {
    fn readings(
        &self,
        range: &Range<'_>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<HistoryReading>, Option<Cursor>), StoreError> {
        self.history_readings(range, after, limit)
    }

    fn aggregates(
        &self,
        range: &Range<'_>,
        window_secs: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<i64>), StoreError> {
        self.history_aggregates(range, window_secs, after, limit)
    }

    fn series(
        &self,
        site: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        self.history_series(site, device)
    }
}

/// What the history handlers share.
pub struct History {
    pub reader: Arc<dyn HistorySource>,
    /// `Some`: requests need Basic credentials of one of these readers.
    pub readers: Option<Authenticator>,
}

type Params = Query<HashMap<String, String>>;

const DEFAULT_LIMIT: usize = 1000;
const MAX_LIMIT: usize = 10_000;

/// A 400 (or 401, 500) with a JSON reason.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let mut r = (self.0, Json(json!({ "error": self.1 }))).into_response();
        if self.0 == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Basic realm=\"fogline\""),
            );
        }
        r
    }
}

fn bad(msg: impl Into<String>) -> Failure {
    Failure(StatusCode::BAD_REQUEST, msg.into())
}

/// Unix ms or RFC 3339.
pub fn parse_time(name: &str, raw: &str) -> Result<i64, String> {
    if let Ok(ms) = raw.parse::<i64>() {
        return Ok(ms);
    }
    let t = time::OffsetDateTime::parse(raw, &time::format_description::well_known::Rfc3339)
        .map_err(|e| {
            format!("{name}={raw:?} is neither Unix milliseconds nor an RFC 3339 time ({e})")
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| format!("{name} is out of range"))
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

fn required<'a>(p: &'a HashMap<String, String>, name: &str) -> Result<&'a str, Failure> {
    match p.get(name).map(String::as_str) {
        Some(v) if !v.is_empty() => Ok(v),
        _ => Err(bad(format!("missing parameter {name}"))),
    }
}

/// Checks that only known parameters were given (a typo is an error, not ignored).
fn known(p: &HashMap<String, String>, allowed: &[&str]) -> Result<(), Failure> {
    match p.keys().find(|k| !allowed.contains(&k.as_str())) {
        Some(k) => Err(bad(format!(
            "unknown parameter {k:?} (known: {})",
            allowed.join(", ")
        ))),
        None => Ok(()),
    }
}

struct Series<'a> {
    range: Range<'a>,
    limit: usize,
    csv: bool,
}

fn series<'a>(p: &'a HashMap<String, String>) -> Result<Series<'a>, Failure> {
    let from = p
        .get("from")
        .map(|v| parse_time("from", v))
        .transpose()
        .map_err(bad)?
        .unwrap_or(i64::MIN);
    let to = p
        .get("to")
        .map(|v| parse_time("to", v))
        .transpose()
        .map_err(bad)?
        .unwrap_or(i64::MAX);
    if from > to {
        return Err(bad("from is after to"));
    }
    let limit = match p.get("limit") {
        None => DEFAULT_LIMIT,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => n,
            _ => return Err(bad(format!("limit={v:?}: a number from 1 to {MAX_LIMIT}"))),
        },
    };
    let csv = match p.get("format").map(String::as_str) {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => return Err(bad(format!("format={other:?}: json or csv"))),
    };
    Ok(Series {
        range: Range {
            site: required(p, "site")?,
            device: required(p, "device")?,
            metric: required(p, "metric")?,
            from,
            to,
        },
        limit,
        csv,
    })
}

impl History {
    /// Basic credentials of a reader, when the API needs them.
    async fn allow(self: &Arc<Self>, headers: &HeaderMap) -> Result<(), Failure> {
        if self.readers.is_none() {
            return Ok(());
        }
        let denied = || Failure(StatusCode::UNAUTHORIZED, "reader credentials needed".into());
        let (user, pass) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
            .and_then(|b| {
                use base64::Engine;
                base64::engine::general_purpose::STANDARD
                    .decode(b.trim())
                    .ok()
            })
            .and_then(|raw| String::from_utf8(raw).ok())
            .and_then(|s| s.split_once(':').map(|(u, p)| (u.to_owned(), p.to_owned())))
            .ok_or_else(denied)?;
        // Argon2 for a first login (a successful one is cached): off the runtime.
        let me = self.clone();
        let checked = tokio::task::spawn_blocking(move || {
            me.readers
                .as_ref()
                .is_some_and(|r| r.check_login(Some(&user), Some(pass.as_bytes())).is_ok())
        })
        .await
        .unwrap_or(false);
        if checked {
            Ok(())
        } else {
            Err(denied())
        }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
        Err(e) => Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
    }
}

/// Runs `f` on the store with the request's range, off the runtime.
async fn with_range<T: Send + 'static>(
    h: &History,
    range: &Range<'_>,
    f: impl FnOnce(&dyn HistorySource, &Range<'_>) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Failure> {
    let (site, device, metric) = (
        range.site.to_owned(),
        range.device.to_owned(),
        range.metric.to_owned(),
    );
    let (from, to) = (range.from, range.to);
    let reader = h.reader.clone();
    blocking(move || {
        let range = Range {
            site: &site,
            device: &device,
            metric: &metric,
            from,
            to,
        };
        f(reader.as_ref(), &range)
    })
    .await
}

async fn readings(
    State(h): State<Arc<History>>,
    headers: HeaderMap,
    Query(p): Params,
) -> Result<Response, Failure> {
    h.allow(&headers).await?;
    known(
        &p,
        &[
            "site", "device", "metric", "from", "to", "limit", "after", "format",
        ],
    )?;
    let s = series(&p)?;
    let after = match p.get("after") {
        Some(raw) => Some(
            Cursor::decode(raw)
                .ok_or_else(|| bad(format!("after={raw:?}: not a cursor from a page's next")))?,
        ),
        None => None,
    };
    let limit = s.limit;
    let (rows, next) = with_range(&h, &s.range, move |reader, range| {
        reader.readings(range, after.as_ref(), limit)
    })
    .await?;
    let next = next.map(|c| c.encode());
    if s.csv {
        let mut body = String::from("time,ts_ms,value,origin,offset,boot,seq\n");
        for r in &rows {
            let seq = r.seq.map(|s| s.to_string()).unwrap_or_default();
            body.push_str(&format!(
                "{},{},{},{},{},{},{}\n",
                rfc3339(r.ts_ms),
                r.ts_ms,
                r.value,
                r.origin,
                r.offset,
                r.boot,
                seq
            ));
        }
        let mut resp = ([(header::CONTENT_TYPE, "text/csv; charset=utf-8")], body).into_response();
        if let Some(next) = next.and_then(|n| header::HeaderValue::from_str(&n).ok()) {
            resp.headers_mut().insert("fogline-next", next);
        }
        return Ok(resp);
    }
    let readings: Vec<serde_json::Value> = rows
        .iter()
        .map(|r| {
            json!({"time": rfc3339(r.ts_ms), "ts_ms": r.ts_ms, "value": r.value,
                   "origin": r.origin, "offset": r.offset, "boot": r.boot, "seq": r.seq})
        })
        .collect();
    Ok(Json(json!({
        "site": s.range.site, "device": s.range.device, "metric": s.range.metric,
        "readings": readings, "next": next,
    }))
    .into_response())
}

async fn aggregates(
    State(h): State<Arc<History>>,
    headers: HeaderMap,
    Query(p): Params,
) -> Result<Response, Failure> {
    h.allow(&headers).await?;
    known(
        &p,
        &[
            "site", "device", "metric", "from", "to", "limit", "after", "window", "format",
        ],
    )?;
    let s = series(&p)?;
    if s.csv {
        return Err(bad("format=csv: aggregates are served as JSON"));
    }
    let window = match p.get("window") {
        None => 60,
        Some(v) => v
            .parse::<u32>()
            .ok()
            .filter(|w| *w > 0)
            .ok_or_else(|| bad(format!("window={v:?}: a window length in seconds")))?,
    };
    let after = p
        .get("after")
        .map(|v| {
            v.parse::<i64>()
                .map_err(|_| bad(format!("after={v:?}: not a page's next")))
        })
        .transpose()?;
    let limit = s.limit;
    let (rows, next) = with_range(&h, &s.range, move |reader, range| {
        reader.aggregates(range, window, after, limit)
    })
    .await?;
    let aggregates: Vec<serde_json::Value> = rows
        .iter()
        .filter_map(|j| serde_json::from_str(j).ok())
        .collect();
    Ok(Json(json!({
        "site": s.range.site, "device": s.range.device, "metric": s.range.metric,
        "window_secs": window, "aggregates": aggregates, "next": next,
    }))
    .into_response())
}

/// The API's routes.
pub fn routes(history: Arc<History>) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/api/v1/readings", get(readings))
        .route("/api/v1/aggregates", get(aggregates))
        .route(
            "/api/v1/sites",
            get(|s: State<Arc<History>>, h: HeaderMap, p: Params| list(s, h, p, List::Sites)),
        )
        .route(
            "/api/v1/devices",
            get(|s: State<Arc<History>>, h: HeaderMap, p: Params| list(s, h, p, List::Devices)),
        )
        .route(
            "/api/v1/metrics",
            get(|s: State<Arc<History>>, h: HeaderMap, p: Params| list(s, h, p, List::Metrics)),
        )
        .with_state(history)
}

/// `/api/v1/sites`, `/devices?site=`, `/metrics?site=&device=`.
async fn list(
    State(h): State<Arc<History>>,
    headers: HeaderMap,
    Query(p): Params,
    what: List,
) -> Result<Response, Failure> {
    h.allow(&headers).await?;
    let (allowed, site, device): (&[&str], _, _) = match what {
        List::Sites => (&[], None, None),
        List::Devices => (&["site"], Some(required(&p, "site")?.to_owned()), None),
        List::Metrics => (
            &["site", "device"],
            Some(required(&p, "site")?.to_owned()),
            Some(required(&p, "device")?.to_owned()),
        ),
    };
    known(&p, allowed)?;
    let reader = h.reader.clone();
    let rows = blocking(move || reader.series(site.as_deref(), device.as_deref())).await?;
    let body = match what {
        List::Sites => {
            let mut sites: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
            sites.dedup();
            json!({ "sites": sites })
        }
        List::Devices => {
            let mut devices: Vec<&str> = rows.iter().map(|r| r.1.as_str()).collect();
            devices.dedup();
            json!({ "devices": devices })
        }
        List::Metrics => {
            let metrics: Vec<serde_json::Value> = rows
                .iter()
                .map(|r| json!({ "metric": r.2, "readings": r.3 }))
                .collect();
            json!({ "metrics": metrics })
        }
    };
    Ok(Json(body).into_response())
}

#[derive(Clone, Copy)]
enum List {
    Sites,
    Devices,
    Metrics,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_unix_ms_or_rfc3339() {
        assert_eq!(parse_time("from", "1700000000000"), Ok(1_700_000_000_000));
        assert_eq!(
            parse_time("from", "2023-11-14T22:13:20Z"),
            Ok(1_700_000_000_000)
        );
        assert_eq!(
            parse_time("from", "2023-11-14T23:13:20.5+01:00"),
            Ok(1_700_000_000_500)
        );
        assert!(parse_time("from", "yesterday").is_err());
        assert_eq!(rfc3339(1_700_000_000_000), "2023-11-14T22:13:20Z");
    }
}
