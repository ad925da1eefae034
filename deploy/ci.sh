#!/usr/bin/env bash
# The deploy checks CI runs (tests/run.sh calls this), end to end:
#   1. cross-build fogline-agent for aarch64 (Debian's toolchain), check its stripped size,
#      and smoke-test the aarch64 binary under qemu-aarch64-static: it starts with the
#      defaults (only addresses and data dir moved), takes a reading from mosquitto_pub and
#      publishes the aggregate, which mosquitto_sub receives;
#   2. build the arm64 .deb of the agent from that same binary and check its metadata and
#      contents; build the amd64 .debs of the agent and the gateway, install them into a
#      throwaway root with deploy/install.sh --root, check the result, let
#      `systemd-analyze verify` check the units there, and purge them again.
# Prints the stripped aarch64 size of the agent (BENCHMARKS.md records it).
# Needs root (or sudo) for apt and dpkg; idempotent; every wait is bounded.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
cd "$FL_ROOT"

# The agent must stay below this many bytes, stripped, for aarch64 (issue: "under 8 MB").
AGENT_SIZE_LIMIT=8000000

t0=$SECONDS
step() { fl_log "[deploy ci +$((SECONDS - t0))s] $*"; }
fail() {
    printf 'deploy ci FAILED: %s\n' "$*" >&2
    exit 1
}

tmp="$(mktemp -d)"
pids=()
build_pid=""
cleanup() {
    local p
    for p in "${pids[@]}"; do
        kill -KILL "$p" 2>/dev/null || true
    done
    # The background build leads its own process group: stop cargo and its rustc.
    if [ -n "$build_pid" ]; then kill -TERM -- "-$build_pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
}
trap cleanup EXIT

# Stop a process we started: SIGTERM, up to 15 s, then SIGKILL.
stop_pid() {
    local pid="$1"
    kill -TERM "$pid" 2>/dev/null || return 0
    for _ in $(seq 1 30); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.5
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

# A loopback TCP port nobody listens on.
free_port() {
    local p
    for _ in $(seq 1 50); do
        p=$((20000 + RANDOM % 40000))
        if [ -z "$(ss -Htln "sport = :$p")" ] && [ "$p" != "${1:-}" ]; then
            echo "$p"
            return 0
        fi
    done
    fail "no free port found"
}

# ---- tools -----------------------------------------------------------------------------
step "tools (apt, only what is missing)"
fl_apt_ensure rustc-web cargo-web "libstd-rust-web-dev:arm64" gcc-aarch64-linux-gnu \
    libc6-dev-arm64-cross qemu-user-static mosquitto-clients systemd binutils curl iproute2

# The amd64 build (rustup's toolchain, for the amd64 packages) runs next to the aarch64
# one. The arm64 package holds the real release binary (size-tuned, fat LTO: minutes of
# single-threaded work); the amd64 packages here only prove the packaging, install and
# units, so they use the quicker `ci-package` profile (optimised, no LTO) to keep a cold
# CI run short. Shipped amd64 packages are built with --release (deploy/README.md).
step "amd64 build of fogline-agent and fogline-gateway, profile ci-package (background)"
setsid cargo build --locked --profile ci-package -p fogline-agent -p fogline-gateway \
    >"$tmp/amd64-build.log" 2>&1 &
build_pid=$!

# ---- 1. aarch64 build, size, smoke test under qemu --------------------------------------
step "cross-build fogline-agent for aarch64 (Debian's toolchain)"
bash deploy/build-aarch64.sh --toolchain debian --no-install fogline-agent | tee "$tmp/sizes.txt"
agent_arm64="target/deploy/bin/arm64/fogline-agent"
[ "$(fl_elf_machine "$agent_arm64")" = aarch64 ] || fail "$agent_arm64 is not aarch64"
agent_stripped="$(aarch64-linux-gnu-strip -o "$tmp/agent.stripped" "$agent_arm64" &&
    stat -c %s "$tmp/agent.stripped")"
[ "$agent_stripped" -lt "$AGENT_SIZE_LIMIT" ] ||
    fail "fogline-agent for aarch64 is $agent_stripped bytes stripped (limit $AGENT_SIZE_LIMIT)"

step "smoke test: the aarch64 agent under qemu-aarch64-static"
mqtt_port="$(free_port)"
http_port="$(free_port "$mqtt_port")"
# Built-in defaults (no config file), with addresses and data dir moved out of the way.
fl_qemu_aarch64 || fail "qemu-aarch64-static cannot run aarch64 binaries here"
echo "running: ${FL_QEMU[*]} $agent_arm64"
env -i PATH="$PATH" HOME="$tmp" "${FL_QEMU[@]}" "$agent_arm64" run \
    --data-dir "$tmp/agent-data" --mqtt-listen "127.0.0.1:$mqtt_port" --mqtt-listen-v5 "" \
    --http-listen "127.0.0.1:$http_port" >"$tmp/agent.log" 2>&1 &
