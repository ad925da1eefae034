use super::*;
use crate::ops::config::Config;
use redb::ReadableTableMetadata;

const T0: i64 = 1_700_000_000_000;

fn config(dir: &Path) -> Config {
    let mut c = Config::default();
    c.buffer.data_dir = dir.to_path_buf();
    c
}

fn reading(device: &str, seq: Option<u32>, value: f64, ts: i64) -> Incoming {
    Incoming {
        device: device.into(),
        metric: "temp".into(),
        boot: 1,
        seq,
        time: DeviceTime::Wall(ts),
        value,
        received_ms: ts,
    }
}

fn all_records(b: &Buffer) -> Vec<(u64, Record)> {
    let mut out = Vec::new();
    b.for_each_record(0, |o, r| {
        out.push((o, r));
        Ok(())
    })
    .expect("read");
    out
}

#[test]
fn committed_readings_survive_reopen_and_resends_are_stored_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    {
        let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("open");
        let done = b
            .commit(&[
                reading("d1", Some(1), 1.0, T0),
                reading("d1", Some(2), 2.0, T0 + 1),
                reading("d1", Some(4), 4.0, T0 + 3),
            ])
            .expect("commit");
        assert_eq!(done.accepted, 3);
        assert_eq!(done.acks, vec![("d1".to_owned(), Ack { boot: 1, seq: 2 })]);
        // Dropped without a clean close, like a kill -9 right after the commit.
    }
    let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("reopen");
    let done = b
        .commit(&[
            reading("d1", Some(2), 2.0, T0 + 1),
            reading("d1", Some(3), 3.0, T0 + 2),
            reading("d1", Some(4), 4.0, T0 + 3),
        ])
        .expect("commit");
    assert_eq!((done.accepted, done.duplicates), (1, 2));
    assert_eq!(done.acks, vec![("d1".to_owned(), Ack { boot: 1, seq: 4 })]);
    let seqs: Vec<Option<u32>> = all_records(&b).into_iter().map(|(_, r)| r.seq).collect();
    assert_eq!(seqs, vec![Some(1), Some(2), Some(4), Some(3)]);
    let offsets: Vec<u64> = all_records(&b).into_iter().map(|(o, _)| o).collect();
    assert_eq!(offsets, vec![0, 1, 2, 3]);
    assert!(b.check().expect("check").is_empty());
}

#[test]
fn a_duplicates_only_batch_is_acked_without_a_commit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("open");
    b.commit(&[reading("d1", Some(1), 1.0, T0)])
        .expect("commit");
    let next = b.meta().next_offset;
    let done = b
        .commit(&[reading("d1", Some(1), 1.0, T0)])
        .expect("commit");
    assert_eq!((done.accepted, done.duplicates), (0, 1));
    assert_eq!(done.acks, vec![("d1".to_owned(), Ack { boot: 1, seq: 1 })]);
    assert_eq!(b.meta().next_offset, next);
}

#[test]
fn boot_relative_time_is_rebased_to_the_agent_clock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = config(dir.path());
    let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("open");
    let mut r = reading("d1", Some(1), 1.0, T0);
    r.time = DeviceTime::SinceBoot(5_000);
    r.received_ms = T0 + 5_020;
    let mut r2 = r.clone();
    r2.seq = Some(2);
    r2.time = DeviceTime::SinceBoot(6_000);
    r2.received_ms = T0 + 6_500;
    b.commit(&[r, r2]).expect("commit");
    let ts: Vec<i64> = all_records(&b).into_iter().map(|(_, r)| r.ts_ms).collect();
    assert_eq!(ts, vec![T0 + 5_020, T0 + 6_020]);
}

#[test]
fn aggregates_survive_a_crash_between_checkpoints() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.aggregate.windows_secs = vec![60];
    let now = crate::now_ms();
    let start = now - now.rem_euclid(60_000);
    {
        let mut b = Buffer::open(&c.buffer, &c.aggregate, now).expect("open");
        b.commit(&[reading("d1", Some(1), 10.0, start)])
            .expect("commit");
        b.request_checkpoint();
        // This commit carries the checkpoint of the first reading's window...
        b.commit(&[reading("d1", Some(2), 20.0, start + 1)])
            .expect("commit");
        // ...and this one is only in the log: it must be replayed.
        b.commit(&[reading("d1", Some(3), 30.0, start + 2)])
            .expect("commit");
    }
    let mut b = Buffer::open(&c.buffer, &c.aggregate, now).expect("reopen");
    let published = b.take_aggregates(&[0.5]);
    assert_eq!(published.len(), 1);
    let json: serde_json::Value = serde_json::from_str(&published[0].1).expect("json");
    assert_eq!(json["count"], 3, "{json}");
    assert_eq!(json["min"], 10.0);
    assert_eq!(json["max"], 30.0);
}

fn stored_windows(b: &Buffer) -> u64 {
    let read = b.log().begin_read().expect("read");
    read.open_table(WINDOWS).expect("table").len().expect("len")
}

fn published_count(published: &[(String, String)], topic: &str) -> Option<u64> {
    let (_, json) = published.iter().find(|(t, _)| t == topic)?;
    let json: serde_json::Value = serde_json::from_str(json).ok()?;
    json["count"].as_u64()
}

