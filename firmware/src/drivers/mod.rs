//! embedded-hal 1.0 drivers for the sensors people wire to Raspberry Pis and
//! microcontrollers, each behind [`crate::sensor::Sensor`].
//!
//! All follow one shape: `new(bus)` (no bus traffic) and `new_with_address`, `destroy()`
//! that gives the bus back, an `Error<E>` generic over the bus error, and tests that
//! replay the datasheet's bus transactions with `embedded-hal-mock`, including corrupted
//! data and bus errors.
//!
//! | module | sensor | written or wrapped |
//! |---|---|---|
//! | [`sht3x`] | Sensirion SHT30/31/35 | written, on Sensirion's `sensirion-i2c` helpers |
//! | [`sht4x`] (feature `sht4x`) | Sensirion SHT40/41/45 | wraps the `sht4x` crate |
//! | [`bme280`] | Bosch BME280 | written |
//!
//! Each module's documentation says why it was written or wrapped.

pub mod bme280;
pub mod sht3x;
#[cfg(feature = "sht4x")]
pub mod sht4x;