agent_pid=$!
pids+=("$agent_pid")
healthy=0
for _ in $(seq 1 120); do
    if curl -fsS --max-time 2 "http://127.0.0.1:$http_port/healthz" >/dev/null 2>&1; then
        healthy=1
        break
    fi
    kill -0 "$agent_pid" 2>/dev/null || break
    sleep 0.5
done
if [ "$healthy" -ne 1 ]; then
    cat "$tmp/agent.log" >&2
    fail "the aarch64 agent did not become healthy within 60 s"
fi
timeout 45 mosquitto_sub -h 127.0.0.1 -p "$mqtt_port" -t 'agg/ci-smoke/temp/60s' -C 1 -W 40 \
    >"$tmp/agg.json" 2>"$tmp/sub.err" &
sub_pid=$!
pids+=("$sub_pid")
sleep 0.5
timeout 20 mosquitto_pub -h 127.0.0.1 -p "$mqtt_port" -q 1 -t sensors/ci-smoke/temp -m 21.5 ||
    fail "mosquitto_pub to the aarch64 agent failed"
if ! wait "$sub_pid"; then
    cat "$tmp/sub.err" "$tmp/agent.log" >&2
    fail "no aggregate on agg/ci-smoke/temp/60s from the aarch64 agent"
fi
agg="$(cat "$tmp/agg.json")"
printf 'aggregate from the aarch64 agent: %s\n' "$agg"
case "$agg" in
    *'"count":1'*'"mean":21.5'*) ;;
    *) fail "unexpected aggregate: $agg" ;;
esac
stop_pid "$agent_pid"

# ---- 2. packages ----------------------------------------------------------------------
step "wait for the amd64 release build"
if ! timeout 1800 tail --pid="$build_pid" -f /dev/null || ! wait "$build_pid"; then
    tail -n 40 "$tmp/amd64-build.log" >&2
    fail "the amd64 release build failed"
fi
build_pid=""
tail -n 1 "$tmp/amd64-build.log"

step "build the packages: agent arm64 (the binary tested above), agent and gateway amd64"
debs="$tmp/debs"
bash deploy/package.sh --arch arm64 --out "$debs" agent
bash deploy/package.sh --arch amd64 --bin-dir "$FL_ROOT/target/ci-package" --out "$debs" \
    agent gateway
version="$(fl_workspace_version)"
arm_deb="$debs/fogline-agent_${version}_arm64.deb"

step "check the arm64 package"
dpkg-deb --info "$arm_deb"
dpkg-deb --contents "$arm_deb"
field() { dpkg-deb -f "$arm_deb" "$1"; }
[ "$(field Package)" = fogline-agent ] || fail "Package: $(field Package)"
[ "$(field Architecture)" = arm64 ] || fail "Architecture: $(field Architecture)"
[ "$(field Version)" = "$version" ] || fail "Version: $(field Version)"
case "$(field Depends)" in libc6\ \(\>=\ 2.*) ;; *) fail "Depends: $(field Depends)" ;; esac
dpkg-deb --contents "$arm_deb" | awk '{ print $1, $2, $NF }' >"$tmp/contents.txt"
for want in \
    "-rwxr-xr-x root/root ./usr/bin/fogline-agent" \
    "-rw-r--r-- root/root ./etc/fogline/agent.toml" \
    "-rw-r--r-- root/root ./lib/systemd/system/fogline-agent.service" \
    "-rw-r--r-- root/root ./usr/lib/sysusers.d/fogline-agent.conf" \
    "-rw-r--r-- root/root ./usr/share/doc/fogline-agent/agent-defaults.toml"; do
    grep -qxF -- "$want" "$tmp/contents.txt" || fail "arm64 package lacks: $want"
done
mkdir "$tmp/arm-ctrl" "$tmp/arm-files"
dpkg-deb --control "$arm_deb" "$tmp/arm-ctrl"
dpkg-deb --extract "$arm_deb" "$tmp/arm-files"
grep -qx /etc/fogline/agent.toml "$tmp/arm-ctrl/conffiles" || fail "agent.toml is not a conffile"
for s in postinst prerm postrm; do [ -x "$tmp/arm-ctrl/$s" ] || fail "no $s"; done
cmp -s "$agent_arm64" "$tmp/arm-files/usr/bin/fogline-agent" ||
    fail "the packaged binary is not the one smoke-tested"
grep -q '^data_dir = "/var/lib/fogline/agent"' "$tmp/arm-files/etc/fogline/agent.toml" ||
    fail "the shipped config does not put the data in /var/lib/fogline/agent"
