//! One store test suite, two stores: the gateway's embedded redb store and its
//! PostgreSQL store (a real server) keep the same rule for every batch (stored once, in
//! order, without holes), survive a reopen, keep aggregates and serve the same history.
//! PostgreSQL alone: two gateways' writers on one database with stale views of it.

use fogline_agent::buffer::block::{self, Record};
use fogline_agent::shipping::proto::BatchFrame;
use fogline_agent::shipping::store::history::{Cursor, Range};
use fogline_agent::shipping::store::{Applied, LogStore, OriginState, Store, MAX_OFFSET};
use fogline_gateway::history::HistorySource;
use fogline_gateway::pg::{PgHistory, PgStore};
use fogline_tests::postgres;

const T0: i64 = 1_764_720_000_000; // 2025-12-03T00:00:00Z

fn records(n: usize, seq0: u32, device: &str) -> Vec<Record> {
    (0..n)
        .map(|i| Record {
            device: device.into(),
            metric: "t".into(),
            boot: 1,
            seq: Some(seq0 + i as u32 + 1),
            ts_ms: T0 + i64::from(seq0) * 1000 + i as i64 * 1000,
            value: f64::from(seq0) + i as f64,
        })
        .collect()
}

fn block_of(n: usize, seq0: u32) -> Vec<u8> {
    block::encode(&records(n, seq0, "d"))
}

fn apply<S: LogStore>(s: &mut S, start: u64, first: u64, bytes: &[u8]) -> Applied {
    let mut txn = S::Txn::default();
    let frame = BatchFrame {
        start,
        first_offset: first,
        block: bytes,
    };
    let applied = s.apply(&mut txn, "s", "a", &frame);
    s.commit(txn).expect("commit");
    applied
}

/// The rule, a reopen, aggregates and history: the same answers from either store.
fn suite<S: LogStore>(
    mut open: impl FnMut() -> S,
    history_of: impl Fn(&S) -> Box<dyn HistorySource>,
) {
    let mut s = open();
    assert_eq!(s.watermark("s", "a").expect("watermark"), 0);
    assert_eq!(apply(&mut s, 0, 0, &block_of(10, 0)), Applied::Stored(10));
    assert_eq!(
        apply(&mut s, 0, 0, &block_of(10, 0)),
        Applied::Duplicate,
        "re-sent"
    );
    assert_eq!(
        apply(&mut s, 20, 20, &block_of(5, 20)),
        Applied::Gap,
        "10..20 missing"
    );
    assert_eq!(apply(&mut s, 10, 10, &block_of(5, 10)), Applied::Stored(5));
    // Overlapping the watermark: only the new tail (offsets 15..20).
    assert_eq!(apply(&mut s, 10, 10, &block_of(10, 10)), Applied::Stored(5));
    // Dropped at the edge before sending: the sender vouches for 20..25 with `start`.
    assert_eq!(apply(&mut s, 20, 25, &block_of(3, 25)), Applied::Stored(3));
    assert_eq!(apply(&mut s, 0, 0, b"\x09garbage"), Applied::Malformed);
    assert_eq!(
        apply(&mut s, 28, MAX_OFFSET - 2, &block_of(3, 28)),
        Applied::Implausible
    );
    assert_eq!(s.watermark("s", "a").expect("watermark"), 28);
    let mut txn = S::Txn::default();
    let agg = |start: i64, count: u64| {
        format!(
            r#"{{"device":"d","metric":"t","window_secs":60,"start_ms":{start},"count":{count},"mean":1.5}}"#
        )
    };
    S::put_aggregate(&mut txn, "agg/s/d/t/60s".into(), agg(T0, 10));
    S::put_aggregate(&mut txn, "agg/s/d/t/60s".into(), agg(T0 + 60_000, 3));
    assert!(S::pending_aggregate(&txn, "agg/s/d/t/60s").is_some_and(|j| j.contains("\"count\":3")));
    s.commit(txn).expect("commit aggregates");
    drop(s);

    let mut s = open();
    let want = OriginState {
        next: 28,
        stored: 23,
        skipped: 5,
        downsampled: 0,
    };
    assert_eq!(
        s.origins().get(&("s".into(), "a".into())),
        Some(&want),
        "after a reopen"
    );
    assert_eq!(s.watermark("s", "a").expect("watermark"), 28);
    assert_eq!(apply(&mut s, 25, 25, &block_of(3, 25)), Applied::Duplicate);
    let newest = s
        .aggregate("agg/s/d/t/60s")
        .expect("aggregate")
        .expect("kept");
    assert!(newest.contains("\"count\":3"), "{newest}");
    assert_eq!(s.aggregates().expect("aggregates").len(), 1);

    // History: every reading once, by time, in pages.
    let history = history_of(&s);
    let all = Range {
        site: "s",
        device: "d",
        metric: "t",
        from: i64::MIN,
        to: i64::MAX,
    };
    let mut seen = Vec::new();
    let mut after: Option<Cursor> = None;
    loop {
        let (page, next) = history.readings(&all, after.as_ref(), 4).expect("page");
        assert!(page.len() <= 4);
        seen.extend(page.iter().map(|r| (r.ts_ms, r.offset, r.seq)));
        match next {
            Some(c) => after = Some(Cursor::decode(&c.encode()).expect("cursor")),
            None => break,
        }
    }
    let want: Vec<(i64, u64, Option<u32>)> = (0..20u32)
        .chain(25..28)
        .map(|i| (T0 + i64::from(i) * 1000, u64::from(i), Some(i + 1)))
        .collect();
    assert_eq!(seen, want);
    let range = Range {
        from: T0 + 3000,
        to: T0 + 6000,
        ..all.clone()
    };
    let (page, next) = history.readings(&range, None, 100).expect("range");
    assert_eq!(
        page.iter().map(|r| r.offset).collect::<Vec<_>>(),
        vec![3, 4, 5],
        "from inclusive, to exclusive"
    );
    assert!(next.is_none());
    let (aggs, next) = history.aggregates(&all, 60, None, 1).expect("aggregates");
    assert_eq!(aggs.len(), 1);
    let next = next.expect("a second page");
    let (aggs2, last) = history
        .aggregates(&all, 60, Some(next), 10)
        .expect("page 2");
    assert_eq!(aggs2.len(), 1, "{aggs:?} {aggs2:?}");
    assert!(last.is_none());
    assert!(history
        .aggregates(&all, 10, None, 10)
        .expect("aggs")
        .0
        .is_empty());
    assert_eq!(
        history.series(Some("s"), None).expect("series"),
        vec![("s".into(), "d".into(), "t".into(), 23)]
    );
    assert!(history
        .series(Some("other"), None)
        .expect("series")
        .is_empty());
}

