use std::vec::Vec;

use super::*;

fn sample() -> Config<'static> {
    Config {
        device: "greenhouse-1",
        wifi_ssid: "farm net",
        wifi_password: "correct horse",
        agent_host: "agent.local",
        agent_port: 1884,
        username: "greenhouse-1",
        password: "s3cret",
        sensor: SensorKind::Bme280,
        sensor_address: Some(0x77),
        sample_period_ms: 30_000,
    }
}

fn encoded(config: &Config<'_>) -> Vec<u8> {
    let mut sector = std::vec![0xFFu8; SECTOR_SIZE];
    let len = config.encode(&mut sector).expect("valid config encodes");
    assert_eq!(len, config.encoded_len());
    sector
}

#[test]
fn a_block_reads_back_as_the_config_it_was_written_from() {
    let (hex_key, long_ssid) = ("ab12".repeat(16), "s".repeat(32));
    let configs = [
        sample(),
        Config::new("d", "x", "", "10.0.0.2", SensorKind::Sht3x),
        Config {
            wifi_password: &hex_key,
            sample_period_ms: MAX_SAMPLE_PERIOD_MS,
            ..Config::new("a.b_c-9", &long_ssid, "", "h", SensorKind::Sht4x)
        },
    ];
    for config in configs {
        let sector = encoded(&config);
        assert_eq!(Config::parse(&sector), Ok(config));
        // The exact block alone parses too (a .bin file without the erased tail).
        assert_eq!(Config::parse(&sector[..config.encoded_len()]), Ok(config));
    }
}

#[test]
fn the_block_layout_matches_the_documented_offsets() {
    let config = Config::new("d1", "ssid", "", "h", SensorKind::Sht4x);
    let block = encoded(&config);
    assert_eq!(&block[0..4], b"FGLC");
    assert_eq!(block[4], VERSION);
    assert_eq!(block[5], 2, "SHT4x code");
    assert_eq!(block[6], 0, "usual address");
    assert_eq!(u16::from_le_bytes([block[8], block[9]]), DEFAULT_PORT);
    assert_eq!(
        u32::from_le_bytes([block[10], block[11], block[12], block[13]]),
        DEFAULT_SAMPLE_PERIOD_MS
    );
    // d1, ssid, "", h, "", "" with their length bytes.
    assert_eq!(
        u16::from_le_bytes([block[14], block[15]]),
        3 + 5 + 1 + 2 + 1 + 1
    );
    assert_eq!(&block[16..19], b"\x02d1");
    let end = config.encoded_len();
    assert_eq!(
        u32::from_le_bytes([
            block[end - 4],
            block[end - 3],
            block[end - 2],
            block[end - 1]
        ]),
        crc32(&block[..end - 4])
    );
    assert!(block[end..].iter().all(|&b| b == 0xFF));
}

#[test]
fn crc32_matches_the_standard_check_value() {
    // The CRC-32/ISO-HDLC check value from the CRC catalogue.
    assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
    assert_eq!(crc32(b""), 0);
}

#[test]
fn damaged_blocks_are_refused_with_the_reason() {
    let good = encoded(&sample());
    let len = sample().encoded_len();
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x01;
        b
    };
    let mut wrong_version = good.clone();
    wrong_version[4] = 2;
    let cases: [(&str, Vec<u8>, ParseError); 8] = [
        (
            "erased sector",
            std::vec![0xFF; SECTOR_SIZE],
            ParseError::NotProvisioned,
        ),
        (
            "zeroed sector",
            std::vec![0; SECTOR_SIZE],
            ParseError::BadMagic,
        ),
        ("empty input", Vec::new(), ParseError::Truncated),
        ("header only", good[..10].to_vec(), ParseError::Truncated),
        (
            "cut before the crc",
            good[..len - 2].to_vec(),
            ParseError::Truncated,
        ),
        (
            "newer version",
            wrong_version,
            ParseError::UnsupportedVersion(2),
        ),
        ("a flipped string bit", flip(20), ParseError::BadChecksum),
        ("a flipped port bit", flip(8), ParseError::BadChecksum),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(Config::parse(&bytes), Err(want), "{what}");
    }
}

