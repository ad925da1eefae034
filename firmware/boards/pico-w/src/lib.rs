//! The Raspberry Pi Pico W sensor image's logic, apart from the hardware.
//!
//! The image (`main.rs`) is embassy glue: it brings up the RP2040, the CYW43439 Wi-Fi chip,
//! embassy-net and I2C, and hands them to [`session::run`] through small traits. Everything
//! that decides something lives here and is tested on the host with fakes:
//!
//! - [`session`]: the device loop — sample on schedule, connect, subscribe to the ack
//!   topic, publish through the [`outbox`], feed acks to the node, reconnect with
//!   [`backoff`] while the ring keeps readings. Generic over [`session::Connector`] (Wi-Fi,
//!   TCP and MQTT), [`session::Clock`] and [`session::Indicator`] (the LED).
//! - [`outbox`]: the node's [`fogline_firmware::node::Publisher`] over an async MQTT
//!   client: the node's synchronous flush fills a few frames, the session sends them.
//! - [`mqtt`]: [`session::MqttConn`] for minimq over any embedded-io-async transport.
//! - [`backoff`]: reconnect delays (sans-io).
//! - [`boot_id`]: a boot id from the ROSC's random bits.
//! - [`led`]: what the LED shows, as a pure function of state and time.
//! - [`sensors`]: the configured sensor behind one type.
//! - [`config`]: the configuration block (the `fogline-pico-config` crate, shared with
//!   `fogline-sensor provision`).
#![no_std]
#![deny(unsafe_code)]

#[cfg(test)]
extern crate std;

pub use fogline_pico_config as config;

pub mod backoff;
pub mod boot_id;
pub mod led;
pub mod mqtt;
pub mod outbox;
pub mod sensors;
pub mod session;

#[cfg(test)]
mod testing;
