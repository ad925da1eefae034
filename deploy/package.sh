#!/usr/bin/env bash
# Builds the .deb of fogline-agent and/or fogline-gateway from a release binary.
#
#   deploy/package.sh --arch arm64|amd64 [--bin-dir DIR] [--out DIR] [--version V] agent|gateway...
#
# --bin-dir: where the release binaries are. Default for arm64: target/deploy/bin/arm64
#            (deploy/build-aarch64.sh puts them there); for amd64: target/release
#            (`cargo build --release -p fogline-agent -p fogline-gateway`).
# --out:     where the packages go (default target/deploy/deb).
# --version: package version (default: the workspace version).
#
# Each package holds the binary (/usr/bin), the config (/etc/fogline/<name>.toml, a
# conffile), the systemd unit (/lib/systemd/system), a sysusers.d entry for the `fogline`
# system user, the full commented defaults, and maintainer scripts that create the user
# and the state directory /var/lib/fogline/<name>. The maintainer scripts honour
# DPKG_ROOT, so `dpkg --root DIR --force-script-chrootless` installs into a directory tree
# (deploy/install.sh --root). Only dpkg-deb is needed: no debhelper.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

arch=""
bin_dir=""
out_dir="$FL_ROOT/target/deploy/deb"
version="$(fl_workspace_version)"
components=()
while [ $# -gt 0 ]; do
    case "$1" in
        --arch) arch="${2:?}"; shift 2 ;;
        --bin-dir) bin_dir="${2:?}"; shift 2 ;;
        --out) out_dir="${2:?}"; shift 2 ;;
        --version) version="${2:?}"; shift 2 ;;
        -h | --help) usage 0 ;;
        -*) fl_warn "unknown option $1"; usage 2 ;;
        *) components+=("$1"); shift ;;
    esac
done
case "$arch" in
    arm64) bin_dir="${bin_dir:-$FL_ROOT/target/deploy/bin/arm64}" ;;
    amd64) bin_dir="${bin_dir:-$FL_ROOT/target/release}" ;;
    *) fl_die "--arch arm64 or --arch amd64 is required" ;;
esac
[ "${#components[@]}" -gt 0 ] || fl_die "name agent and/or gateway"
[[ "$version" =~ ^[0-9][A-Za-z0-9.+~-]*$ ]] || fl_die "bad version: $version"
command -v dpkg-deb >/dev/null 2>&1 || fl_die "dpkg-deb is missing"
command -v readelf >/dev/null 2>&1 || fl_die "readelf is missing (apt-get install binutils)"

# Reproducible archives: file dates from the last commit unless the caller chose one.
if [ -z "${SOURCE_DATE_EPOCH:-}" ]; then
    SOURCE_DATE_EPOCH="$(git -C "$FL_ROOT" log -1 --format=%ct 2>/dev/null || date +%s)"
fi
export SOURCE_DATE_EPOCH

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

# The Depends of a dynamically linked binary: the libraries it needs (libc6, libgcc-s1)
# at the newest glibc symbol version it uses, like dpkg-shlibdeps would find.
shlib_depends() {
    local bin="$1" lib deps=() glibc
    while read -r lib; do
        case "$lib" in
            libc.so.6 | libm.so.6 | libdl.so.2 | libpthread.so.0 | librt.so.1 | ld-linux*) ;;
            libgcc_s.so.1) deps+=("libgcc-s1 (>= 4.2)") ;;
            *) fl_die "$bin needs $lib: add its package to the Depends in deploy/package.sh" ;;
        esac
    done < <(readelf -d "$bin" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p')
    glibc="$(readelf -W --version-info "$bin" | grep -o 'GLIBC_[0-9][0-9.]*' |
        sed 's/GLIBC_//' | sort -t. -k1,1n -k2,2n -k3,3n -u | tail -n 1)"
    [ -n "$glibc" ] || fl_die "$bin: no glibc symbol versions found"
    printf 'libc6 (>= %s)' "$glibc"
    for lib in "${deps[@]}"; do printf ', %s' "$lib"; done
    printf '\n'
}

