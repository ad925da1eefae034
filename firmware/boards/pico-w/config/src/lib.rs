//! The Pico W sensor's configuration block: what a user sets without recompiling.
//!
//! The firmware image is the same for every sensor. What differs — the Wi-Fi network, the
//! agent's address, the device id, the MQTT credentials, the sensor on the bus — lives in
//! one 4 KiB flash sector at the end of the RP2040's flash ([`BLOCK_OFFSET`]), which the
//! image never touches. `fogline-sensor provision` writes that sector as a UF2 file (drag
//! it onto the Pico's USB drive like the image) or as a raw `.bin` (for `probe-rs
//! download`); the firmware reads it at boot with [`Config::parse`].
//!
//! # Layout (version 1, little-endian)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `FGLC` |
//! | 4 | 1 | version (1) |
//! | 5 | 1 | sensor: 1 SHT3x, 2 SHT4x, 3 BME280 ([`SensorKind`]) |
//! | 6 | 1 | sensor I2C address, 0 for the sensor's usual one |
//! | 7 | 1 | reserved, 0 |
//! | 8 | 2 | agent MQTT port |
//! | 10 | 4 | sample period, ms |
//! | 14 | 2 | length `L` of the strings that follow |
//! | 16 | L | six strings, each a length byte and UTF-8: device id, Wi-Fi SSID, Wi-Fi password, agent host, MQTT user name, MQTT password |
//! | 16+L | 4 | CRC-32 (IEEE) of bytes `0..16+L` |
//!
//! The rest of the sector is 0xFF (erased flash). An erased sector reads as
//! [`ParseError::NotProvisioned`], which the firmware shows on its LED. The one codec lives
//! here so that the writer and the reader cannot drift.
#![no_std]
#![deny(unsafe_code)]

#[cfg(test)]
extern crate std;

pub mod uf2;

use fogline_firmware::wire;

/// The RP2040 on a Pico W has 2 MiB of QSPI flash.
pub const FLASH_SIZE: usize = 2 * 1024 * 1024;
/// The flash erase unit; the block owns one whole sector.
pub const SECTOR_SIZE: usize = 4096;
/// Where the block lives, as an offset into flash: the last sector.
pub const BLOCK_OFFSET: u32 = (FLASH_SIZE - SECTOR_SIZE) as u32;
/// The flash is mapped for execute-in-place reads from this address.
pub const XIP_BASE: u32 = 0x1000_0000;
/// Where the block lives in the address space (what a UF2 file or a probe writes to).
pub const BLOCK_ADDRESS: u32 = XIP_BASE + BLOCK_OFFSET;

/// The first four bytes of a provisioned block.
pub const MAGIC: [u8; 4] = *b"FGLC";
/// The layout version this code writes and reads.
pub const VERSION: u8 = 1;
/// The MQTT port used when none is given.
pub const DEFAULT_PORT: u16 = 1883;
/// The sample period used when none is given.
pub const DEFAULT_SAMPLE_PERIOD_MS: u32 = 10_000;
/// Shortest sample period accepted: the drivers' conversions take up to ~40 ms and the
/// agent's aggregates gain nothing from more than one reading a second per metric.
pub const MIN_SAMPLE_PERIOD_MS: u32 = 1_000;
/// Longest sample period accepted: a day.
pub const MAX_SAMPLE_PERIOD_MS: u32 = 86_400_000;
/// Longest agent host name (DNS names can be longer; sensors on a LAN use short ones).
pub const MAX_HOST_LEN: usize = 64;
/// Longest MQTT user name or password.
pub const MAX_CREDENTIAL_LEN: usize = 64;
/// Longest Wi-Fi SSID (802.11 limit).
pub const MAX_SSID_LEN: usize = 32;

const HEADER_LEN: usize = 16;
const CRC_LEN: usize = 4;

/// Which sensor is on the I2C bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SensorKind {
    /// Sensirion SHT30/31/35, 0x44 (0x45 with ADDR high).
    Sht3x,
    /// Sensirion SHT40/41/45, 0x44.
    Sht4x,
    /// Bosch BME280, 0x76 (0x77 with SDO high).
    Bme280,
}

impl SensorKind {
    /// Every kind, in the order of their codes.
    pub const ALL: [SensorKind; 3] = [SensorKind::Sht3x, SensorKind::Sht4x, SensorKind::Bme280];

    /// The byte stored in the block.
    pub const fn code(self) -> u8 {
        match self {
            SensorKind::Sht3x => 1,
            SensorKind::Sht4x => 2,
            SensorKind::Bme280 => 3,
        }
    }

