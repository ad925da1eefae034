#!/usr/bin/env bash
# Release builds of fogline's programs for aarch64-unknown-linux-gnu (Raspberry Pi 3/4/5
# with a 64-bit OS). See deploy/README.md.
#
#   deploy/build-aarch64.sh [--toolchain auto|debian|rustup] [--no-install] [PACKAGE...]
#
# PACKAGE: fogline-agent, fogline-gateway, fogline-sensor (default: all three; the sensor
# is skipped with a warning if it does not build, unless it was named explicitly).
#
# Toolchains:
#   rustup  `rustup target add aarch64-unknown-linux-gnu`, then rustup's cargo; output in
#           target/aarch64-unknown-linux-gnu/release/ (or $CARGO_TARGET_DIR).
#   debian  Debian's rustc-web/cargo-web (/usr/bin/cargo) with libstd-rust-web-dev:arm64,
#           installed with apt if missing; output in target/debian-cross/, a target dir
#           of its own so the two compilers never share artifacts.
#   auto    (default) rustup when it has or can add the target, otherwise debian.
# Both link with aarch64-linux-gnu-gcc (gcc-aarch64-linux-gnu, libc6-dev-arm64-cross).
#
# The binaries are copied to target/deploy/bin/arm64/ (whatever the toolchain), and their
# stripped sizes printed. --no-install never calls apt.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

toolchain="${FOGLINE_TOOLCHAIN:-auto}"
install=1
packages=()
explicit=0
while [ $# -gt 0 ]; do
    case "$1" in
        --toolchain) toolchain="${2:?--toolchain needs a value}"; shift 2 ;;
        --toolchain=*) toolchain="${1#*=}"; shift ;;
        --no-install) install=0; shift ;;
        -h | --help) usage 0 ;;
        -*) fl_warn "unknown option $1"; usage 2 ;;
        *) packages+=("$1"); explicit=1; shift ;;
    esac
done
if [ "${#packages[@]}" -eq 0 ]; then
    packages=(fogline-agent fogline-gateway fogline-sensor)
fi
for p in "${packages[@]}"; do
    case "$p" in
        fogline-agent | fogline-gateway | fogline-sensor) ;;
        *) fl_die "unknown package $p (fogline-agent, fogline-gateway, fogline-sensor)" ;;
    esac
done

cd "$FL_ROOT"
triple="$FL_TRIPLE_AARCH64"
linker_pkgs=(gcc-aarch64-linux-gnu libc6-dev-arm64-cross)

rustup_has_target() {
    command -v rustup >/dev/null 2>&1 &&
        rustup target list --installed 2>/dev/null | grep -qx "$triple"
}

rustup_add_target() {
    command -v rustup >/dev/null 2>&1 || return 1
    rustup_has_target && return 0
    fl_log "rustup target add $triple"
    # Offline machines may hang on the download: bound it.
    timeout 180 rustup target add "$triple"
}

case "$toolchain" in
    auto)
        if rustup_add_target; then
            toolchain=rustup
        else
            fl_log "no rustup target for $triple: using Debian's toolchain"
            toolchain=debian
        fi
        ;;
    rustup) rustup_add_target || fl_die "rustup cannot add $triple (try --toolchain debian)" ;;
    debian) ;;
    *) fl_die "--toolchain must be auto, debian or rustup" ;;
esac

export CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
if [ "$toolchain" = debian ]; then
    if [ "$install" -eq 1 ]; then
        fl_apt_ensure rustc-web cargo-web "libstd-rust-web-dev:arm64" "${linker_pkgs[@]}"
    fi
    if [ ! -x /usr/bin/cargo ] || [ ! -x /usr/bin/rustc ]; then
        fl_die "Debian's cargo/rustc are missing (apt-get install rustc-web cargo-web)"
    fi
    cargo_cmd=(/usr/bin/cargo)
    export RUSTC=/usr/bin/rustc
    export CARGO_TARGET_DIR="$FL_DEBIAN_TARGET_DIR"
    out_dir="$FL_DEBIAN_TARGET_DIR/$triple/release"
else
    if [ "$install" -eq 1 ]; then
        fl_apt_ensure "${linker_pkgs[@]}"
    fi
    cargo_cmd=(cargo)
    out_dir="${CARGO_TARGET_DIR:-$FL_ROOT/target}/$triple/release"
fi
command -v aarch64-linux-gnu-gcc >/dev/null 2>&1 ||
    fl_die "aarch64-linux-gnu-gcc is missing (apt-get install ${linker_pkgs[*]})"
fl_log "toolchain: $toolchain ($("${cargo_cmd[@]}" --version), $(${RUSTC:-rustc} --version))"

required=()
optional=()
for p in "${packages[@]}"; do
    if [ "$p" = fogline-sensor ] && [ "$explicit" -eq 0 ]; then
        optional+=("$p")
    else
        required+=("$p")
    fi
done

build() {
    local args=() p
    for p in "$@"; do args+=(-p "$p"); done
    fl_log "cargo build --release --target $triple ${args[*]}"
    "${cargo_cmd[@]}" build --locked --release --target "$triple" "${args[@]}"
}

# One cargo run for everything (features unify once, dependencies build once). If the
# optional sensor is what breaks it, build the rest without it.
in_workspace() { grep -q "name = \"$1\"" firmware/sensor/Cargo.toml 2>/dev/null; }
built=()
wanted=()
for p in "${optional[@]}"; do
    if in_workspace "$p"; then
        wanted+=("$p")
    else
        fl_warn "$p is not in the workspace yet: skipped"
    fi
done
if [ "${#wanted[@]}" -gt 0 ] && build "${required[@]}" "${wanted[@]}"; then
    built=("${required[@]}" "${wanted[@]}")
else
    if [ "${#wanted[@]}" -gt 0 ]; then
        fl_warn "the build with ${wanted[*]} failed: building without it (name it explicitly to make this fatal)"
    fi
    if [ "${#required[@]}" -gt 0 ]; then
        build "${required[@]}"
        built=("${required[@]}")
    fi
fi
[ "${#built[@]}" -gt 0 ] || fl_die "nothing was built"

dest="$FL_ROOT/target/deploy/bin/arm64"
mkdir -p "$dest"
strip_tool=aarch64-linux-gnu-strip
command -v "$strip_tool" >/dev/null 2>&1 || strip_tool=""
tmp="$(mktemp)"
trap 'rm -f "$tmp"' EXIT
for p in "${built[@]}"; do
    bin="$out_dir/$p"
    [ -f "$bin" ] || fl_die "$bin was not produced"
    [ "$(fl_elf_machine "$bin")" = aarch64 ] || fl_die "$bin is not an aarch64 binary"
    cp "$bin" "$dest/$p"
    size="$(stat -c %s "$bin")"
    stripped="$size"
    if [ -n "$strip_tool" ]; then
        "$strip_tool" -o "$tmp" "$bin"
        stripped="$(stat -c %s "$tmp")"
    fi
    awk -v p="$p" -v s="$size" -v t="$stripped" 'BEGIN {
        printf "size %-16s aarch64 release: %d bytes, stripped: %d bytes (%.2f MiB)\n", p, s, t, t / 1048576
    }'
done
fl_log "binaries in ${dest#"$FL_ROOT"/} (built in ${out_dir#"$FL_ROOT"/})"
