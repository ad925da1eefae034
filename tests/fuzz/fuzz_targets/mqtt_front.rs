//! The agent's MQTT front end (`fogline_agent::mqtt`) decoding any bytes: rumqttd's
//! v4/v5 codecs as the front end drives them, the protocol-level sniff and the
//! packet-id splice; no panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    fogline_agent::mqtt::decode_any(data);
});
