//! The agent's config loader: the built-in defaults with any TOML text merged over them,
//! extracted and validated as `fogline-agent run --config` does; errors, never a panic.
#![no_main]

use figment::providers::{Format, Toml};
use figment::Figment;
use fogline_agent::ops::config::{Config, DEFAULTS};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let loaded: Result<Config, _> = Figment::from(Toml::string(DEFAULTS))
        .merge(Toml::string(text))
        .extract();
    if let Ok(config) = loaded {
        let _ = config.validate();
    }
});
