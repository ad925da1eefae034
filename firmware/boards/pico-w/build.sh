#!/usr/bin/env bash
# Builds the Raspberry Pi Pico W image (thumbv6m-none-eabi) and its UF2 file, checks the
# image against the RP2040's flash and RAM, and prints the UF2's path as its last line.
#
# Idempotent: installs what is missing (Debian's Rust with its library source for
# -Zbuild-std, lld as the linker, llvm for llvm-size, elf2uf2-rs from crates.io) and
# rebuilds only what changed. Runs as root (CI) or with sudo.
#
# Why Debian's Rust: rustup here has no thumbv6m target to download. Debian's rustc-web
# builds `core` for the target from rust-web-src (-Zbuild-std, unlocked for this build by
# RUSTC_BOOTSTRAP=1; the firmware itself uses no unstable features). With rustup and
# internet the usual way works too:
#   rustup target add thumbv6m-none-eabi
#   cargo build --release --target thumbv6m-none-eabi   (in this directory)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

TARGET=thumbv6m-none-eabi
TARGET_DIR="target"
ELF="$TARGET_DIR/$TARGET/release/fogline-pico-w"
UF2="$ELF.uf2"
# The RP2040: 2 MiB of flash, of which the last 4 KiB sector is the configuration block
# and the first 256 bytes the second-stage boot loader; 264 KiB of SRAM.
FLASH_BUDGET=$((2 * 1024 * 1024 - 4096))
RAM_BUDGET=$((264 * 1024))

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

missing=""
for pkg in rustc-web cargo-web rust-web-src lld llvm; do
    status="$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)"
    if [ "$status" != "install ok installed" ]; then missing="$missing $pkg"; fi
done
if [ -n "$missing" ]; then
    echo "installing$missing" >&2
    $SUDO apt-get update >&2
    # shellcheck disable=SC2086 # one word per package
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends $missing >&2
fi

# elf2uf2-rs turns the ELF into the UF2 the Pico's boot ROM takes; without its default
# `serial` feature it needs no libudev.
if ! command -v elf2uf2-rs >/dev/null 2>&1; then
    echo "installing elf2uf2-rs" >&2
    cargo install --locked --no-default-features elf2uf2-rs --version 2.2.0 >&2
fi

started=$(date +%s)
# Debian's compiler, its own target dir (never shared with rustup's artifacts), lld as
# the linker (rustup's rust-lld is not part of Debian's package).
RUSTC_BOOTSTRAP=1 RUSTC=/usr/bin/rustc CARGO_TARGET_THUMBV6M_NONE_EABI_LINKER=ld.lld \
    /usr/bin/cargo build --locked -Zbuild-std=core --target "$TARGET" --release \
    --target-dir "$TARGET_DIR" >&2
echo "built in $(( $(date +%s) - started ))s" >&2

# Flash holds .vector_table, .text, .rodata and the initial values of .data; RAM holds
# .data, .bss and .uninit (the stack grows down from the top of RAM, in what is left).
read -r flash ram < <(llvm-size -A "$ELF" | awk '
    $1 == ".boot2" || $1 == ".vector_table" || $1 == ".text" || $1 == ".rodata" { flash += $2 }
    $1 == ".data" { flash += $2; ram += $2 }
    $1 == ".bss" || $1 == ".uninit" { ram += $2 }
    END { print flash + 0, ram + 0 }')
awk -v f="$flash" -v r="$ram" -v fb="$FLASH_BUDGET" -v rb="$RAM_BUDGET" 'BEGIN {
    printf "flash: %d bytes (%.1f KiB) of %d KiB (%.1f%%)\n", f, f / 1024, fb / 1024, 100 * f / fb
    printf "RAM:   %d bytes (%.1f KiB) of %d KiB (%.1f%%), static; the rest is stack\n", r, r / 1024, rb / 1024, 100 * r / rb
}' >&2
if [ "$flash" -gt "$FLASH_BUDGET" ] || [ "$ram" -gt "$RAM_BUDGET" ]; then
    echo "error: the image does not fit the RP2040" >&2
    exit 1
fi

elf2uf2-rs "$ELF" "$UF2" >&2
echo "uf2: $(stat -c %s "$UF2") bytes" >&2
realpath "$UF2"
