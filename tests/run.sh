#!/usr/bin/env bash
# fogline's one test command (the README and CI call it): formatting, lints, build,
# then every test, including the end-to-end tests that start the real binaries.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

started=$(date +%s)
step() { printf '\n== [%dm%02ds] %s\n' $(( ($(date +%s) - started) / 60 )) $(( ($(date +%s) - started) % 60 )) "$*"; }

# The end-to-end tests drive the agent with mosquitto_pub / mosquitto_sub.
if ! command -v mosquitto_pub >/dev/null 2>&1 || ! command -v mosquitto_sub >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing mosquitto-clients"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends mosquitto-clients
fi

# The gateway's history API is queried with curl.
if ! command -v curl >/dev/null 2>&1; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing curl"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends curl ca-certificates
fi

# The gateway's PostgreSQL store is tested against a real server (tests/src/postgres.rs
# runs initdb and postgres from here, in temp dirs, on free ports).
if [ ! -x /usr/lib/postgresql/15/bin/initdb ] || [ ! -x /usr/lib/postgresql/15/bin/postgres ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing postgresql-15"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends postgresql-15
fi

# The broker conformance suite (tests/conformance) drives the broker with Eclipse Paho.
PAHO_STATUS="$(dpkg-query -W -f='${Status}' python3-paho-mqtt 2>/dev/null || true)"
if [ "$PAHO_STATUS" != "install ok installed" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing python3-paho-mqtt"
    $SUDO apt-get update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-paho-mqtt
fi

# The no_std firmware is also built for a Cortex-M4F (thumbv7em-none-eabihf). rustup here
# has the host target only, so that build uses Debian's Rust and build-std
# (../shared/TOOLCHAIN.md); install it if any part is missing.
THUMB_PKGS="rustc-web cargo-web rust-web-src"
THUMB_MISSING=""
for pkg in $THUMB_PKGS; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "install ok installed" ]; then
        THUMB_MISSING="$THUMB_MISSING $pkg"
    fi
done
if [ -n "$THUMB_MISSING" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing$THUMB_MISSING"
    $SUDO apt-get update
    # shellcheck disable=SC2086 # one word per package
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $THUMB_MISSING
fi

# The fault lab (tests/tests/faultlab.rs) mounts FUSE filesystems (fusermount3 from fuse3
# when not root) and builds network namespaces with nftables rules (nft, ip).
FAULT_PKGS="fuse3 nftables iproute2"
FAULT_MISSING=""
for pkg in $FAULT_PKGS; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "install ok installed" ]; then
        FAULT_MISSING="$FAULT_MISSING $pkg"
    fi
done
if [ -n "$FAULT_MISSING" ]; then
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    echo "installing$FAULT_MISSING"
    $SUDO apt-get update
    # shellcheck disable=SC2086 # one word per package
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $FAULT_MISSING
fi

step "cargo fmt --check"
cargo fmt --all -- --check
step "cargo clippy -D warnings"
cargo clippy --workspace --all-targets -- -D warnings
# The module docs are the map a newcomer reads: no broken or private links in them.
step "cargo doc -D warnings"
RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p fogline-agent -p fogline-gateway \
    -p fogline-cluster -p fogline-firmware
# The end-to-end tests run target/debug/fogline-agent: build it before testing.
step "cargo build"
cargo build --workspace --bins
# The firmware library must build for a microcontroller: no std, no alloc. Debian's
# compiler gets its own target dir so the two compilers never share artifacts;
# RUSTC_BOOTSTRAP only unlocks -Zbuild-std for this check, the firmware uses no unstable
# features.
step "firmware for thumbv7em-none-eabihf"
RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc /usr/bin/cargo build -Zbuild-std=core \
    --target thumbv7em-none-eabihf --release -p fogline-firmware --target-dir target/thumbv7em
# The Raspberry Pi Pico W image (thumbv6m-none-eabi, embassy): a workspace of its own with
# its own Cargo.lock. Its logic is tested on the host; build.sh installs what it needs,
# builds the image, checks it against the RP2040's flash and RAM and makes the UF2.
step "Pico W firmware: fmt, clippy, host tests"
cargo fmt --manifest-path firmware/boards/pico-w/Cargo.toml -- --check
cargo clippy --manifest-path firmware/boards/pico-w/Cargo.toml --all-targets -- -D warnings
cargo test --manifest-path firmware/boards/pico-w/Cargo.toml
step "Pico W firmware image (thumbv6m-none-eabi)"
bash firmware/boards/pico-w/build.sh
step "cargo test"
cargo test --workspace
# Power cuts on a filesystem that loses unsynced writes, and real partitions in network
# namespaces (root only: under CI=true a test that cannot run fails; elsewhere it says
# SKIPPED, listed again here). Not part of `cargo test --workspace`: it runs once, one
# test at a time, with its output shown. `target/debug/faultlab` runs the long version.
step "fault lab (power cuts, partitions)"
rm -f target/faultlab-skipped.txt
cargo clippy -p fogline-tests --test faultlab -- -D warnings
cargo test -p fogline-tests --test faultlab -- --nocapture --test-threads=1
if [ -s target/faultlab-skipped.txt ]; then
    echo "fault lab tests SKIPPED (they need root):"
    cat target/faultlab-skipped.txt
fi
# Each fuzz target for a short bounded time (FOGLINE_FUZZ_SECS per target, 0 skips):
# installs cargo-fuzz from crates.io if missing; see docs/agent.md, "Fuzzing".
# Built without optimizations here (quick to build; the long runs use the default -O).
if [ "${FOGLINE_FUZZ_SECS:-20}" -gt 0 ]; then
    step "fuzzing"
    FOGLINE_FUZZ_DEV="${FOGLINE_FUZZ_DEV:-1}" bash tests/fuzz/run.sh "${FOGLINE_FUZZ_SECS:-20}"
fi
step "deploy/ci.sh"
bash deploy/ci.sh # aarch64 build + qemu smoke test, .deb checks, install into a throwaway root
step "all checks passed"