/// A block with a valid checksum over whatever header and strings the test wants, to
/// reach the checks behind the checksum.
fn forged(header: [u8; 16], strings: &[u8]) -> Vec<u8> {
    let mut block = header.to_vec();
    block[14..16].copy_from_slice(&(strings.len() as u16).to_le_bytes());
    block.extend_from_slice(strings);
    let crc = crc32(&block);
    block.extend_from_slice(&crc.to_le_bytes());
    block
}

#[test]
fn well_formed_blocks_with_bad_contents_are_refused() {
    let header = |sensor: u8, port: u16, period: u32| {
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&MAGIC);
        h[4] = VERSION;
        h[5] = sensor;
        h[8..10].copy_from_slice(&port.to_le_bytes());
        h[10..14].copy_from_slice(&period.to_le_bytes());
        h
    };
    let ok_strings = b"\x02d1\x04ssid\x00\x01h\x00\x00";
    // The forger itself makes blocks that parse, so the refusals below are the contents'.
    let control = forged(header(1, 1883, 10_000), ok_strings);
    assert_eq!(
        Config::parse(&control),
        Ok(Config::new("d1", "ssid", "", "h", SensorKind::Sht3x))
    );
    let cases: [(&str, Vec<u8>, ParseError); 6] = [
        (
            "unknown sensor",
            forged(header(9, 1883, 10_000), ok_strings),
            ParseError::Invalid(Field::Sensor),
        ),
        (
            "port 0",
            forged(header(1, 0, 10_000), ok_strings),
            ParseError::Invalid(Field::AgentPort),
        ),
        (
            "period 0",
            forged(header(1, 1883, 0), ok_strings),
            ParseError::Invalid(Field::SamplePeriod),
        ),
        (
            "string past the end",
            forged(header(1, 1883, 10_000), b"\x02d1\x09ssid"),
            ParseError::Malformed,
        ),
        (
            "bytes after the strings",
            forged(
                header(1, 1883, 10_000),
                b"\x02d1\x04ssid\x00\x01h\x00\x00\x00",
            ),
            ParseError::Malformed,
        ),
        (
            "device not utf-8",
            forged(
                header(1, 1883, 10_000),
                b"\x02\xFF\xFE\x04ssid\x00\x01h\x00\x00",
            ),
            ParseError::Malformed,
        ),
    ];
    for (what, bytes, want) in cases {
        assert_eq!(Config::parse(&bytes), Err(want), "{what}");
    }
}

