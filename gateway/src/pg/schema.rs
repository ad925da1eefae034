//! The gateway's tables in PostgreSQL, in the schema `fogline`, and their daily
//! partitions.
//!
//! | table | one row per | key | partitioned by |
//! |---|---|---|---|
//! | `origins` | (site, origin) log: its watermark and counts | (site, origin) | — |
//! | `readings` | stored reading | (site, origin, offset, ts) | `ts`, a day each |
//! | `summaries` | summary of readings downsampled at the edge | (site, origin, first_offset, row_index, start_ts) | `start_ts` |
//! | `aggregates` | window aggregate relayed by a site | (site, device, metric, window_secs, start_ts) | `start_ts` |
//! | `aggregates_latest` | aggregate topic: the newest, republished retained | topic | — |
//! | `series` | (site, device, metric) with history | (site, device, metric) | — |
//!
//! Names are compared byte by byte (`COLLATE "C"`): nobody sorts sensor ids by a
//! language's rules, and the indexes on them are most of what an insert costs (a
//! locale's comparisons cost about a fifth of the throughput, BENCHMARKS.md).
//!
//! PostgreSQL wants a partitioned table's keys to hold its partition column, so the key
//! of `readings` holds `ts` after (site, origin, offset): a reading sent twice carries
//! the same time, lands in the same partition and collides there. The first line of
//! defence against duplicates is the watermark row, locked for every commit.

use std::collections::HashSet;

use postgres::Client;

use fogline_agent::shipping::store::StoreError;

use super::db;

/// Bumped when a table changes; a gateway refuses a schema newer than it knows.
const VERSION: i32 = 1;

const TABLES: &str = r#"
CREATE SCHEMA IF NOT EXISTS fogline;
CREATE TABLE IF NOT EXISTS fogline.meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS fogline.origins (
    site text COLLATE "C" NOT NULL,
    origin text COLLATE "C" NOT NULL,
    next_offset bigint NOT NULL DEFAULT 0,
    stored bigint NOT NULL DEFAULT 0,
    skipped bigint NOT NULL DEFAULT 0,
    downsampled bigint NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (site, origin)
);
CREATE TABLE IF NOT EXISTS fogline.readings (
    site text COLLATE "C" NOT NULL,
    origin text COLLATE "C" NOT NULL,
    "offset" bigint NOT NULL,
    device text COLLATE "C" NOT NULL,
    metric text COLLATE "C" NOT NULL,
    ts timestamptz NOT NULL,
    value double precision NOT NULL,
    boot bigint NOT NULL,
    seq bigint,
    PRIMARY KEY (site, origin, "offset", ts)
) PARTITION BY RANGE (ts);
CREATE INDEX IF NOT EXISTS readings_series ON fogline.readings (site, device, metric, ts);
CREATE TABLE IF NOT EXISTS fogline.summaries (
    site text COLLATE "C" NOT NULL,
    origin text COLLATE "C" NOT NULL,
    first_offset bigint NOT NULL,
    covers bigint NOT NULL,
    row_index integer NOT NULL,
    device text COLLATE "C" NOT NULL,
    metric text COLLATE "C" NOT NULL,
    start_ts timestamptz NOT NULL,
    window_secs integer NOT NULL,
    count bigint NOT NULL,
    min double precision NOT NULL,
    max double precision NOT NULL,
    sum double precision NOT NULL,
    last double precision NOT NULL,
    last_ts bigint NOT NULL,
    PRIMARY KEY (site, origin, first_offset, row_index, start_ts)
) PARTITION BY RANGE (start_ts);
CREATE INDEX IF NOT EXISTS summaries_series ON fogline.summaries (site, device, metric, start_ts);
CREATE TABLE IF NOT EXISTS fogline.aggregates (
    site text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    metric text COLLATE "C" NOT NULL,
    window_secs integer NOT NULL,
    start_ts timestamptz NOT NULL,
    count bigint,
    mean double precision,
    min double precision,
    max double precision,
    body jsonb NOT NULL,
    PRIMARY KEY (site, device, metric, window_secs, start_ts)
) PARTITION BY RANGE (start_ts);
CREATE TABLE IF NOT EXISTS fogline.aggregates_latest (
    topic text COLLATE "C" PRIMARY KEY,
    body text NOT NULL,
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS fogline.series (
    site text COLLATE "C" NOT NULL,
    device text COLLATE "C" NOT NULL,
    metric text COLLATE "C" NOT NULL,
    readings bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (site, device, metric)
);
"#;

/// The partitioned tables and the column each is partitioned by.
pub const PARTITIONED: [&str; 3] = ["readings", "summaries", "aggregates"];

const MS_PER_DAY: i64 = 86_400_000;

/// Creates the tables if they are missing (gateways starting together take turns) and
/// checks the schema's version.
pub fn create(client: &mut Client) -> Result<(), StoreError> {
    let mut tx = client.transaction().map_err(db)?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fogline.schema'))",
        &[],
    )
    .map_err(db)?;
    tx.batch_execute(TABLES).map_err(db)?;
    tx.execute(
        "INSERT INTO fogline.meta (key, value) VALUES ('schema_version', $1) \
         ON CONFLICT (key) DO NOTHING",
        &[&VERSION.to_string()],
    )
    .map_err(db)?;
    let found: String = tx
        .query_one(
            "SELECT value FROM fogline.meta WHERE key = 'schema_version'",
            &[],
        )
        .map_err(db)?
        .get(0);
    if found.parse::<i32>().map_or(true, |v| v > VERSION) {
        return Err(StoreError::Database(format!(
            "the fogline schema in this database is version {found}; this gateway knows \
             version {VERSION} (upgrade the gateway)"
        )));
    }
    tx.commit().map_err(db)
}