#[test]
fn ended_windows_are_spilled_and_reloaded_for_late_readings() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.aggregate.windows_secs = vec![10];
    c.aggregate.lateness_secs = 600;
    let now = crate::now_ms();
    // A window that ended about a minute ago: still open for late readings.
    let old = now - now.rem_euclid(10_000) - 60_000;
    let topic = "agg/d1/temp/10s";
    {
        let mut b = Buffer::open(&c.buffer, &c.aggregate, now).expect("open");
        b.commit(&[reading("d1", Some(1), 4.0, old + 1)])
            .expect("commit");
        assert_eq!(published_count(&b.take_aggregates(&[]), topic), Some(1));
        assert_eq!(b.open_windows(), 1);
        // The next commit carries the checkpoint; the window then leaves memory.
        b.request_checkpoint();
        b.commit(&[reading("d2", Some(1), 1.0, now)])
            .expect("commit");
        assert_eq!(b.open_windows(), 1, "only d2's current window stays");
        assert_eq!(stored_windows(&b), 1);
        // A late reading finds the stored window, not an empty one.
        b.commit(&[reading("d1", Some(2), 8.0, old + 2)])
            .expect("commit");
        assert_eq!(published_count(&b.take_aggregates(&[]), topic), Some(2));
        b.checkpoint().expect("checkpoint");
        assert_eq!(b.open_windows(), 1, "spilled again once stored");
    }
    // After a restart the ended window stays in storage until it is needed.
    let mut b = Buffer::open(&c.buffer, &c.aggregate, now).expect("reopen");
    assert_eq!(b.open_windows(), 1);
    b.commit(&[reading("d1", Some(3), 6.0, old + 3)])
        .expect("commit");
    assert_eq!(published_count(&b.take_aggregates(&[]), topic), Some(3));
    b.checkpoint().expect("checkpoint");
    drop(b);
    // Once past its lateness a stored window is swept away, in memory or not.
    c.aggregate.lateness_secs = 10;
    let mut b = Buffer::open(&c.buffer, &c.aggregate, now).expect("reopen");
    assert_eq!(stored_windows(&b), 2);
    b.checkpoint().expect("checkpoint");
    assert_eq!(
        stored_windows(&b),
        1,
        "d1's old window is gone, d2's current one stays"
    );
    let done = b
        .commit(&[reading("d1", Some(4), 6.0, old + 4)])
        .expect("commit");
    assert_eq!(done.too_late, 1);
}

#[test]
fn a_full_buffer_downsamples_then_drops_the_oldest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.buffer.max_bytes = 16 * 1024;
    c.buffer.downsample_window_secs = 60;
    let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("open");
    let mut downsampled = 0;
    let mut dropped = 0;
    let mut first_room = None;
    let mut seq = 0;
    // One reading per device per minute: summaries are no smaller than the readings, so
    // downsampling alone cannot keep up and the oldest summaries get dropped.
    for minute in 0..400i64 {
        let batch: Vec<Incoming> = (0..8)
            .map(|d| {
                seq += 1;
                reading(
                    &format!("dev{d}"),
                    None,
                    f64::from(seq),
                    T0 + minute * 60_000,
                )
            })
            .collect();
        b.commit(&batch).expect("commit");
        let room = b.make_room().expect("make room");
        if room != Room::default() && first_room.is_none() {
            first_room = Some(room);
        }
        downsampled += room.downsampled;
        dropped += room.dropped;
        assert!(b.meta().total_bytes() <= c.buffer.max_bytes);
    }
    let first = first_room.expect("room was made");
    assert!(first.downsampled > 0, "downsampling comes first: {first:?}");
    assert!(downsampled > 0, "downsampled {downsampled}");
    assert!(dropped > 0, "dropped {dropped}");
    let m = b.meta();
    assert_eq!((m.downsampled, m.dropped), (downsampled, dropped));
    // The newest readings are still raw; the oldest summaries are gone.
    let records = all_records(&b);
    let newest = records.last().expect("raw readings remain").1.ts_ms;
    assert_eq!(newest, T0 + 399 * 60_000);
    let summaries = b.summaries().expect("summaries");
    let oldest_summary = summaries.first().expect("summaries remain").1.start_ms;
    assert!(
        oldest_summary > T0,
        "the oldest summaries were dropped first"
    );
    assert!(summaries
        .iter()
        .all(|(_, r)| r.start_ms < records[0].1.ts_ms + 60_000));
    assert!(b.check().expect("check").is_empty(), "{:?}", b.check());
    // The log covers every offset from the oldest summary on: summaries, then readings.
    let (first_span, _) = summaries.first().expect("a summary");
    let (from, _) = first_span.expect("summary blocks know their offsets");
    let blocks = b
        .log()
        .blocks_from(from, u64::MAX, b.meta().next_offset)
        .expect("blocks");
    for w in blocks.windows(2) {
        assert_eq!(w[0].end_offset, w[1].first_offset, "a hole in the log");
    }
    // Every reading is accounted for: raw, summarised, or dropped.
    let summarised: u64 = summaries.iter().map(|(_, r)| r.summary.count).sum();
    assert_eq!(
        records.len() as u64 + summarised + dropped,
        400 * 8,
        "raw {} + summarised {summarised} + dropped {dropped}",
        records.len()
    );
}

#[test]
fn batches_larger_than_the_headroom_never_push_the_buffer_over_capacity() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut c = config(dir.path());
    c.buffer.max_bytes = 16 * 1024;
    let mut b = Buffer::open(&c.buffer, &c.aggregate, T0).expect("open");
    let mut seq = 0;
    for round in 0..60i64 {
        // ~3 KiB per batch: far more than the 10 % between downsample_at and the capacity.
        let batch: Vec<Incoming> = (0..300)
            .map(|i| {
                seq += 1;
                reading(
                    "big",
                    Some(seq),
                    f64::from(seq) * 1.234_567,
                    T0 + round * 1000 + i,
                )
            })
            .collect();
        b.commit(&batch).expect("commit");
        assert!(
            b.meta().total_bytes() <= c.buffer.max_bytes,
            "{} > {} after a commit",
            b.meta().total_bytes(),
            c.buffer.max_bytes
        );
        b.make_room().expect("make room");
    }
    assert!(b.meta().downsampled > 0);
}
