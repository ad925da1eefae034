#!/usr/bin/env bash
# Installs fogline-agent (or fogline-gateway) on a device over ssh, writes the node's config
# and enables the service; or does the same inside a directory tree (--root).
#
#   deploy/install.sh [OPTIONS] user@host     the device: ssh, then sudo unless user is root
#   deploy/install.sh [OPTIONS] --root DIR    a directory tree: an empty dir (tests) or a
#                                             mounted device image; needs root here
# Options:
#   --component agent|gateway  what to install (default: agent)
#   --package FILE             the .deb (default: target/deploy/deb/fogline-<component>_
#                              <version>_<arch>.deb, <arch> being the device's)
#   --arch arm64|amd64         with --root: the architecture (default: this machine's)
#   --site ID                  agent: node.site
#   --node-id ID               agent: node.id (default over ssh: the device's short host
#                              name while the config still has the shipped "agent-1")
#   --gateway HOST:PORT[,…]    agent: uplink.gateway, failed over in order ("" for none)
#   --peers ID=HOST:PORT,...   agent: cluster.peers, the other agents of the site (their
#                              node ids and MQTT addresses; leave out the device itself)
#   --set SECTION.KEY=VALUE    any other key of the config, VALUE in TOML ('"text"', 42)
#   --no-start                 enable the service but do not (re)start it now
#   --ssh-option OPTION        passed to ssh as -o OPTION (e.g. Port=2222), repeatable
#
# Values not given keep what the device's config already has, so running it again only
# changes what you ask for. The new config is checked with `fogline-<component> config
# check` before it replaces the old one. Over ssh the service is then (re)started and
# must stay up for 5 s.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
    exit "${1:-0}"
}

component=agent
package=""
arch=""
root_dir=""
target=""
site="" site_set=0
node_id="" node_id_set=0
gateway="" gateway_set=0
peers="" peers_set=0
start=1
sets=()
ssh_opts=(-o ConnectTimeout=15 -o ServerAliveInterval=15)
while [ $# -gt 0 ]; do
    case "$1" in
        --component) component="${2:?}"; shift 2 ;;
        --package) package="${2:?}"; shift 2 ;;
        --arch) arch="${2:?}"; shift 2 ;;
        --root) root_dir="${2:?}"; shift 2 ;;
        --site) site="${2?}"; site_set=1; shift 2 ;;
        --node-id) node_id="${2?}"; node_id_set=1; shift 2 ;;
        --gateway) gateway="${2?}"; gateway_set=1; shift 2 ;;
        --peers) peers="${2?}"; peers_set=1; shift 2 ;;
        --set) sets+=("${2:?}"); shift 2 ;;
        --no-start) start=0; shift ;;
        --ssh-option) ssh_opts+=(-o "${2:?}"); shift 2 ;;
        -h | --help) usage 0 ;;
        -*) fl_warn "unknown option $1"; usage 2 ;;
        *)
            [ -z "$target" ] || fl_die "one target only"
            target="$1"
            shift
            ;;
    esac
done

# ---- checks on the arguments ---------------------------------------------------------
case "$component" in agent | gateway) ;; *) fl_die "--component agent or gateway" ;; esac
if [ -n "$root_dir" ] && [ -n "$target" ]; then fl_die "give user@host or --root DIR, not both"; fi
if [ -z "$root_dir" ] && [ -z "$target" ]; then usage 2; fi
if [ "$component" = gateway ] &&
    [ $((site_set + node_id_set + gateway_set + peers_set)) -gt 0 ]; then
    fl_die "--site, --node-id, --gateway and --peers are agent settings"
fi
id_re='^[A-Za-z0-9_.-]{1,32}$'
addr_re='^([A-Za-z0-9_.-]+|\[[0-9A-Fa-f:.]+\]):[0-9]{1,5}$'
if [ "$site_set" -eq 1 ] && ! [[ "$site" =~ $id_re ]]; then fl_die "--site: 1-32 of [A-Za-z0-9_.-]"; fi
if [ "$node_id_set" -eq 1 ] && ! [[ "$node_id" =~ $id_re ]]; then
    fl_die "--node-id: 1-32 of [A-Za-z0-9_.-]"