    /// The kind stored as `code`, if any.
    pub fn from_code(code: u8) -> Option<SensorKind> {
        SensorKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The name users type (`sht3x`, `sht4x`, `bme280`).
    pub const fn name(self) -> &'static str {
        match self {
            SensorKind::Sht3x => "sht3x",
            SensorKind::Sht4x => "sht4x",
            SensorKind::Bme280 => "bme280",
        }
    }

    /// The kind called `name` (case-insensitive).
    pub fn from_name(name: &str) -> Option<SensorKind> {
        SensorKind::ALL
            .into_iter()
            .find(|k| k.name().eq_ignore_ascii_case(name))
    }

    /// The address the sensor answers on when its address pin is left alone.
    pub const fn default_address(self) -> u8 {
        match self {
            SensorKind::Sht3x | SensorKind::Sht4x => 0x44,
            SensorKind::Bme280 => 0x76,
        }
    }
}

/// Everything a sensor needs to know about its site. Strings borrow from the block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Config<'a> {
    /// Device id (1..=32 of `[A-Za-z0-9_.-]`); also the MQTT client id.
    pub device: &'a str,
    /// Wi-Fi network name.
    pub wifi_ssid: &'a str,
    /// WPA2 passphrase (8..=63 characters, or 64 hex digits); empty for an open network.
    pub wifi_password: &'a str,
    /// The agent's host name or IPv4 address.
    pub agent_host: &'a str,
    /// The agent's MQTT port.
    pub agent_port: u16,
    /// MQTT user name; empty when the agent runs without device credentials.
    pub username: &'a str,
    /// MQTT password; empty when the agent runs without device credentials.
    pub password: &'a str,
    /// Which sensor is wired to I2C0.
    pub sensor: SensorKind,
    /// The sensor's 7-bit address; `None` for its usual one.
    pub sensor_address: Option<u8>,
    /// Time between readings.
    pub sample_period_ms: u32,
}

/// The part of a [`Config`] an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Field {
    /// [`Config::device`]
    Device,
    /// [`Config::wifi_ssid`]
    WifiSsid,
    /// [`Config::wifi_password`]
    WifiPassword,
    /// [`Config::agent_host`]
    AgentHost,
    /// [`Config::agent_port`]
    AgentPort,
    /// [`Config::username`]
    Username,
    /// [`Config::password`]
    Password,
    /// [`Config::sensor`]
    Sensor,
    /// [`Config::sensor_address`]
    SensorAddress,
    /// [`Config::sample_period_ms`]
    SamplePeriod,
}

impl Field {
    /// A short human name of the field.
    pub const fn name(self) -> &'static str {
        match self {
            Field::Device => "device id",
            Field::WifiSsid => "Wi-Fi SSID",
            Field::WifiPassword => "Wi-Fi password",
            Field::AgentHost => "agent host",
            Field::AgentPort => "agent port",
            Field::Username => "MQTT user name",
            Field::Password => "MQTT password",
            Field::Sensor => "sensor",
            Field::SensorAddress => "sensor address",
            Field::SamplePeriod => "sample period",
        }
    }

    /// What a valid value looks like.
    pub const fn rule(self) -> &'static str {
        match self {
            Field::Device => "1-32 characters of [A-Za-z0-9_.-]",
            Field::WifiSsid => "1-32 bytes",
            Field::WifiPassword => {
                "empty (open network), 8-63 printable ASCII characters, or 64 hex digits"
            }
            Field::AgentHost => "1-64 characters of [A-Za-z0-9.-] (a host name or IPv4 address)",
            Field::AgentPort => "1-65535",
            Field::Username | Field::Password => "at most 64 bytes, both set or both empty",
            Field::Sensor => "sht3x, sht4x or bme280",
            Field::SensorAddress => "a 7-bit address 0x08-0x77 (0x44-0x46 for an SHT4x)",
            Field::SamplePeriod => "1 s to 1 day",
        }
    }
}

/// Why a [`Config`] cannot be written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum EncodeError {
    /// A field breaks its rule ([`Field::rule`]).
    Invalid(Field),
    /// The output buffer is smaller than [`Config::encoded_len`].
    BufferTooSmall,
}

/// Why a block could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ParseError {
    /// The sector is erased: this board was never provisioned.
    NotProvisioned,
    /// The sector holds something else.
    BadMagic,
    /// Written by a newer (or unknown) layout version.
    UnsupportedVersion(u8),
    /// The block claims more bytes than the input has.
    Truncated,
    /// The checksum does not match: a torn or corrupted write.
    BadChecksum,
    /// A string is not UTF-8, or the strings do not fill their declared length exactly.
    Malformed,
    /// Well-formed, but a field breaks its rule (e.g. a block edited by hand).
    Invalid(Field),
}