#[test]
fn the_embedded_store_keeps_the_rule() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("gateway.redb");
    suite(
        || {
            let mut s = Store::open(&path, 1 << 20).expect("open");
            s.keep_history().expect("history");
            s
        },
        |s| Box::new(s.reader()),
    );
}

#[test]
fn the_postgres_store_keeps_the_same_rule() {
    let Some(pg) = postgres::start_or_skip("store_suite::postgres").expect("postgres") else {
        return;
    };
    let url = pg.create_db("suite").expect("db");
    suite(
        || PgStore::open(&url, 0).expect("open"),
        |_| Box::new(PgHistory::new(&url)),
    );
}

/// Two writers on one database, each with a stale view: whoever commits second finds
/// the first one's offsets below the locked watermark and stores only what is new.
#[test]
fn two_postgres_writers_store_each_offset_once() {
    let Some(pg) = postgres::start_or_skip("store_suite::two_writers").expect("postgres") else {
        return;
    };
    let url = pg.create_db("two").expect("db");
    let mut a = PgStore::open(&url, 0).expect("open a");
    let mut b = PgStore::open(&url, 0).expect("open b");
    assert_eq!(apply(&mut a, 0, 0, &block_of(10, 0)), Applied::Stored(10));
    // b has not looked: it takes the batch for new, the commit finds it a duplicate.
    apply(&mut b, 0, 0, &block_of(10, 0));
    assert_eq!(b.watermark("s", "a").expect("watermark"), 10);
    // b stores 10..20; a, still at 10, sends 10..25: only 20..25 is new.
    assert_eq!(
        apply(&mut b, 10, 10, &block_of(10, 10)),
        Applied::Stored(10)
    );
    apply(&mut a, 10, 10, &block_of(15, 10));
    assert_eq!(a.watermark("s", "a").expect("watermark"), 25);
    // b still believes 20: its 20..25 comes again, and is a duplicate under lock.
    apply(&mut b, 20, 20, &block_of(5, 20));
    assert_eq!(apply(&mut b, 30, 30, &block_of(5, 30)), Applied::Gap);
    assert_eq!(b.watermark("s", "a").expect("watermark"), 25);

    let mut c = pg.client("two").expect("client");
    let rows = c
        .query(
            "SELECT \"offset\", count(*) FROM fogline.readings GROUP BY 1 ORDER BY 1",
            &[],
        )
        .expect("query");
    let offsets: Vec<(i64, i64)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let want: Vec<(i64, i64)> = (0..25).map(|o| (o, 1)).collect();
    assert_eq!(offsets, want, "each offset once");
    let state = c
        .query_one(
            "SELECT next_offset, stored, skipped FROM fogline.origins WHERE site = 's' AND origin = 'a'",
            &[],
        )
        .expect("origin");
    assert_eq!(
        (
            state.get::<_, i64>(0),
            state.get::<_, i64>(1),
            state.get::<_, i64>(2)
        ),
        (25, 25, 0)
    );
}

/// `store.retention_days`: whole days past it are dropped (at start and hourly), the
/// rest stays.
#[test]
fn postgres_drops_the_days_past_their_retention() {
    let Some(pg) = postgres::start_or_skip("store_suite::retention").expect("postgres") else {
        return;
    };
    let url = pg.create_db("kept").expect("db");
    let mut s = PgStore::open(&url, 0).expect("open");
    // A year ago (T0), and now.
    assert_eq!(apply(&mut s, 0, 0, &block_of(5, 0)), Applied::Stored(5));
    let now = block::encode(&[Record {
        ts_ms: fogline_tests::now_ms(),
        ..records(1, 5, "d")[0].clone()
    }]);
    assert_eq!(apply(&mut s, 5, 5, &now), Applied::Stored(1));
    drop(s);
    let mut c = pg.client("kept").expect("client");
    let count = |c: &mut ::postgres::Client| -> i64 {
        c.query_one("SELECT count(*) FROM fogline.readings", &[])
            .expect("count")
            .get(0)
    };
    assert_eq!(count(&mut c), 6);
    let s = PgStore::open(&url, 30).expect("open with retention");
    assert_eq!(count(&mut c), 1, "the year-old day is gone, today stays");
    let old: i64 = c
        .query_one(
            "SELECT count(*) FROM pg_class WHERE relname = 'readings_p20251203'",
            &[],
        )
        .expect("partition")
        .get(0);
    assert_eq!(old, 0, "dropped as a whole partition");
    // The watermark is not part of the history: the log goes on from where it was.
    assert_eq!(s.origins()[&("s".to_owned(), "a".to_owned())].next, 6);
}
