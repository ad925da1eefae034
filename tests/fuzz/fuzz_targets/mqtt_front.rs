//! The MQTT parsing of the front ends (`fogline_agent::frontend` for the gateway's TLS
//! relay, `fogline_agent::mqtt` for the agent: rumqttd's v4/v5 codecs, the protocol-level
//! sniff and the packet-id splice) from any bytes; no panic.
#![no_main]

use fogline_agent::frontend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frontend::parse_connect(data);
    let _ = frontend::publish_topic(data);
    let _ = frontend::subscribe_filters(data, false);
    let _ = frontend::subscribe_filters(data, true);
    fogline_agent::mqtt::decode_any(data);
});
