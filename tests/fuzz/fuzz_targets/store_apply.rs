//! The receiving end's store (`fogline_agent::shipping::store::Store`, the gateway's and every
//! replica's): any sequence of batches — garbage, or real blocks at arbitrary offsets —
//! is applied without a panic or an overflow, and the log stays what every reader relies
//! on: blocks in offset order that never overlap, ending at the watermark, which never
//! moves back; reading from any offset returns only blocks that hold it or come after.
#![no_main]

use fogline_agent::buffer::block::{self, Record};
use fogline_agent::shipping::store::{Store, Txn};
use fogline_agent::shipping::proto::BatchFrame;
use libfuzzer_sys::fuzz_target;

fn u64_at(data: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    for (i, x) in data.iter().skip(at).take(8).enumerate() {
        b[i] = *x;
    }
    u64::from_le_bytes(b)
}

fuzz_target!(|data: &[u8]| {
    let Ok(mut store) = Store::in_memory() else {
        return;
    };
    let mut last_next = 0u64;
    // Each step: 1 kind byte, 2 × 8 bytes of offsets, 1 length byte, the payload.
    let mut at = 0;
    while at + 18 <= data.len() {
        let kind = data[at];
        // Small offsets mostly, so that batches join; sometimes anything.
        let (mut start, mut first) = (u64_at(data, at + 1), u64_at(data, at + 9));
        if kind & 0x80 == 0 {
            start %= 64;
            first %= 64;
        }
        let len = usize::from(data[at + 17]);
        at += 18;
        let payload = &data[at..(at + len).min(data.len())];
        at += len;
        let bytes = match kind & 3 {
            0 => payload.to_vec(),
            1 => {
                let records: Vec<Record> = payload
                    .iter()
                    .map(|&b| Record {
                        device: "d".into(),
                        metric: "m".into(),
                        boot: 1,
                        seq: Some(u32::from(b) + 1),
                        ts_ms: i64::from(b) * 1000,
                        value: f64::from(b),
                    })
                    .collect();
                block::encode(&records)
            }
            2 => {
                let mut s = block::Summaries {
                    covers: 0,
                    rows: Vec::new(),
                };
                let records: Vec<Record> = payload
                    .iter()
                    .map(|&b| Record {
                        device: "d".into(),
                        metric: "m".into(),
                        boot: 1,
                        seq: None,
                        ts_ms: i64::from(b) * 7000,
                        value: f64::from(b),
                    })
                    .collect();
                block::summarise(&records, 60, &mut s);
                if s.covers == 0 {
                    continue;
                }
                block::encode_summaries(&s)
            }
            _ => {
                let mut b = block::encode(&[]);
                b.extend_from_slice(payload);
                b
            }
        };
        let frame = BatchFrame {
            start: start.min(first),
            first_offset: first,
            block: &bytes,
        };
        let mut txn = Txn::default();
        let _ = store.apply(&mut txn, "s", "o", &frame);
        if store.commit(txn).is_err() {
            return;
        }
        let next = store.next(&Txn::default(), "s", "o");
        assert!(next >= last_next, "the watermark moved back");
        last_next = next;
        if kind & 0x40 != 0 {
            let _ = store.trim(64, 60);
        }
    }
    let Ok(blocks) = store.blocks_from("s", "o", 0, u64::MAX, last_next) else {
        return;
    };
    for w in blocks.windows(2) {
        assert!(w[0].end_offset <= w[1].first_offset, "blocks overlap");
    }
    if let Some(b) = blocks.last() {
        assert!(b.end_offset <= last_next, "a block beyond the watermark");
    }
    for from in [0, last_next / 2, last_next.saturating_sub(1)] {
        if let Ok(got) = store.blocks_from("s", "o", from, 10, last_next) {
            assert!(got.iter().all(|b| b.end_offset > from));
        }
    }
});
