//! `[limits]`: per-device publish rate and the number of devices, enforced at ingest
//! (the payload size is `ingest.max_payload_bytes`, connections `mqtt.max_connections`).
//!
//! A pure core stepped with the caller's clock, so it is tested without time passing.
//! Refused readings are counted as `fogline_ingest_rejected_total{reason="rate_limited"}`
//! or `{reason="too_many_devices"}`; they never reach the queue, so one flooding device
//! costs the others nothing but the parse.

use std::collections::HashMap;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::ingest::Reject;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Sustained readings per second per device; 0: no limit.
    pub device_rate: f64,
    /// Readings a device may send at once above the rate (a reconnect's backlog).
    pub device_burst: u32,
    /// Devices the agent accepts readings from (since start); 0: no limit.
    pub max_devices: usize,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            device_rate: 0.0,
            device_burst: 1000,
            max_devices: 0,
        }
    }
}

impl LimitsConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.device_rate >= 0.0 && self.device_rate.is_finite()) {
            return Err(format!(
                "limits.device_rate = {} must be >= 0",
                self.device_rate
            ));
        }
        if self.device_rate > 0.0 && self.device_burst == 0 {
            return Err("limits.device_burst must be at least 1 with a device_rate".into());
        }
        Ok(())
    }
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Per-device token buckets and the set of devices seen.
pub struct Limiter {
    config: LimitsConfig,
    devices: HashMap<String, Bucket>,
}

impl Limiter {
    pub fn new(config: LimitsConfig) -> Limiter {
        Limiter {
            config,
            devices: HashMap::new(),
        }
    }

    /// May `device` have one more reading accepted at `now`?
    pub fn admit(&mut self, device: &str, now: Instant) -> Result<(), Reject> {
        let c = &self.config;
        if c.device_rate <= 0.0 && c.max_devices == 0 {
            // No limits: keep no per-device state either.
            return Ok(());
        }
        let burst = f64::from(c.device_burst.max(1));
        let bucket = match self.devices.get_mut(device) {
            Some(b) => b,
            None => {
                if c.max_devices > 0 && self.devices.len() >= c.max_devices {
                    return Err(Reject::TooManyDevices);
                }
                self.devices.entry(device.to_owned()).or_insert(Bucket {
                    tokens: burst,
                    at: now,
                })
            }
        };
        if c.device_rate <= 0.0 {
            return Ok(());
        }
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * c.device_rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Reject::RateLimited)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_flooding_device_is_held_to_its_rate_and_others_are_not_affected() {
        let mut l = Limiter::new(LimitsConfig {
            device_rate: 10.0,
            device_burst: 5,
            max_devices: 0,
        });
        let t0 = Instant::now();
        let ok = (0..100).filter(|_| l.admit("flood", t0).is_ok()).count();
        assert_eq!(ok, 5);
        assert_eq!(l.admit("flood", t0), Err(Reject::RateLimited));
        assert_eq!(l.admit("calm", t0), Ok(()));
        assert_eq!(l.admit("flood", t0 + Duration::from_millis(100)), Ok(()));
        assert_eq!(
            l.admit("flood", t0 + Duration::from_millis(100)),
            Err(Reject::RateLimited)
        );
    }

    #[test]
    fn devices_beyond_the_cap_are_refused_and_known_ones_keep_going() {
        let mut l = Limiter::new(LimitsConfig {
            max_devices: 2,
            ..Default::default()
        });
        let t = Instant::now();
        assert_eq!(l.admit("a", t), Ok(()));
        assert_eq!(l.admit("b", t), Ok(()));
        assert_eq!(l.admit("c", t), Err(Reject::TooManyDevices));
        assert_eq!(l.admit("a", t), Ok(()));
    }
}
