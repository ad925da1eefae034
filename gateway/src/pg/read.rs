//! Reading the PostgreSQL store: the history API, `store export` and `store stats`
//! (all of them while gateways write).

use std::io::Write;
use std::sync::Mutex;

use fogline_agent::aggregate::Summary;
use fogline_agent::buffer::block::{Record, SummaryRow};
use fogline_agent::shipping::store::history::{Cursor, HistoryReading, Range};
use fogline_agent::shipping::store::{Key, OriginState, StoreError};
use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, IsolationLevel};

use super::{connect, db, from_time, origin_state, to_time};
use crate::history::HistorySource;

/// The history API's reads, over a few pooled connections.
pub struct PgHistory {
    url: String,
    idle: Mutex<Vec<Client>>,
}

/// Connections kept open between requests.
const IDLE: usize = 4;

impl PgHistory {
    pub fn new(url: &str) -> PgHistory {
        PgHistory {
            url: url.to_owned(),
            idle: Mutex::new(Vec::new()),
        }
    }

    fn with<T>(
        &self,
        f: impl FnOnce(&mut Client) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let pooled = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let mut client = match pooled {
            Some(c) if !c.is_closed() => c,
            _ => connect(&self.url)?,
        };
        let result = f(&mut client);
        if !client.is_closed() {
            if let Ok(mut idle) = self.idle.lock() {
                if idle.len() < IDLE {
                    idle.push(client);
                }
            }
        }
        result
    }
}

impl Drop for PgHistory {
    /// A client's drop blocks on its own runtime, which may not happen on the gateway's:
    /// the idle ones are closed on a thread of their own.
    fn drop(&mut self) {
        let idle = std::mem::take(self.idle.get_mut().map_or(&mut Vec::new(), |v| v));
        if !idle.is_empty() {
            let _ = std::thread::Builder::new()
                .name("pg-close".into())
                .spawn(move || drop(idle));
        }
    }
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn limit_of(limit: usize) -> i64 {
    i64::try_from(limit).unwrap_or(i64::MAX).saturating_add(1)
}

impl HistorySource for PgHistory {
    fn readings(
        &self,
        range: &Range<'_>,
        after: Option<&Cursor>,
        limit: usize,
    ) -> Result<(Vec<HistoryReading>, Option<Cursor>), StoreError> {
        // Without a cursor: after everything (the earliest time, an empty origin).
        let (after_ts, after_origin, after_offset) = match after {
            Some(c) => (to_time(c.ts_ms), c.origin.clone(), i64_of(c.offset)),
            None => (to_time(i64::MIN), String::new(), -1),
        };
        let rows = self.with(|client| {
            client
                .query(
                    "SELECT ts, value, origin, \"offset\", boot, seq FROM fogline.readings \
                     WHERE site = $1 AND device = $2 AND metric = $3 AND ts >= $4 AND ts < $5 \
                     AND (ts, origin, \"offset\") > ($6, $7, $8) \
                     ORDER BY ts, origin, \"offset\" LIMIT $9",
                    &[
                        &range.site,
                        &range.device,
                        &range.metric,
                        &to_time(range.from),
                        &to_time(range.to),
                        &after_ts,
                        &after_origin,
                        &after_offset,
                        &limit_of(limit),
                    ],
                )
                .map_err(db)
        })?;
        let mut out: Vec<HistoryReading> = rows
            .iter()
            .map(|r| HistoryReading {
                ts_ms: from_time(r.get(0)),
                value: r.get(1),
                origin: r.get(2),
                offset: u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                boot: u32::try_from(r.get::<_, i64>(4)).unwrap_or(0),
                seq: r
                    .get::<_, Option<i64>>(5)
                    .and_then(|s| u32::try_from(s).ok()),
            })
            .collect();
        if out.len() <= limit {
            return Ok((out, None));
        }
        out.truncate(limit);
        let next = out.last().map(|last| Cursor {
            ts_ms: last.ts_ms,
            origin: last.origin.clone(),
            offset: last.offset,
        });
        Ok((out, next))
    }

    fn aggregates(
        &self,
        range: &Range<'_>,
        window_secs: u32,
        after: Option<i64>,
        limit: usize,
    ) -> Result<(Vec<String>, Option<i64>), StoreError> {
        let from = after.map_or(range.from, |a| a.saturating_add(1).max(range.from));
        let rows = self.with(|client| {
            client
                .query(
                    "SELECT body::text, start_ts FROM fogline.aggregates \
                     WHERE site = $1 AND device = $2 AND metric = $3 AND window_secs = $4 \
                     AND start_ts >= $5 AND start_ts < $6 ORDER BY start_ts LIMIT $7",
                    &[
                        &range.site,
                        &range.device,
                        &range.metric,
                        &i32::try_from(window_secs).unwrap_or(i32::MAX),
                        &to_time(from),
                        &to_time(range.to),
                        &limit_of(limit),
                    ],
                )
                .map_err(db)
        })?;
        let mut out: Vec<(String, i64)> = rows
            .iter()
            .map(|r| (r.get(0), from_time(r.get(1))))
            .collect();
        let more = out.len() > limit;
        out.truncate(limit);
        let next = more.then(|| out.last().map(|l| l.1)).flatten();
        Ok((out.into_iter().map(|(body, _)| body).collect(), next))
    }