/// Day `n` since 1970-01-01 as `YYYYMMDD` and as the bounds of its partition.
fn day_bounds(day: i64) -> Option<(String, String, String)> {
    let format = |d: i64| {
        let t = time::OffsetDateTime::UNIX_EPOCH.checked_add(time::Duration::days(d))?;
        Some((
            format!("{:04}{:02}{:02}", t.year(), u8::from(t.month()), t.day()),
            format!(
                "{:04}-{:02}-{:02} 00:00:00+00",
                t.year(),
                u8::from(t.month()),
                t.day()
            ),
        ))
    };
    let (name, from) = format(day)?;
    let (_, to) = format(day + 1)?;
    Some((name, from, to))
}

/// The day of a Unix-ms time.
pub fn day_of(ms: i64) -> i64 {
    ms.div_euclid(MS_PER_DAY)
}

/// The daily partitions known to exist.
#[derive(Default)]
pub struct Partitions {
    known: HashSet<(&'static str, i64)>,
}

impl Partitions {
    /// Makes sure `table` has a partition for every day in `days` (each its own short
    /// transaction, outside the commit's: creating one locks the parent table).
    pub fn ensure(
        &mut self,
        client: &mut Client,
        table: &'static str,
        days: impl IntoIterator<Item = i64>,
    ) -> Result<(), StoreError> {
        for day in days {
            if self.known.contains(&(table, day)) {
                continue;
            }
            let Some((name, from, to)) = day_bounds(day) else {
                return Err(StoreError::Database(format!("day {day} is out of range")));
            };
            let mut tx = client.transaction().map_err(db)?;
            tx.execute(
                "SELECT pg_advisory_xact_lock(hashtext('fogline.partitions'))",
                &[],
            )
            .map_err(db)?;
            tx.batch_execute(&format!(
                "CREATE TABLE IF NOT EXISTS fogline.{table}_p{name} PARTITION OF \
                 fogline.{table} FOR VALUES FROM ('{from}') TO ('{to}')"
            ))
            .map_err(db)?;
            tx.commit().map_err(db)?;
            self.known.insert((table, day));
        }
        Ok(())
    }

    /// Drops every partition that ends at or before `before_day` begins; returns the
    /// tables dropped.
    pub fn drop_before(
        &mut self,
        client: &mut Client,
        before_day: i64,
    ) -> Result<Vec<String>, StoreError> {
        let mut dropped = Vec::new();
        for table in PARTITIONED {
            let rows = client
                .query(
                    "SELECT c.relname FROM pg_inherits i \
                     JOIN pg_class c ON c.oid = i.inhrelid \
                     JOIN pg_class p ON p.oid = i.inhparent \
                     JOIN pg_namespace n ON n.oid = p.relnamespace \
                     WHERE n.nspname = 'fogline' AND p.relname = $1",
                    &[&table],
                )
                .map_err(db)?;
            for row in rows {
                let name: String = row.get(0);
                let Some(day) = partition_day(table, &name) else {
                    continue; // not one of ours: left alone
                };
                if day < before_day {
                    let mut tx = client.transaction().map_err(db)?;
                    tx.execute(
                        "SELECT pg_advisory_xact_lock(hashtext('fogline.partitions'))",
                        &[],
                    )
                    .map_err(db)?;
                    tx.batch_execute(&format!("DROP TABLE IF EXISTS fogline.{name}"))
                        .map_err(db)?;
                    tx.commit().map_err(db)?;
                    self.known.remove(&(table, day));
                    dropped.push(name);
                }
            }
        }
        Ok(dropped)
    }
}

/// The day a partition `<table>_pYYYYMMDD` holds.
fn partition_day(table: &str, name: &str) -> Option<i64> {
    let digits = name.strip_prefix(table)?.strip_prefix("_p")?;
    if digits.len() != 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let year: i32 = digits[..4].parse().ok()?;
    let month: u8 = digits[4..6].parse().ok()?;
    let day: u8 = digits[6..].parse().ok()?;
    let date =
        time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    Some((date - time::Date::from_calendar_date(1970, time::Month::January, 1).ok()?).whole_days())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partitions_are_named_by_their_utc_day() {
        let day = day_of(1_764_720_000_000); // 2025-12-03T00:00:00Z
        let (name, from, to) = day_bounds(day).expect("bounds");
        assert_eq!(name, "20251203");
        assert_eq!(from, "2025-12-03 00:00:00+00");
        assert_eq!(to, "2025-12-04 00:00:00+00");
        assert_eq!(partition_day("readings", "readings_p20251203"), Some(day));
        assert_eq!(
            day_of(1_764_720_000_000 - 1),
            day - 1,
            "the last ms of the day before"
        );
        assert_eq!(day_of(-1), -1, "before 1970");
        assert_eq!(partition_day("readings", "readings_p2025120"), None);
        assert_eq!(partition_day("readings", "summaries_p20251203"), None);
        assert_eq!(partition_day("readings", "readings_p20251332"), None);
    }
}