impl core::fmt::Display for EncodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            EncodeError::Invalid(field) => write!(f, "{} must be {}", field.name(), field.rule()),
            EncodeError::BufferTooSmall => f.write_str("output buffer too small"),
        }
    }
}

impl core::fmt::Display for ParseError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ParseError::NotProvisioned => f.write_str("no configuration (erased flash)"),
            ParseError::BadMagic => f.write_str("not a fogline configuration block"),
            ParseError::UnsupportedVersion(v) => write!(f, "unsupported block version {v}"),
            ParseError::Truncated => f.write_str("block is truncated"),
            ParseError::BadChecksum => f.write_str("block checksum does not match"),
            ParseError::Malformed => f.write_str("block strings are malformed"),
            ParseError::Invalid(field) => {
                write!(f, "{} in the block must be {}", field.name(), field.rule())
            }
        }
    }
}

impl<'a> Config<'a> {
    /// A configuration with the default port, sample period and sensor address, and no
    /// MQTT credentials.
    pub const fn new(
        device: &'a str,
        wifi_ssid: &'a str,
        wifi_password: &'a str,
        agent_host: &'a str,
        sensor: SensorKind,
    ) -> Config<'a> {
        Config {
            device,
            wifi_ssid,
            wifi_password,
            agent_host,
            agent_port: DEFAULT_PORT,
            username: "",
            password: "",
            sensor,
            sensor_address: None,
            sample_period_ms: DEFAULT_SAMPLE_PERIOD_MS,
        }
    }

    /// Checks every field against its rule; the first broken one is returned.
    pub fn validate(&self) -> Result<(), Field> {
        if !wire::valid_id(self.device) {
            return Err(Field::Device);
        }
        if self.wifi_ssid.is_empty() || self.wifi_ssid.len() > MAX_SSID_LEN {
            return Err(Field::WifiSsid);
        }
        if !valid_wifi_password(self.wifi_password) {
            return Err(Field::WifiPassword);
        }
        if !valid_host(self.agent_host) {
            return Err(Field::AgentHost);
        }
        if self.agent_port == 0 {
            return Err(Field::AgentPort);
        }
        if self.username.len() > MAX_CREDENTIAL_LEN {
            return Err(Field::Username);
        }
        if self.password.len() > MAX_CREDENTIAL_LEN {
            return Err(Field::Password);
        }
        // The agent checks both or neither; one without the other is a typo.
        if self.username.is_empty() != self.password.is_empty() {
            return Err(if self.username.is_empty() {
                Field::Username
            } else {
                Field::Password
            });
        }
        if let Some(address) = self.sensor_address {
            let possible = match self.sensor {
                // SHT4x parts are made for 0x44, 0x45 and 0x46 only.
                SensorKind::Sht4x => 0x44..=0x46,
                SensorKind::Sht3x | SensorKind::Bme280 => 0x08..=0x77,
            };
            if !possible.contains(&address) {
                return Err(Field::SensorAddress);
            }
        }
        if !(MIN_SAMPLE_PERIOD_MS..=MAX_SAMPLE_PERIOD_MS).contains(&self.sample_period_ms) {
            return Err(Field::SamplePeriod);
        }
        Ok(())
    }

    /// The sensor's address: the configured one, or the sensor's usual one.
    pub fn sensor_address(&self) -> u8 {
        self.sensor_address.unwrap_or(self.sensor.default_address())
    }

    /// The agent's address when [`Config::agent_host`] is a dotted IPv4 address (no DNS
    /// lookup needed).
    pub fn agent_ipv4(&self) -> Option<[u8; 4]> {
        parse_ipv4(self.agent_host)
    }

    fn strings(&self) -> [&'a str; 6] {
        [
            self.device,
            self.wifi_ssid,
            self.wifi_password,
            self.agent_host,
            self.username,
            self.password,
        ]
    }

    /// Bytes [`Config::encode`] writes.
    pub fn encoded_len(&self) -> usize {
        HEADER_LEN + self.strings().iter().map(|s| 1 + s.len()).sum::<usize>() + CRC_LEN
    }

    /// Writes the block into `out` (at least [`Config::encoded_len`] bytes) and returns
    /// its length. Refuses a configuration that [`Config::validate`] refuses, so a block
    /// that parses is always one the firmware can use.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        self.validate().map_err(EncodeError::Invalid)?;
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(EncodeError::BufferTooSmall)?;
        let strings_len = len - HEADER_LEN - CRC_LEN;
        out[0..4].copy_from_slice(&MAGIC);
        out[4] = VERSION;
        out[5] = self.sensor.code();
        out[6] = self.sensor_address.unwrap_or(0);
        out[7] = 0;
        out[8..10].copy_from_slice(&self.agent_port.to_le_bytes());
        out[10..14].copy_from_slice(&self.sample_period_ms.to_le_bytes());
        // Validated above: every string is at most 64 bytes, so this fits a u16.
        out[14..16].copy_from_slice(&(strings_len as u16).to_le_bytes());
        let mut at = HEADER_LEN;
        for s in self.strings() {
            out[at] = s.len() as u8;
            out[at + 1..at + 1 + s.len()].copy_from_slice(s.as_bytes());
            at += 1 + s.len();
        }
        let crc = crc32(&out[..at]);
        out[at..at + CRC_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(len)
    }

    /// Reads a block (the whole sector or just its start). Never panics, whatever the
    /// bytes: flash can hold anything.
    pub fn parse(block: &'a [u8]) -> Result<Config<'a>, ParseError> {
        let magic = block.get(0..4).ok_or(ParseError::Truncated)?;
        if magic == [0xFF; 4] {
            return Err(ParseError::NotProvisioned);
        }
        if magic != MAGIC {
            return Err(ParseError::BadMagic);
        }
        let header = block.get(..HEADER_LEN).ok_or(ParseError::Truncated)?;
        if header[4] != VERSION {
            return Err(ParseError::UnsupportedVersion(header[4]));
        }
        let strings_len = usize::from(u16::from_le_bytes([header[14], header[15]]));
        let body_end = HEADER_LEN + strings_len;
        let stored_crc = block
            .get(body_end..body_end + CRC_LEN)
            .ok_or(ParseError::Truncated)?;
        let stored_crc =
            u32::from_le_bytes([stored_crc[0], stored_crc[1], stored_crc[2], stored_crc[3]]);
        if crc32(&block[..body_end]) != stored_crc {
            return Err(ParseError::BadChecksum);
        }
        let mut strings = Strings {
            rest: &block[HEADER_LEN..body_end],
        };
        let device = strings.next()?;
        let wifi_ssid = strings.next()?;
        let wifi_password = strings.next()?;
        let agent_host = strings.next()?;
        let username = strings.next()?;
        let password = strings.next()?;
        if !strings.rest.is_empty() {
            return Err(ParseError::Malformed);
        }
        let config = Config {
            device,
            wifi_ssid,
            wifi_password,
            agent_host,
            agent_port: u16::from_le_bytes([header[8], header[9]]),
            username,
            password,
            sensor: SensorKind::from_code(header[5]).ok_or(ParseError::Invalid(Field::Sensor))?,
            sensor_address: (header[6] != 0).then_some(header[6]),
            sample_period_ms: u32::from_le_bytes([header[10], header[11], header[12], header[13]]),
        };
        config.validate().map_err(ParseError::Invalid)?;
        Ok(config)
    }
}

