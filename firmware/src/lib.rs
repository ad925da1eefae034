//! fogline's sensor-side library (`no_std`, no alloc): everything a sensor node needs to
//! deliver readings to an agent exactly once, on a microcontroller or a Linux board.
//!
//! - [`wire`]: the sensor → agent frame and the agent's ack, the one codec everybody uses.
//! - [`sensor`]: the [`sensor::Sensor`] trait the node loop samples through.
//! - [`drivers`]: embedded-hal 1.0 drivers (SHT3x, SHT4x, BME280) behind that trait.
//! - [`node`]: the node loop — schedule, sequence numbers, the ring of unacked readings,
//!   publish, ack watermark, re-send after reconnect. Pure logic: the caller passes the
//!   time and a [`node::Publisher`], so it runs the same on a board, in the simulator
//!   (`fogline-sensor`) and in unit tests.
#![no_std]
#![deny(unsafe_code)]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod drivers;
pub mod node;
pub mod sensor;
pub mod wire;