unit="$tmp/arm-files/lib/systemd/system/fogline-agent.service"
for want in "ExecStart=/usr/bin/fogline-agent run --config /etc/fogline/agent.toml" \
    User=fogline NoNewPrivileges=yes ProtectSystem=strict ProtectHome=yes PrivateTmp=yes \
    StateDirectory=fogline/agent ReadWritePaths=/var/lib/fogline/agent Restart=on-failure \
    StartLimitBurst=5 StartLimitIntervalSec=120; do
    grep -qxF "$want" "$unit" || fail "the agent unit lacks $want"
done

step "install the amd64 packages into a throwaway root (deploy/install.sh --root)"
root="$tmp/root"
# A device has systemd's own units (sysinit.target, network-online.target,
# multi-user.target, ...): the throwaway root gets those of this machine's systemd
# package, so that enabling and verifying resolve them inside the root.
mkdir -p "$root/lib/systemd/system"
dpkg -L systemd | grep -E '^/(usr/)?lib/systemd/system/[^/]+$' | while read -r f; do
    if [ ! -d "$f" ]; then cp -P "$f" "$root/lib/systemd/system/"; fi
done
bash deploy/install.sh --root "$root" --component agent --package "$debs/fogline-agent_${version}_amd64.deb" \
    --site ci-site --node-id ci-pi-1 --gateway 192.0.2.10:1883 --peers ci-pi-2=ci-pi-2:1883,ci-pi-3=ci-pi-3:1883 \
    --set aggregate.publish_interval_ms=500
bash deploy/install.sh --root "$root" --component gateway \
    --package "$debs/fogline-gateway_${version}_amd64.deb" --set 'mqtt.listen="0.0.0.0:8883"'
# Again, as an operator re-running it: an upgrade in place that keeps the node's values.
bash deploy/install.sh --root "$root" --component agent --package "$debs/fogline-agent_${version}_amd64.deb" \
    --gateway 192.0.2.11:1883

step "check the installed tree"
conf="$root/etc/fogline/agent.toml"
grep -qx 'id = "ci-pi-1"' "$conf" || fail "node id not written"
grep -qx 'site = "ci-site"' "$conf" || fail "site not written"
grep -qx 'gateway = "192.0.2.11:1883"' "$conf" || fail "gateway not written"
grep -qx 'publish_interval_ms = 500' "$conf" || fail "--set not written"
grep -q '^peers = \["ci-pi-2=ci-pi-2:1883", "ci-pi-3=ci-pi-3:1883"\]' "$conf" || fail "cluster.peers not written"
grep -qx 'listen = "0.0.0.0:8883"' "$root/etc/fogline/gateway.toml" || fail "gateway config not written"
env -i PATH=/usr/bin:/bin "$root/usr/bin/fogline-agent" config check --config "$conf" >/dev/null ||
    fail "the installed agent config does not check"
uid="$(awk -F: '$1 == "fogline" { print $3 }' "$root/etc/passwd")"
[ -n "$uid" ] || fail "no fogline user in the root's /etc/passwd"
for d in agent gateway; do
    [ "$(stat -c %u "$root/var/lib/fogline/$d")" = "$uid" ] || fail "/var/lib/fogline/$d not owned by fogline"
    [ -L "$root/etc/systemd/system/multi-user.target.wants/fogline-$d.service" ] ||
        fail "fogline-$d.service not enabled"
    [ -x "$root/usr/bin/fogline-$d" ] || fail "/usr/bin/fogline-$d missing"
done
dpkg --root="$root" -l 'fogline-*' | grep '^ii'

step "systemd-analyze verify the units in the throwaway root"
# --root resolves ExecStart= and the unit's paths inside the tree, so it checks the
# installed binaries, not this machine's. --man=no: the units name no man pages.
systemd-analyze verify --root="$root" --man=no \
    /lib/systemd/system/fogline-agent.service /lib/systemd/system/fogline-gateway.service \
    >"$tmp/verify.txt" 2>&1 || {
    cat "$tmp/verify.txt" >&2
    fail "systemd-analyze verify rejected the units"
}
if [ -s "$tmp/verify.txt" ]; then
    cat "$tmp/verify.txt" >&2
    fail "systemd-analyze verify had complaints"
fi
echo "systemd-analyze verify: no complaints"
for d in agent gateway; do
    systemd-analyze security --offline=yes --root="$root" --no-pager \
        "/lib/systemd/system/fogline-$d.service" 2>&1 | tail -n 1
done

step "purge the packages from the throwaway root"
dpkg --root="$root" --force-script-chrootless --force-depends --purge fogline-agent fogline-gateway
[ ! -e "$root/var/lib/fogline/agent" ] || fail "purge left /var/lib/fogline/agent"
[ ! -e "$root/usr/bin/fogline-agent" ] || fail "purge left /usr/bin/fogline-agent"
[ ! -e "$root/etc/systemd/system/multi-user.target.wants/fogline-agent.service" ] ||
    fail "purge left the agent enabled"

step "done"
grep '^size ' "$tmp/sizes.txt"
echo "deploy ci: ok in $((SECONDS - t0)) s"
