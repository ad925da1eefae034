//! What the Pico W's LED says. The LED hangs off the Wi-Fi chip (its GPIO 0), so the glue
//! sets it through the CYW43439 driver; what it should show at a given moment is decided
//! here, as a pure function of the device's state and the time.
//!
//! | state | pattern |
//! |---|---|
//! | [`LedState::NotProvisioned`] | three short blinks, then dark (every 2 s) |
//! | [`LedState::JoiningWifi`] | fast blink, 5 per second |
//! | [`LedState::ConnectingToAgent`] | slow blink, once a second |
//! | [`LedState::Online`] | steady on |
//! | [`LedState::SensorFault`] | on, with two short dark gaps every 2 s (online, but the last reading failed) |

/// The device's state as the LED shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LedState {
    /// No valid configuration block: run `fogline-sensor provision`.
    NotProvisioned,
    /// Looking for, or joining, the Wi-Fi network (or waiting for DHCP).
    JoiningWifi,
    /// On the network, connecting to the agent (TCP, MQTT CONNECT, subscribe).
    ConnectingToAgent,
    /// Connected to the agent and subscribed to the ack topic.
    Online,
    /// Connected, but the sensor did not answer the last time it was read.
    SensorFault,
}

impl LedState {
    /// Every state, for the glue's encoding into an atomic byte.
    pub const ALL: [LedState; 5] = [
        LedState::NotProvisioned,
        LedState::JoiningWifi,
        LedState::ConnectingToAgent,
        LedState::Online,
        LedState::SensorFault,
    ];

    /// A byte for the state (its index in [`LedState::ALL`]).
    pub fn code(self) -> u8 {
        LedState::ALL
            .iter()
            .position(|&s| s == self)
            .map_or(0, |i| i as u8)
    }

    /// The state stored as `code`; unknown codes read as [`LedState::JoiningWifi`].
    pub fn from_code(code: u8) -> LedState {
        LedState::ALL
            .get(usize::from(code))
            .copied()
            .unwrap_or(LedState::JoiningWifi)
    }

    /// The pattern: (period, on-intervals within it as `[start, end)` ms).
    fn pattern(self) -> (u64, &'static [(u64, u64)]) {
        match self {
            LedState::NotProvisioned => (2_000, &[(0, 100), (300, 400), (600, 700)]),
            LedState::JoiningWifi => (200, &[(0, 100)]),
            LedState::ConnectingToAgent => (1_000, &[(0, 500)]),
            LedState::Online => (1_000, &[(0, 1_000)]),
            LedState::SensorFault => (2_000, &[(0, 1_600), (1_700, 1_800), (1_900, 2_000)]),
        }
    }
}

/// Whether the LED is lit at `now_ms` in `state`.
pub fn is_on(state: LedState, now_ms: u64) -> bool {
    let (period, on) = state.pattern();
    let t = now_ms % period;
    on.iter().any(|&(start, end)| (start..end).contains(&t))
}

/// When the LED next changes in `state` after `now_ms` (the glue sleeps until then, or
/// until the state changes). Steady patterns report the end of their period.
pub fn next_change(state: LedState, now_ms: u64) -> u64 {
    let (period, on) = state.pattern();
    let base = now_ms - now_ms % period;
    let t = now_ms % period;
    let lit = is_on(state, now_ms);
    on.iter()
        .flat_map(|&(start, end)| [start, end])
        .filter(|&edge| edge > t && edge < period)
        .find(|&edge| is_on(state, base + edge) != lit)
        .map_or(base + period, |edge| base + edge)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The pattern over one period, sampled every 100 ms: '#' lit, '.' dark.
    fn strip(state: LedState, period: u64) -> std::string::String {
        (0..period / 100)
            .map(|i| if is_on(state, i * 100 + 50) { '#' } else { '.' })
            .collect()
    }

    #[test]
    fn each_state_has_its_documented_pattern() {
        let table = [
            (LedState::NotProvisioned, 2_000, "#..#..#............."),
            (LedState::JoiningWifi, 1_000, "#.#.#.#.#."),
            (LedState::ConnectingToAgent, 2_000, "#####.....#####....."),
            (LedState::Online, 2_000, "####################"),
            (LedState::SensorFault, 2_000, "################.#.#"),
        ];
        for (state, period, want) in table {
            assert_eq!(strip(state, period), want, "{state:?}");
        }
    }

    #[test]
    fn patterns_repeat_and_do_not_depend_on_uptime() {
        for state in LedState::ALL {
            for t in [0u64, 150, 999, 1_234] {
                assert_eq!(
                    is_on(state, t),
                    is_on(state, t + 3_600_000),
                    "{state:?} {t}"
                );
            }
        }
    }

    #[test]
    fn next_change_is_the_next_edge() {
        let table = [
            (LedState::ConnectingToAgent, 0, 500),
            (LedState::ConnectingToAgent, 499, 500),
            (LedState::ConnectingToAgent, 500, 1_000),
            (LedState::ConnectingToAgent, 10_700, 11_000),
            (LedState::NotProvisioned, 50, 100),
            (LedState::NotProvisioned, 150, 300),
            (LedState::NotProvisioned, 800, 2_000),
            (LedState::JoiningWifi, 120, 200),
            (LedState::Online, 1_500, 2_000),
            (LedState::SensorFault, 100, 1_600),
            (LedState::SensorFault, 1_650, 1_700),
        ];
        for (state, now, want) in table {
            assert_eq!(next_change(state, now), want, "{state:?} at {now}");
            let lit = is_on(state, now);
            if state != LedState::Online {
                assert_ne!(is_on(state, want), lit, "{state:?} changes at {want}");
            }
        }
    }

    #[test]
    fn states_survive_their_byte_encoding() {
        for state in LedState::ALL {
            assert_eq!(LedState::from_code(state.code()), state);
        }
        assert_eq!(LedState::from_code(200), LedState::JoiningWifi);
    }
}
