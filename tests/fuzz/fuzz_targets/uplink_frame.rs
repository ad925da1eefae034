//! The receiving end of log shipping (the gateway's uplink, a peer's replication): topic
//! parsers of both schemes, the batch frame decoder and the stored block inside it
//! (`fogline_agent::shipping::proto`, `buffer::block`); no panic on any bytes.
#![no_main]

use fogline_agent::shipping::proto;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frame) = proto::decode_batch(data) {
        let _ = fogline_agent::buffer::block::decode_entry(frame.block);
        let _ = fogline_agent::buffer::block::count(frame.block);
    }
    if let Ok(topic) = std::str::from_utf8(data) {
        let _ = proto::UPLINK.parse_topic(topic);
        let _ = proto::REPLICATION.parse_topic(topic);
    }
});
