//! The sensor frame decoder (`fogline_firmware::wire::decode`): any bytes, no panic; a
//! frame that decodes re-encodes to a frame that decodes to the same reading.
#![no_main]

use fogline_firmware::wire;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(reading) = wire::decode(data) {
        let mut buf = [0u8; 256];
        if let Ok(bytes) = wire::encode(&reading, &mut buf) {
            let again = wire::decode(bytes).expect("a re-encoded frame decodes");
            assert_eq!(again, reading);
        }
    }
});
