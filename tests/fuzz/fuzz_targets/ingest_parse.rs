//! The agent's ingest parser (`fogline_agent::ingest::parse`): topic and payload (frame,
//! JSON or plain number) from any bytes; no panic, and an accepted reading is finite and
//! carries the topic's ids.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // topic \0 payload
    let (topic, payload) = match data.iter().position(|&b| b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (&b"sensors/d1/temp"[..], data),
    };
    if let Ok(r) = fogline_agent::ingest::parse(topic, payload, 1024, 1_700_000_000_000) {
        assert!(r.value.is_finite());
        let topic = std::str::from_utf8(topic).expect("accepted topics are UTF-8");
        assert_eq!(topic, format!("sensors/{}/{}", r.device, r.metric));
    }
});