fi
if [ "$gateway_set" -eq 1 ] && [ -n "$gateway" ]; then
    IFS=, read -r -a gateway_list <<<"$gateway"
    for g in "${gateway_list[@]}"; do
        [[ "$g" =~ $addr_re ]] || fl_die "--gateway: $g is not HOST:PORT (several: HOST:PORT,HOST:PORT)"
    done
fi
peer_list=()
if [ "$peers_set" -eq 1 ] && [ -n "$peers" ]; then
    IFS=, read -r -a peer_list <<<"$peers"
    for p in "${peer_list[@]}"; do
        [[ "${p%%=*}" =~ ^[A-Za-z0-9_.-]{1,32}$ && "$p" == *=* && "${p#*=}" =~ $addr_re ]] ||
            fl_die "--peers: $p is not ID=HOST:PORT"
    done
fi
for s in "${sets[@]}"; do
    [[ "$s" =~ ^[a-z_]+\.[a-z0-9_]+=.+$ ]] || fl_die "--set $s: expected SECTION.KEY=VALUE"
done

pkg_name="fogline-$component"
conf_path="/etc/fogline/$component.toml"
service="$pkg_name.service"
work="$(mktemp -d)"
cleanup_cmds=()
cleanup() {
    local c
    for c in "${cleanup_cmds[@]}"; do eval "$c" || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# ---- the config file, edited here whatever the target ----------------------------------

# toml_set FILE SECTION KEY VALUE: set KEY in [SECTION] (VALUE is TOML), replacing the
# key's line or adding it at the end of the section (or a new section at the end).
toml_set() {
    local file="$1"
    # Through the environment: awk -v would interpret backslashes in the value.
    TS_SEC="$2" TS_KEY="$3" TS_VAL="$4" awk '
        function header(line,   h) {
            if (line !~ /^[ \t]*\[[^]]+\][ \t]*(#.*)?$/) return ""
            h = line; sub(/^[ \t]*\[/, "", h); sub(/\].*$/, "", h); gsub(/[ \t]/, "", h)
            return h
        }
        BEGIN { sec = ENVIRON["TS_SEC"]; key = ENVIRON["TS_KEY"]; line = key " = " ENVIRON["TS_VAL"] }
        {
            h = header($0)
            if (h != "") {
                # Leaving the section without the key: add it after its last setting,
                # before the blank and comment lines that lead to this header.
                if (in_sec && !done) { print line; done = 1 }
                printf "%s", held; held = ""
                in_sec = (h == sec)
                print
                next
            }
            if (in_sec && !done) {
                if ($0 ~ "^[ \t]*" key "[ \t]*=") { printf "%s", held; held = ""; print line; done = 1; next }
                if ($0 ~ /^[ \t]*(#.*)?$/) { held = held $0 "\n"; next }
                printf "%s", held; held = ""
            }
            print
        }
        END {
            if (!done) {
                if (in_sec) { print line; printf "%s", held }
                else { printf "%s", held; print "\n[" sec "]"; print line }
            } else printf "%s", held
        }
    ' "$file" >"$file.tmp"
    mv "$file.tmp" "$file"
}

# toml_get FILE SECTION KEY: the raw value of KEY in [SECTION], if there.
toml_get() {
    awk -v sec="$2" -v key="$3" '
        /^[ \t]*\[/ { h = $0; sub(/^[ \t]*\[/, "", h); sub(/\].*$/, "", h); in_sec = (h == sec); next }
        in_sec && $0 ~ "^[ \t]*" key "[ \t]*=" { sub(/^[^=]*=[ \t]*/, ""); print; exit }
    ' "$1"
}

toml_str() { printf '"%s"' "$1"; }

edit_config() {
    local file="$1" defaults="$2" host_id="$3" s sec key val peers_toml p
    for s in "${sets[@]}"; do
        sec="${s%%.*}"
        key="${s#*.}"
        val="${key#*=}"
        key="${key%%=*}"
        [ -n "$(toml_get "$defaults" "$sec" "$key")" ] ||
            fl_die "--set $sec.$key: $pkg_name has no such setting (see '$pkg_name config defaults')"
        toml_set "$file" "$sec" "$key" "$val"
    done
    [ "$component" = agent ] || return 0
    if [ "$site_set" -eq 1 ]; then toml_set "$file" node site "$(toml_str "$site")"; fi
    if [ "$node_id_set" -eq 1 ]; then
        toml_set "$file" node id "$(toml_str "$node_id")"
    elif [ -n "$host_id" ] && [ "$(toml_get "$file" node id)" = '"agent-1"' ]; then
        if [[ "$host_id" =~ $id_re ]]; then
            fl_log "node.id = \"$host_id\" (the device's host name; --node-id sets another)"
            toml_set "$file" node id "$(toml_str "$host_id")"
        else
            fl_warn "host name $host_id is not a valid node id: node.id stays agent-1"
        fi
    fi
    if [ "$gateway_set" -eq 1 ]; then toml_set "$file" uplink gateway "$(toml_str "$gateway")"; fi
    if [ "$peers_set" -eq 1 ]; then
        peers_toml="["
        for p in "${peer_list[@]}"; do peers_toml="$peers_toml\"$p\", "; done
        peers_toml="${peers_toml%, }]"
        toml_set "$file" cluster peers "$peers_toml"
    fi
}

# ---- the package ---------------------------------------------------------------------
pick_package() {
    local want_arch="$1" version
    if [ -z "$package" ]; then
        version="$(fl_workspace_version)"
        package="$FL_ROOT/target/deploy/deb/${pkg_name}_${version}_${want_arch}.deb"
        [ -f "$package" ] || fl_die "$package is missing: build it (deploy/README.md) or pass --package"
    fi
    [ -f "$package" ] || fl_die "$package does not exist"
    local p a
    p="$(dpkg-deb -f "$package" Package)"
    a="$(dpkg-deb -f "$package" Architecture)"
    [ "$p" = "$pkg_name" ] || fl_die "$package is $p, not $pkg_name"
    [ "$a" = "$want_arch" ] || fl_die "$package is for $a, the target is $want_arch"
    # The shipped defaults tell which settings this version has.
    dpkg-deb --fsys-tarfile "$package" |
        tar -xO "./usr/share/doc/$pkg_name/$component-defaults.toml" >"$work/defaults.toml"
    fl_log "package: $package ($(dpkg-deb -f "$package" Version), $a)"
}

# ---- install into a directory tree ---------------------------------------------------
install_root() {
    local dir host_arch dpkg_opts=()
    # dpkg writes root-owned files and the package's scripts chown the state directory.
    [ "$(id -u)" -eq 0 ] || fl_die "--root needs root: sudo $0 ..."
    mkdir -p "$root_dir"
    dir="$(cd "$root_dir" && pwd)"
    host_arch="$(dpkg --print-architecture)"
    arch="${arch:-$host_arch}"
    pick_package "$arch"

    if [ ! -f "$dir/var/lib/dpkg/status" ]; then
        fl_log "$dir has no dpkg database: creating an empty one"
        mkdir -p "$dir/var/lib/dpkg/info" "$dir/var/lib/dpkg/updates" "$dir/var/log" "$dir/etc"
        touch "$dir/var/lib/dpkg/status" "$dir/var/lib/dpkg/available"
    fi
    if ! dpkg --root="$dir" --status "libc6:$arch" 2>/dev/null | grep -qx 'Status: install ok installed'; then
        # Not a whole system (no libc6 package in it, e.g. a test tree): the package's
        # Depends cannot be met there, so dpkg is told to go on. On a device or a device
        # image they are checked as usual.
        fl_log "$dir has no libc6 package: installing without dependency checks"
        dpkg_opts+=(--force-depends)
    fi
    if [ "$arch" != "$host_arch" ] && ! grep -qx "$arch" "$dir/var/lib/dpkg/arch" 2>/dev/null; then
        dpkg_opts+=(--force-architecture)
    fi
    # The maintainer scripts run here (not chrooted) with DPKG_ROOT=$dir and write only
    # below it.
    dpkg --root="$dir" --force-script-chrootless --force-confold \
        "${dpkg_opts[@]}" --install "$package"

    local conf="$dir$conf_path"
    cp "$conf" "$work/config.toml"
    edit_config "$work/config.toml" "$work/defaults.toml" ""

    # Check the config with the installed binary when this machine can run it.
    local bin="$dir/usr/bin/$pkg_name" runner=()
    if [ "$arch" != "$host_arch" ]; then
        if [ "$arch" = arm64 ] && fl_qemu_aarch64; then
            runner=("${FL_QEMU[@]}")
        else
            runner=(none)
        fi
    fi
    if [ "${runner[0]:-}" = none ]; then
        fl_warn "cannot run a $arch binary here: the config was not checked"
    else
        env -i PATH=/usr/bin:/bin "${runner[@]}" "$bin" config check --config "$work/config.toml" \
            >/dev/null || fl_die "the new config does not check; $conf is unchanged"
    fi
    install -m 0644 "$work/config.toml" "$conf"

    if command -v systemctl >/dev/null 2>&1; then
        systemctl --root="$dir" enable "$service"
    else
        mkdir -p "$dir/etc/systemd/system/multi-user.target.wants"
        ln -sfn "/lib/systemd/system/$service" "$dir/etc/systemd/system/multi-user.target.wants/$service"
    fi
    fl_log "installed $pkg_name into $dir: config $conf_path, $service enabled"
}

# ---- install on a device over ssh ----------------------------------------------------
# shellcheck disable=SC2029 # the commands are meant to expand here, then run there
remote() { ssh "${ssh_opts[@]}" "$target" "$@"; }

install_remote() {
    local info ruid rarch rhost sudo="" rtmp
    # shellcheck disable=SC2016 # expanded on the device
    info="$(remote 'printf "%s %s %s\n" "$(id -u)" "$(dpkg --print-architecture)" "$(hostname -s)"' </dev/null)" ||
        fl_die "cannot reach $target over ssh (or it has no dpkg)"
    read -r ruid rarch rhost <<<"$info"
    [ "$ruid" = 0 ] || sudo="sudo"
    fl_log "$target: $rarch, host $rhost$([ -n "$sudo" ] && echo ', using sudo')"
    [ -z "$arch" ] || [ "$arch" = "$rarch" ] || fl_die "--arch $arch, but $target is $rarch"
    pick_package "$rarch"

    rtmp="$(remote 'mktemp -d /tmp/fogline-install.XXXXXX' </dev/null)"
    cleanup_cmds+=("remote 'rm -rf $rtmp' </dev/null")
    remote "cat > $rtmp/package.deb" <"$package"
    remote "$sudo env DEBIAN_FRONTEND=noninteractive dpkg --force-confold --install $rtmp/package.deb" </dev/null

    remote "cat $conf_path" </dev/null >"$work/config.toml"
    edit_config "$work/config.toml" "$work/defaults.toml" "$rhost"
    remote "cat > $rtmp/config.toml" <"$work/config.toml"
    remote "$sudo $pkg_name config check --config $rtmp/config.toml >/dev/null" </dev/null ||
        fl_die "the new config does not check; $conf_path on $target is unchanged"
    remote "$sudo install -m 0644 -o root -g root $rtmp/config.toml $conf_path" </dev/null
    remote "$sudo systemctl enable $service" </dev/null
    if [ "$start" -eq 0 ]; then
        fl_log "$target: $pkg_name installed and enabled (not started: --no-start)"
        return 0
    fi
    # (Re)start, then require the same process to stay up for 5 s: a bad address or a
    # busy port shows here.
    remote "$sudo sh -s" <<EOF || {
set -e
systemctl restart $service
pid=""
up=0
s=0
while [ \$s -lt 20 ] && [ \$up -lt 5 ]; do
    sleep 1
    s=\$((s + 1))
    now="\$(systemctl show -p MainPID --value $service)"
    if [ "\$(systemctl show -p ActiveState --value $service)" = active ] &&
        [ "\$now" != 0 ] && [ "\$now" = "\$pid" ]; then
        up=\$((up + 1))
    else
        up=0
        pid="\$now"
    fi
done
[ \$up -ge 5 ]
EOF
        remote "$sudo systemctl status --no-pager $service; $sudo journalctl -u $service -n 30 --no-pager" </dev/null || true
        fl_die "$service did not stay up on $target"
    }
    fl_log "$target: $pkg_name installed, configured, enabled and running"
}

if [ -n "$root_dir" ]; then
    install_root
else
    install_remote
fi
