//! What a commit writes besides the watermark rows: readings (binary `COPY`),
//! summaries, series counts and aggregates (multi-row `unnest` inserts), in key order so
//! that two gateways' commits never wait on each other in a cycle.

use std::collections::BTreeMap;

use fogline_agent::shipping::store::history::parse_agg_topic;
use fogline_agent::shipping::store::StoreError;
use postgres::binary_copy::BinaryCopyInWriter;
use postgres::types::{ToSql, Type};

use fogline_agent::shipping::store::Key;

use super::{as_i64, db, to_time, Rows, CHANNEL};

pub(super) fn copy_readings(
    tx: &mut postgres::Transaction<'_>,
    keys: &[Key],
    rows: &Rows,
) -> Result<(), StoreError> {
    if rows.readings.is_empty() {
        return Ok(());
    }
    let sink = tx
        .copy_in(
            "COPY fogline.readings (site, origin, \"offset\", device, metric, ts, value, boot, seq) \
             FROM STDIN BINARY",
        )
        .map_err(db)?;
    let types = [
        Type::TEXT,
        Type::TEXT,
        Type::INT8,
        Type::TEXT,
        Type::TEXT,
        Type::TIMESTAMPTZ,
        Type::FLOAT8,
        Type::INT8,
        Type::INT8,
    ];
    let mut w = BinaryCopyInWriter::new(sink, &types);
    for (i, offset, r) in &rows.readings {
        let key = &keys[*i];
        let seq = r.seq.map(i64::from);
        let row: [&(dyn ToSql + Sync); 9] = [
            &key.0,
            &key.1,
            &as_i64(*offset),
            &&*r.device,
            &&*r.metric,
            &to_time(r.ts_ms),
            &r.value,
            &i64::from(r.boot),
            &seq,
        ];
        w.write(&row).map_err(db)?;
    }
    w.finish().map_err(db)?;
    Ok(())
}

pub(super) fn insert_summaries(
    tx: &mut postgres::Transaction<'_>,
    keys: &[Key],
    rows: &Rows,
) -> Result<(), StoreError> {
    if rows.summaries.is_empty() {
        return Ok(());
    }
    let insert = tx
        .prepare(
            "INSERT INTO fogline.summaries (site, origin, first_offset, covers, row_index, \
             device, metric, start_ts, window_secs, count, min, max, sum, last, last_ts) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15) \
             ON CONFLICT DO NOTHING",
        )
        .map_err(db)?;
    for (i, first, covers, s) in &rows.summaries {
        let key = &keys[*i];
        for (n, row) in s.rows.iter().enumerate() {
            let m = &row.summary;
            tx.execute(
                &insert,
                &[
                    &key.0,
                    &key.1,
                    &as_i64(*first),
                    &as_i64(*covers),
                    &i32::try_from(n).unwrap_or(i32::MAX),
                    &row.device,
                    &row.metric,
                    &to_time(row.start_ms),
                    &i32::try_from(row.len_secs).unwrap_or(i32::MAX),
                    &as_i64(m.count),
                    &m.min,
                    &m.max,
                    &m.sum,
                    &m.last,
                    &m.last_ts_ms,
                ],
            )
            .map_err(db)?;
        }
    }
    Ok(())
}

/// Readings per series, for `/api/v1/metrics`; in key order, like the watermark rows.
pub(super) fn count_series(
    tx: &mut postgres::Transaction<'_>,
    keys: &[Key],
    rows: &Rows,
) -> Result<(), StoreError> {
    let mut counts: BTreeMap<(&str, &str, &str), i64> = BTreeMap::new();
    for (i, _, r) in &rows.readings {
        *counts
            .entry((&keys[*i].0, &r.device, &r.metric))
            .or_default() += 1;
    }
    if counts.is_empty() {
        return Ok(());
    }
    let (mut sites, mut devices, mut metrics, mut ns) = (vec![], vec![], vec![], vec![]);
    for ((s, d, m), n) in counts {
        sites.push(s);
        devices.push(d);
        metrics.push(m);
        ns.push(n);
    }
    tx.execute(
        "INSERT INTO fogline.series (site, device, metric, readings) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::int8[]) \
         ON CONFLICT (site, device, metric) DO UPDATE SET readings = series.readings + EXCLUDED.readings",
        &[&sites, &devices, &metrics, &ns],
    )
    .map_err(db)?;
    Ok(())
}

/// A window aggregate's place in the history: (site, device, metric, window secs,
/// start ms).
type SeriesKey = (String, String, String, u32, i64);