    fn series(
        &self,
        site: Option<&str>,
        device: Option<&str>,
    ) -> Result<Vec<(String, String, String, u64)>, StoreError> {
        let rows = self.with(|client| {
            client
                .query(
                    "SELECT site, device, metric, readings FROM fogline.series \
                     WHERE ($1::text IS NULL OR site = $1) AND ($2::text IS NULL OR device = $2) \
                     ORDER BY site, device, metric",
                    &[&site, &device],
                )
                .map_err(db)
        })?;
        Ok(rows
            .iter()
            .map(|r| {
                (
                    r.get(0),
                    r.get(1),
                    r.get(2),
                    u64::try_from(r.get::<_, i64>(3)).unwrap_or(0),
                )
            })
            .collect())
    }
}

/// Every (site, origin) and its watermark.
pub fn stats(url: &str) -> Result<Vec<(Key, OriginState)>, StoreError> {
    let mut client = connect(url)?;
    let rows = client
        .query(
            "SELECT site, origin, next_offset, stored, skipped, downsampled FROM fogline.origins \
             ORDER BY site, origin",
            &[],
        )
        .map_err(db)?;
    Ok(rows
        .iter()
        .map(|r| ((r.get(0), r.get(1)), origin_state(r, 2)))
        .collect())
}

const NO_PARAMS: [&(dyn ToSql + Sync); 0] = [];

/// Writes every stored summary, then every reading, as `store export` lines (the
/// embedded store's), from one snapshot: a running gateway's store can be exported.
/// Stops quietly when `out` goes away (a closed pipe).
pub fn export(url: &str, out: &mut impl Write) -> Result<(), anyhow::Error> {
    let mut client = connect(url)?;
    let mut tx = client
        .build_transaction()
        .isolation_level(IsolationLevel::RepeatableRead)
        .read_only(true)
        .start()
        .map_err(db)?;
    let mut rows = tx
        .query_raw(
            "SELECT site, origin, first_offset, covers, device, metric, start_ts, window_secs, \
             count, min, max, sum, last, last_ts FROM fogline.summaries \
             ORDER BY site, origin, first_offset, row_index",
            NO_PARAMS,
        )
        .map_err(db)?;
    while let Some(r) = rows.next().map_err(db)? {
        let (site, origin): (String, String) = (r.get(0), r.get(1));
        let first = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
        let covers = u64::try_from(r.get::<_, i64>(3)).unwrap_or(0);
        let row = SummaryRow {
            device: r.get(4),
            metric: r.get(5),
            start_ms: from_time(r.get(6)),
            len_secs: u32::try_from(r.get::<_, i32>(7)).unwrap_or(0),
            summary: Summary {
                count: u64::try_from(r.get::<_, i64>(8)).unwrap_or(0),
                min: r.get(9),
                max: r.get(10),
                sum: r.get(11),
                last: r.get(12),
                last_ts_ms: r.get(13),
            },
        };
        if !write_line(
            out,
            &crate::export::summary_line(&site, &origin, (first, first + covers), &row),
        )? {
            return Ok(());
        }
    }
    drop(rows);
    let mut rows = tx
        .query_raw(
            "SELECT site, origin, \"offset\", device, metric, boot, seq, value, ts \
             FROM fogline.readings ORDER BY site, origin, \"offset\"",
            NO_PARAMS,
        )
        .map_err(db)?;
    while let Some(r) = rows.next().map_err(db)? {
        let (site, origin): (String, String) = (r.get(0), r.get(1));
        let record = Record {
            device: r.get::<_, &str>(3).into(),
            metric: r.get::<_, &str>(4).into(),
            boot: u32::try_from(r.get::<_, i64>(5)).unwrap_or(0),
            seq: r
                .get::<_, Option<i64>>(6)
                .and_then(|s| u32::try_from(s).ok()),
            value: r.get(7),
            ts_ms: from_time(r.get(8)),
        };
        let offset = u64::try_from(r.get::<_, i64>(2)).unwrap_or(0);
        if !write_line(
            out,
            &crate::export::record_line(&site, &origin, offset, &record),
        )? {
            return Ok(());
        }
    }
    Ok(())
}

/// Writes one line; `false` when the reader went away.
fn write_line(out: &mut impl Write, line: &serde_json::Value) -> std::io::Result<bool> {
    match writeln!(out, "{line}") {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}
