//! fogline's sensor-side library (`no_std`, no alloc).
//!
//! - [`wire`]: the sensor → agent frame and the agent's ack, the one codec everybody uses.
#![no_std]
#![deny(unsafe_code)]

#[cfg(any(test, feature = "std"))]
extern crate std;

pub mod wire;
