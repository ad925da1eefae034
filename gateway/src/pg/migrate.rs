//! `fogline-gateway store migrate --from DIR --to postgres://…`: an embedded store's
//! logs, summaries and aggregates into PostgreSQL, through the same commits a gateway
//! makes (so the same rule keeps every offset once: a re-run copies nothing twice).

use fogline_agent::shipping::proto::BatchFrame;
use fogline_agent::shipping::store::{LogStore, OriginState, Store, StoreError};
use serde::Serialize;

use super::{PgStore, PgTxn};

/// Readings read from the embedded store per commit, about.
const CHUNK_READINGS: u64 = 50_000;
/// Aggregates per commit.
const CHUNK_AGGREGATES: usize = 5_000;

/// One origin, on both sides after the copy.
#[derive(Debug, Serialize)]
pub struct OriginReport {
    pub site: String,
    pub origin: String,
    pub from: OriginState,
    pub to: OriginState,
}

/// What a migration did.
#[derive(Debug, Serialize)]
pub struct Report {
    pub origins: Vec<OriginReport>,
    /// Offsets stored in PostgreSQL by this run (readings and downsampled ones).
    pub offsets_copied: u64,
    /// Aggregates read from the embedded store's history and newest-per-topic tables.
    pub aggregates_copied: u64,
}

impl Report {
    /// Does PostgreSQL hold at least everything the embedded store does?
    pub fn complete(&self) -> bool {
        self.origins.iter().all(|o| {
            o.to.next >= o.from.next
                && o.to.stored >= o.from.stored
                && o.to.downsampled >= o.from.downsampled
        })
    }
}

/// Copies everything in `from` into the store at `url`.
pub fn migrate(from: &Store, url: &str) -> Result<Report, StoreError> {
    let mut to = PgStore::open(url, 0)?;
    let mut keys: Vec<_> = from
        .origins()
        .iter()
        .map(|(k, s)| (k.clone(), *s))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut report = Report {
        origins: Vec::new(),
        offsets_copied: 0,
        aggregates_copied: 0,
    };
    for ((site, origin), source) in keys {
        let mut at = to.watermark(&site, &origin)?;
        let before = at;
        while at < source.next {
            let blocks = from.blocks_from(&site, &origin, at, CHUNK_READINGS, source.next)?;
            if blocks.is_empty() {
                break;
            }
            let at_start = at;
            let mut txn = PgTxn::default();
            for b in &blocks {
                // A hole between blocks was vouched for at the edge: say so again.
                let frame = BatchFrame {
                    start: at.min(b.first_offset),
                    first_offset: b.first_offset,
                    block: &b.bytes,
                };
                to.apply(&mut txn, &site, &origin, &frame);
                at = at.max(b.end_offset);
            }
            to.commit(txn)?;
            let moved = to.watermark(&site, &origin)?;
            if moved <= at_start {
                return Err(StoreError::Corrupt(format!(
                    "{site}/{origin}: the blocks from offset {at_start} do not join the log \
                     in PostgreSQL (at {moved})"
                )));
            }
            at = moved;
        }
        report.offsets_copied += at - before;
        let target = to.origins().get(&(site.clone(), origin.clone())).copied();
        report.origins.push(OriginReport {
            site,
            origin,
            from: source,
            to: target.unwrap_or_default(),
        });
    }
    // The history first (oldest window first), then the newest per topic on top.
    let mut aggregates = Vec::new();
    from.reader()
        .for_each_history_aggregate(|topic, json| aggregates.push((topic, json.to_owned())))?;
    aggregates.extend(from.aggregates()?);
    report.aggregates_copied = aggregates.len() as u64;
    for chunk in aggregates.chunks(CHUNK_AGGREGATES) {
        let mut txn = PgTxn::default();
        for (topic, json) in chunk {
            PgStore::put_aggregate(&mut txn, topic.clone(), json.clone());
        }
        to.commit(txn)?;
    }
    Ok(report)
}
