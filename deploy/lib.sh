# Shared helpers for the deploy/ scripts. Source it; it does nothing on its own.
# shellcheck shell=bash

# shellcheck disable=SC2034 # used by the scripts that source this file
FL_TRIPLE_AARCH64="aarch64-unknown-linux-gnu"
# The workspace root (deploy/..), whatever the caller's working directory.
FL_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# Where Debian's compiler keeps its aarch64 build: never shared with rustup's compiler.
FL_DEBIAN_TARGET_DIR="${FL_DEBIAN_TARGET_DIR:-$FL_ROOT/target/debian-cross}"

fl_log() { printf '==> %s\n' "$*" >&2; }
fl_warn() { printf 'warning: %s\n' "$*" >&2; }
fl_die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Run a command as root: directly when we are root, otherwise through sudo.
fl_as_root() {
    if [ "$(id -u)" -eq 0 ]; then
        "$@"
    else
        sudo "$@"
    fi
}

fl_pkg_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [ "$status" = "install ok installed" ]
}

# fl_apt_ensure PKG... — install the Debian packages that are missing (PKG may be
# "name:arch"; a foreign architecture is added first). Does nothing when all are there.
fl_apt_ensure() {
    local missing=() pkg arch
    for pkg in "$@"; do
        case "$pkg" in
            *:*)
                arch="${pkg#*:}"
                if [ "$arch" != "$(dpkg --print-architecture)" ] &&
                    ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
                    fl_log "adding dpkg architecture $arch"
                    fl_as_root dpkg --add-architecture "$arch"
                fi
                ;;
        esac
        fl_pkg_installed "$pkg" || missing+=("$pkg")
    done
    if [ "${#missing[@]}" -eq 0 ]; then
        return 0
    fi
    fl_log "installing ${missing[*]}"
    # Wait for another apt/dpkg run (a parallel CI step) instead of failing on its lock.
    local apt_opts=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3)
    fl_as_root apt-get "${apt_opts[@]}" update -qq
    fl_as_root env DEBIAN_FRONTEND=noninteractive apt-get "${apt_opts[@]}" install -y -qq \
        --no-install-recommends "${missing[@]}"
}

# The ELF machine of a file: aarch64, x86_64 or "unknown" (reads e_machine, no `file`).
fl_elf_machine() {
    local magic machine
    magic="$(od -An -tx1 -N4 "$1" | tr -d ' \n')"
    [ "$magic" = "7f454c46" ] || {
        echo "not-elf"
        return 0
    }
    machine="$(od -An -tu2 -j18 -N2 "$1" | tr -d ' \n')"
    case "$machine" in
        183) echo aarch64 ;;
        62) echo x86_64 ;;
        *) echo "unknown($machine)" ;;
    esac
}

# Debian architecture name of an ELF binary.
fl_deb_arch_of() {
    case "$(fl_elf_machine "$1")" in
        aarch64) echo arm64 ;;
        x86_64) echo amd64 ;;
        *) fl_die "$1: not an aarch64 or x86_64 ELF binary" ;;
    esac
}

# The workspace version (from [workspace.package]).
fl_workspace_version() {
    awk '
        /^\[/ { in_ws = ($0 == "[workspace.package]") }
        in_ws && /^version *=/ { gsub(/.*= *"|".*/, ""); print; exit }
    ' "$FL_ROOT/Cargo.toml"
}

# fl_qemu_aarch64: sets FL_QEMU to the command that runs an aarch64 Linux binary here
# under qemu user emulation, or returns 1 when this machine cannot.
# With Debian's multiarch libc6:arm64 (installed with libstd-rust-web-dev:arm64), its
# loader /lib/ld-linux-aarch64.so.1 runs the binary as on a device. Otherwise the cross
# libc (libc6-arm64-cross) serves, with LD_LIBRARY_PATH so that loader and libc come from
# the same build: `qemu -L /usr/aarch64-linux-gnu` alone takes the cross loader but the
# multiarch libc when both are installed, and that mix (2.36-8 and 2.36-9+deb12u14 on
# Debian 12) hangs at the program's first thread.
fl_qemu_aarch64() {
    FL_QEMU=()
    command -v qemu-aarch64-static >/dev/null 2>&1 || return 1
    if [ -e /lib/ld-linux-aarch64.so.1 ] && [ -e /lib/aarch64-linux-gnu/libc.so.6 ]; then
        FL_QEMU=(qemu-aarch64-static)
    elif [ -d /usr/aarch64-linux-gnu/lib ]; then
        FL_QEMU=(qemu-aarch64-static -L /usr/aarch64-linux-gnu
            -E LD_LIBRARY_PATH=/usr/aarch64-linux-gnu/lib)
    else
        return 1
    fi
}
