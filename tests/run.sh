#!/usr/bin/env bash
# fogline's one test command (the README and CI call it): formatting, lints, build,
# then every test, including the end-to-end tests that start the real binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# The end-to-end tests drive the agent with mosquitto_pub / mosquitto_sub.
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing mosquitto-clients"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients
fi

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The end-to-end tests run target/debug/fogline-agent: build it before testing.
cargo build --workspace --bins
cargo test --workspace