write_scripts() {
    local debian="$1" name="$2"
    local svc="fogline-$name.service" state="/var/lib/fogline/$name"

    cat >"$debian/postinst" <<EOF
#!/bin/sh
# fogline-$name postinst: the system user, the state directory, systemd.
# Everything below is relative to DPKG_ROOT, so "dpkg --root DIR
# --force-script-chrootless" installs into DIR without touching the running system.
set -e
root="\${DPKG_ROOT:-}"

if [ "\$1" = configure ]; then
    if ! grep -q '^fogline:' "\$root/etc/passwd" 2>/dev/null; then
        if command -v systemd-sysusers >/dev/null 2>&1; then
            systemd-sysusers \${root:+--root="\$root"} fogline-$name.conf
        else
            useradd \${root:+--prefix "\$root"} --system --user-group --no-create-home \\
                --home-dir /var/lib/fogline --shell /usr/sbin/nologin \\
                --comment "fogline services" fogline
        fi
    fi
    uid="\$(awk -F: '\$1 == "fogline" { print \$3 }' "\$root/etc/passwd")"
    gid="\$(awk -F: '\$1 == "fogline" { print \$3 }' "\$root/etc/group")"
    if [ -z "\$uid" ] || [ -z "\$gid" ]; then
        echo "fogline-$name: the fogline user or group is missing" >&2
        exit 1
    fi
    # The parent belongs to root; each service owns its own directory (systemd's
    # StateDirectory= does the same at start).
    install -d -m 0755 "\$root/var/lib/fogline"
    if [ ! -d "\$root$state" ]; then
        install -d -m 0750 -o "\$uid" -g "\$gid" "\$root$state"
    fi

    if [ -z "\$root" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
        # On upgrade, a running service moves to the new binary. A fresh install is
        # not started: the node's config comes first (deploy/install.sh enables it).
        if [ -n "\$2" ]; then
            systemctl try-restart $svc || true
        fi
    fi
fi
exit 0
EOF

    cat >"$debian/prerm" <<EOF
#!/bin/sh
# fogline-$name prerm: on removal, stop and disable the service.
set -e
root="\${DPKG_ROOT:-}"

if [ "\$1" = remove ]; then
    if [ -z "\$root" ] && [ -d /run/systemd/system ]; then
        systemctl stop $svc || true
    fi
    if command -v systemctl >/dev/null 2>&1; then
        systemctl \${root:+--root="\$root"} disable $svc >/dev/null 2>&1 || true
    fi
fi
exit 0
EOF

    cat >"$debian/postrm" <<EOF
#!/bin/sh
# fogline-$name postrm: purge deletes the state directory (the buffered data). The
# fogline user stays, as Debian does for system users (files may still belong to it).
set -e
root="\${DPKG_ROOT:-}"

case "\$1" in
    purge)
        rm -rf "\$root$state"
        rmdir "\$root/var/lib/fogline" 2>/dev/null || true
        ;;
esac
if [ "\$1" = remove ] || [ "\$1" = purge ]; then
    if [ -z "\$root" ] && [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
EOF
    chmod 0755 "$debian/postinst" "$debian/prerm" "$debian/postrm"
}

build_one() {
    local name="$1"
    local pkg="fogline-$name"
    local bin="$bin_dir/$pkg"
    [ -f "$bin" ] || fl_die "$bin is missing: build it first (see deploy/README.md)"
    local bin_arch
    bin_arch="$(fl_deb_arch_of "$bin")"
    [ "$bin_arch" = "$arch" ] || fl_die "$bin is $bin_arch, not $arch"

    local stage="$work/$pkg"
    rm -rf "$stage"
    local doc="$stage/usr/share/doc/$pkg"

    install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/etc/fogline" \
        "$stage/lib/systemd/system" "$stage/usr/lib/sysusers.d" "$doc"
    install -m 0755 "$bin" "$stage/usr/bin/$pkg"
    install -m 0644 "$FL_ROOT/deploy/config/$name.toml" "$stage/etc/fogline/$name.toml"
    install -m 0644 "$FL_ROOT/deploy/systemd/$pkg.service" "$stage/lib/systemd/system/$pkg.service"
    local defaults="$FL_ROOT/gateway/src/default.toml"
    [ "$name" = agent ] && defaults="$FL_ROOT/agent/src/ops/default.toml"
    install -m 0644 "$defaults" "$doc/$name-defaults.toml"
    printf 'u fogline - "fogline services" /var/lib/fogline /usr/sbin/nologin\n' \
        >"$stage/usr/lib/sysusers.d/$pkg.conf"
    chmod 0644 "$stage/usr/lib/sysusers.d/$pkg.conf"
    cat >"$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: fogline
Source: $(awk -F'"' '/^repository *=/ { print $2; exit }' "$FL_ROOT/Cargo.toml")

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF
    chmod 0644 "$doc/copyright"

    printf '/etc/fogline/%s.toml\n' "$name" >"$stage/DEBIAN/conffiles"
    write_scripts "$stage/DEBIAN" "$name"

    local depends installed_size description
    depends="$(shlib_depends "$bin")"
    installed_size="$(du -sk --exclude=DEBIAN "$stage" | cut -f1)"
    description="$(awk -F'"' '/^description *=/ { print $2; exit }' "$FL_ROOT/$name/Cargo.toml")"
    cat >"$stage/DEBIAN/control" <<EOF
Package: $pkg
Version: $version
Architecture: $arch
Maintainer: fogline developers <fogline@example.invalid>
Installed-Size: $installed_size
Depends: $depends
Section: net
Priority: optional
Homepage: $(awk -F'"' '/^repository *=/ { print $2; exit }' "$FL_ROOT/Cargo.toml")
Description: $description
 Part of fogline, edge/fog IoT aggregation for small ARM devices. Ships the
 ${pkg} binary, /etc/fogline/$name.toml and the hardened systemd unit
 $pkg.service (not started on first install: write the node's config,
 then "systemctl enable --now $pkg", or use fogline's deploy/install.sh).
 State lives in /var/lib/fogline/$name, owned by the system user fogline.
EOF
    (cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z |
        xargs -0 md5sum) >"$stage/DEBIAN/md5sums"
    chmod 0644 "$stage/DEBIAN/control" "$stage/DEBIAN/conffiles" "$stage/DEBIAN/md5sums"

    mkdir -p "$out_dir"
    local deb="$out_dir/${pkg}_${version}_${arch}.deb"
    dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
    fl_log "built ${deb#"$FL_ROOT"/} ($(stat -c %s "$deb") bytes; Depends: $depends)"
}

for c in "${components[@]}"; do
    case "$c" in
        agent | gateway) build_one "$c" ;;
        *) fl_die "unknown package $c (agent, gateway)" ;;
    esac
done