/// One commit's aggregates: the newest JSON per topic (republished), and per window of
/// a series (the history).
#[derive(Default)]
pub(super) struct Aggregates {
    pub(super) latest: BTreeMap<String, String>,
    pub(super) history: BTreeMap<SeriesKey, String>,
}

impl Aggregates {
    pub(super) fn of(all: &[(String, String)]) -> Aggregates {
        let mut out = Aggregates::default();
        for (topic, json) in all {
            if let Some(key) = series_key(topic, json) {
                out.history.insert(key, json.clone());
            }
            out.latest.insert(topic.clone(), json.clone());
        }
        out
    }
}

/// Where an aggregate on `agg/<site>/<device>/<metric>/<len>s` with a `start_ms` goes.
pub(super) fn series_key(topic: &str, json: &str) -> Option<SeriesKey> {
    let (site, device, metric, len) = parse_agg_topic(topic)?;
    let start_ms = serde_json::from_str::<serde_json::Value>(json)
        .ok()?
        .get("start_ms")?
        .as_i64()?;
    Some((site.into(), device.into(), metric.into(), len, start_ms))
}

pub(super) fn store_aggregates(
    tx: &mut postgres::Transaction<'_>,
    aggregates: &Aggregates,
) -> Result<(), StoreError> {
    if aggregates.latest.is_empty() {
        return Ok(());
    }
    let topics: Vec<&str> = aggregates.latest.keys().map(String::as_str).collect();
    let bodies: Vec<&str> = aggregates.latest.values().map(String::as_str).collect();
    tx.execute(
        "INSERT INTO fogline.aggregates_latest (topic, body) \
         SELECT * FROM unnest($1::text[], $2::text[]) \
         ON CONFLICT (topic) DO UPDATE SET body = EXCLUDED.body, updated_at = now()",
        &[&topics, &bodies],
    )
    .map_err(db)?;
    if !aggregates.history.is_empty() {
        let field = |json: &str, name: &str| -> Option<serde_json::Value> {
            serde_json::from_str::<serde_json::Value>(json)
                .ok()
                .and_then(|v| v.get(name).cloned())
        };
        let (mut sites, mut devices, mut metrics, mut windows, mut starts) =
            (vec![], vec![], vec![], vec![], vec![]);
        let (mut counts, mut means, mut mins, mut maxs, mut bodies) =
            (vec![], vec![], vec![], vec![], vec![]);
        for ((site, device, metric, len, start), json) in &aggregates.history {
            sites.push(site.as_str());
            devices.push(device.as_str());
            metrics.push(metric.as_str());
            windows.push(i32::try_from(*len).unwrap_or(i32::MAX));
            starts.push(to_time(*start));
            counts.push(field(json, "count").and_then(|v| v.as_i64()));
            means.push(field(json, "mean").and_then(|v| v.as_f64()));
            mins.push(field(json, "min").and_then(|v| v.as_f64()));
            maxs.push(field(json, "max").and_then(|v| v.as_f64()));
            bodies.push(json.as_str());
        }
        // A series with aggregates only is listed too (no readings yet).
        tx.execute(
            "INSERT INTO fogline.series (site, device, metric) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::text[]) ON CONFLICT DO NOTHING",
            &[&sites, &devices, &metrics],
        )
        .map_err(db)?;
        tx.execute(
            "INSERT INTO fogline.aggregates (site, device, metric, window_secs, start_ts, \
             count, mean, min, max, body) \
             SELECT s, d, m, w, t, c, a, lo, hi, b::jsonb FROM unnest($1::text[], $2::text[], \
             $3::text[], $4::int4[], $5::timestamptz[], $6::int8[], $7::float8[], \
             $8::float8[], $9::float8[], $10::text[]) AS u(s, d, m, w, t, c, a, lo, hi, b) \
             ON CONFLICT (site, device, metric, window_secs, start_ts) DO UPDATE SET \
             count = EXCLUDED.count, mean = EXCLUDED.mean, min = EXCLUDED.min, \
             max = EXCLUDED.max, body = EXCLUDED.body",
            &[
                &sites, &devices, &metrics, &windows, &starts, &counts, &means, &mins, &maxs,
                &bodies,
            ],
        )
        .map_err(db)?;
    }
    // Delivered to the other gateways at commit, not before.
    tx.execute(
        "SELECT pg_notify($1, t) FROM unnest($2::text[]) AS t",
        &[&CHANNEL, &topics],
    )
    .map_err(db)?;
    Ok(())
}
