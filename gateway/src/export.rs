//! `fogline-gateway store export|stats`: the same lines from either store.

use fogline_agent::buffer::block::{Record, SummaryRow};
use fogline_agent::shipping::store::{Key, OriginState};

/// One stored reading as an export line.
pub fn record_line(site: &str, origin: &str, offset: u64, r: &Record) -> serde_json::Value {
    serde_json::json!({
        "site": site, "origin": origin, "offset": offset,
        "device": &*r.device, "metric": &*r.metric, "boot": r.boot,
        "seq": r.seq, "value": r.value, "ts": r.ts_ms,
    })
}

/// One summary of readings downsampled at the edge, covering offsets `span`.
pub fn summary_line(
    site: &str,
    origin: &str,
    span: (u64, u64),
    row: &SummaryRow,
) -> serde_json::Value {
    let mut line = row.to_json(Some(span));
    line["site"] = site.into();
    line["origin"] = origin.into();
    line
}

/// Per (site, origin): watermark and counts, sorted.
pub fn stats<'a>(
    origins: impl IntoIterator<Item = (&'a Key, &'a OriginState)>,
) -> serde_json::Value {
    let mut list: Vec<serde_json::Value> = origins
        .into_iter()
        .map(|((site, origin), s)| {
            serde_json::json!({"site": site, "origin": origin, "next_offset": s.next,
                "stored": s.stored, "skipped_at_edge": s.skipped,
                "downsampled_at_edge": s.downsampled})
        })
        .collect();
    list.sort_by_key(|v| v.to_string());
    serde_json::json!({ "origins": list })
}