/// Length-prefixed strings, read one at a time.
struct Strings<'a> {
    rest: &'a [u8],
}

impl<'a> Strings<'a> {
    fn next(&mut self) -> Result<&'a str, ParseError> {
        let (&len, rest) = self.rest.split_first().ok_or(ParseError::Malformed)?;
        let bytes = rest.get(..usize::from(len)).ok_or(ParseError::Malformed)?;
        self.rest = &rest[usize::from(len)..];
        core::str::from_utf8(bytes).map_err(|_| ParseError::Malformed)
    }
}

/// WPA2-PSK: a passphrase of 8..=63 printable ASCII characters, or the 256-bit key as 64
/// hex digits; empty means an open network.
fn valid_wifi_password(password: &str) -> bool {
    let printable = |b: u8| (0x20..=0x7E).contains(&b);
    match password.len() {
        0 => true,
        8..=63 => password.bytes().all(printable),
        64 => password.bytes().all(|b| b.is_ascii_hexdigit()),
        _ => false,
    }
}

fn valid_host(host: &str) -> bool {
    !host.is_empty()
        && host.len() <= MAX_HOST_LEN
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
        && !host.starts_with(['.', '-'])
}

/// A dotted-quad IPv4 address (`192.168.1.20`), or `None`.
pub fn parse_ipv4(host: &str) -> Option<[u8; 4]> {
    let mut octets = [0u8; 4];
    let mut parts = host.split('.');
    for octet in &mut octets {
        let part = parts.next()?;
        if part.is_empty() || part.len() > 3 || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        *octet = part.parse().ok()?;
    }
    parts.next().is_none().then_some(octets)
}

/// CRC-32 as in zlib and Ethernet (reflected, polynomial 0xEDB88320). Bitwise: the block
/// is read once per boot, so a table would only cost flash.
pub fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in bytes {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

#[cfg(test)]
mod tests;
