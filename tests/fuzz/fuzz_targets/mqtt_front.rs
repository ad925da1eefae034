//! The device front end's MQTT parsing (`fogline_agent::frontend`): CONNECT, PUBLISH
//! topic and SUBSCRIBE filters from any bytes; no panic.
#![no_main]

use fogline_agent::frontend;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = frontend::parse_connect(data);
    let _ = frontend::publish_topic(data);
    let _ = frontend::subscribe_filters(data, false);
    let _ = frontend::subscribe_filters(data, true);
});