#[test]
fn every_field_rule_is_enforced_when_writing() {
    let long = "x".repeat(65);
    let cases: [(&str, Config<'_>, Field); 15] = [
        (
            "empty device",
            Config {
                device: "",
                ..sample()
            },
            Field::Device,
        ),
        (
            "device with a slash",
            Config {
                device: "a/b",
                ..sample()
            },
            Field::Device,
        ),
        (
            "empty ssid",
            Config {
                wifi_ssid: "",
                ..sample()
            },
            Field::WifiSsid,
        ),
        (
            "33-byte ssid",
            Config {
                wifi_ssid: &long[..33],
                ..sample()
            },
            Field::WifiSsid,
        ),
        (
            "7-char passphrase",
            Config {
                wifi_password: "1234567",
                ..sample()
            },
            Field::WifiPassword,
        ),
        (
            "64 chars, not hex",
            Config {
                wifi_password: &long[..64],
                ..sample()
            },
            Field::WifiPassword,
        ),
        (
            "passphrase with a newline",
            Config {
                wifi_password: "abcdefgh\n",
                ..sample()
            },
            Field::WifiPassword,
        ),
        (
            "host with a colon",
            Config {
                agent_host: "agent:1883",
                ..sample()
            },
            Field::AgentHost,
        ),
        (
            "host starting with a dot",
            Config {
                agent_host: ".local",
                ..sample()
            },
            Field::AgentHost,
        ),
        (
            "port 0",
            Config {
                agent_port: 0,
                ..sample()
            },
            Field::AgentPort,
        ),
        (
            "user without password",
            Config {
                password: "",
                ..sample()
            },
            Field::Password,
        ),
        (
            "password without user",
            Config {
                username: "",
                ..sample()
            },
            Field::Username,
        ),
        (
            "address 0x78",
            Config {
                sensor_address: Some(0x78),
                ..sample()
            },
            Field::SensorAddress,
        ),
        (
            "SHT4x at 0x47",
            Config {
                sensor: SensorKind::Sht4x,
                sensor_address: Some(0x47),
                ..sample()
            },
            Field::SensorAddress,
        ),
        (
            "999 ms period",
            Config {
                sample_period_ms: 999,
                ..sample()
            },
            Field::SamplePeriod,
        ),
    ];
    for (what, config, field) in cases {
        let mut out = [0u8; SECTOR_SIZE];
        assert_eq!(
            config.encode(&mut out),
            Err(EncodeError::Invalid(field)),
            "{what}"
        );
    }
}

#[test]
fn a_too_small_buffer_is_an_error_not_a_panic() {
    let config = sample();
    let mut out = std::vec![0u8; config.encoded_len() - 1];
    assert_eq!(config.encode(&mut out), Err(EncodeError::BufferTooSmall));
}

#[test]
fn ipv4_literals_are_recognised_and_names_are_not() {
    let cases = [
        ("192.168.1.20", Some([192, 168, 1, 20])),
        ("10.0.0.1", Some([10, 0, 0, 1])),
        ("256.0.0.1", None),
        ("1.2.3", None),
        ("1.2.3.4.5", None),
        ("1..2.3", None),
        ("agent.local", None),
        ("0001.2.3.4", None),
    ];
    for (host, want) in cases {
        assert_eq!(parse_ipv4(host), want, "{host}");
    }
}

#[test]
fn sensor_kinds_round_trip_through_code_and_name() {
    for kind in SensorKind::ALL {
        assert_eq!(SensorKind::from_code(kind.code()), Some(kind));
        assert_eq!(SensorKind::from_name(kind.name()), Some(kind));
    }
    assert_eq!(SensorKind::from_name("BME280"), Some(SensorKind::Bme280));
    assert_eq!(SensorKind::from_code(0), None);
    assert_eq!(SensorKind::from_name("dht22"), None);
    let c = Config::new("d", "s", "", "h", SensorKind::Bme280);
    assert_eq!(c.sensor_address(), 0x76);
    assert_eq!(
        Config {
            sensor_address: Some(0x77),
            ..c
        }
        .sensor_address(),
        0x77
    );
}

#[test]
fn the_block_sits_in_the_last_flash_sector() {
    assert_eq!(BLOCK_OFFSET, 0x1F_F000);
    assert_eq!(BLOCK_ADDRESS, 0x101F_F000);
    assert_eq!(BLOCK_OFFSET as usize % SECTOR_SIZE, 0);
}

#[test]
fn a_sector_becomes_sixteen_rp2040_uf2_blocks() {
    let sector = encoded(&sample());
    let blocks: Vec<[u8; uf2::BLOCK_LEN]> = uf2::blocks(BLOCK_ADDRESS, &sector).collect();
    assert_eq!(blocks.len(), 16);
    let mut rebuilt = Vec::new();
    for (i, raw) in blocks.iter().enumerate() {
        let block = uf2::parse_block(raw).expect("well-formed block");
        assert_eq!(block.address, BLOCK_ADDRESS + 256 * i as u32);
        assert_eq!(block.index, i as u32);
        assert_eq!(block.total, 16);
        assert_eq!(block.family, uf2::RP2040_FAMILY_ID);
        assert_eq!(
            u32::from_le_bytes([raw[8], raw[9], raw[10], raw[11]]),
            0x2000
        );
        rebuilt.extend_from_slice(block.payload);
    }
    assert_eq!(rebuilt, sector);
}

#[test]
fn a_short_payload_is_padded_like_erased_flash() {
    let data = [1u8, 2, 3];
    let blocks: Vec<_> = uf2::blocks(0x1000_0000, &data).collect();
    assert_eq!(blocks.len(), 1);
    let block = uf2::parse_block(&blocks[0]).expect("well-formed block");
    assert_eq!(&block.payload[..3], &data);
    assert!(block.payload[3..].iter().all(|&b| b == 0xFF));
    assert_eq!(uf2::parse_block(&blocks[0][..511]), None);
    let mut bad = blocks[0];
    bad[0] ^= 1;
    assert_eq!(uf2::parse_block(&bad), None);
}
