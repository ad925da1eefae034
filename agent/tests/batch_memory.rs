//! A batch shipped from the network (a peer's replication, an agent's uplink) must cost
//! about its own size in memory where it is received. Before, counting a block decoded
//! it whole — two strings per reading — so a 1 MiB batch of small readings took ~30 MiB
//! at the receiver, and a few in a queue could take a Pi's memory.
//!
//! A counting allocator measures the peak of what applying one batch allocates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};
use std::sync::Arc;

use fogline_agent::buffer::block::{self, Record};
use fogline_agent::shipping::proto::BatchFrame;
use fogline_agent::shipping::store::{Applied, Store, Txn};

struct Counting;

static NOW: AtomicIsize = AtomicIsize::new(0);
static PEAK: AtomicIsize = AtomicIsize::new(0);

#[allow(unsafe_code)]
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let now = NOW.fetch_add(layout.size() as isize, Ordering::SeqCst) + layout.size() as isize;
        PEAK.fetch_max(now, Ordering::SeqCst);
        // SAFETY: the layout is the caller's, passed on unchanged.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        NOW.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        // SAFETY: `ptr` came from `alloc` with this layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

#[test]
fn applying_a_batch_costs_about_its_size() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Store::open(&dir.path().join("s.redb"), 1 << 20).expect("open");
    let name: Arc<str> = Arc::from("sensor-with-a-long-name-01");
    let records: Vec<Record> = (0..150_000u32)
        .map(|i| Record {
            device: name.clone(),
            metric: "temperature".into(),
            boot: 1,
            seq: Some(i + 1),
            ts_ms: 1_700_000_000_000 + i64::from(i) * 1000,
            value: 21.5,
        })
        .collect();
    let bytes = block::encode(&records);
    drop(records);
    let frame = BatchFrame {
        start: 0,
        first_offset: 0,
        block: &bytes,
    };
    let mut txn = Txn::default();
    let base = NOW.load(Ordering::SeqCst);
    PEAK.store(base, Ordering::SeqCst);
    let applied = store.apply(&mut txn, "s", "o", &frame);
    let count = block::count(&bytes).expect("count");
    let peak = PEAK.load(Ordering::SeqCst) - base;
    assert_eq!(applied, Applied::Stored(150_000));
    assert_eq!(count, 150_000);
    let ratio = peak as f64 / bytes.len() as f64;
    eprintln!(
        "a {}-byte batch of {count} readings: {peak} bytes allocated at the peak ({ratio:.1}x)",
        bytes.len()
    );
    assert!(
        ratio < 2.5,
        "applying a {}-byte batch allocated {peak} bytes at once ({ratio:.1}x)",
        bytes.len()
    );
}
