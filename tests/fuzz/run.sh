#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: tests/fuzz/run.sh [SECONDS_PER_TARGET] [TARGET...]
# (default 20 s each, all targets). Installs cargo-fuzz from crates.io if it is missing.
# Uses the nightly toolchain with AddressSanitizer when rustup has one; otherwise the
# stable compiler with RUSTC_BOOTSTRAP=1 and no sanitizer (coverage-guided libFuzzer
# still; panics and overflow checks still fail the run). Corpora stay in tests/fuzz/corpus/
# (ignored by git) so later runs continue where earlier ones stopped; seeds/ holds a few
# hand-made inputs per target.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

secs="${1:-20}"
shift || true
targets=("$@")
if [ "${#targets[@]}" -eq 0 ]; then
    targets=(firmware_frame ingest_parse uplink_frame config_load mqtt_front store_apply aggregate_fold)
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "installing cargo-fuzz"
    cargo install cargo-fuzz --locked --version "^0.13"
fi

if rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
    fuzz=(cargo +nightly fuzz)
    sanitizer=(--sanitizer address)
    echo "fuzzing with nightly and AddressSanitizer"
else
    export RUSTC_BOOTSTRAP=1
    fuzz=(cargo fuzz)
    sanitizer=(--sanitizer none)
    echo "no nightly toolchain: fuzzing with the stable compiler, no sanitizer"
fi

# FOGLINE_FUZZ_DEV=1 builds without optimizations: much quicker to build, slower to run;
# what CI's brief runs use (tests/run.sh). Long runs should keep the optimized default.
build=(-O)
if [ "${FOGLINE_FUZZ_DEV:-0}" = 1 ]; then build=(--dev); fi

mkdir -p logs
for target in "${targets[@]}"; do
    mkdir -p "corpus/$target"
    # Hand-made seeds (committed) start the search from real inputs.
    seeds=()
    if [ -d "seeds/$target" ]; then seeds=("seeds/$target"); fi
    echo "fuzzing $target for ${secs}s"
    start=$(date +%s)
    set +e
    "${fuzz[@]}" run "${build[@]}" "${sanitizer[@]}" "$target" "corpus/$target" "${seeds[@]}" -- \
        -max_total_time="$secs" -max_len=4096 -rss_limit_mb=2048 -print_final_stats=1 \
        >"logs/$target.log" 2>&1
    status=$?
    set -e
    grep -E '^(stat::number_of_executed_units|stat::new_units_added)' "logs/$target.log" || true
    echo "$target: exit $status after $(( $(date +%s) - start ))s (log: tests/fuzz/logs/$target.log)"
    if [ "$status" -ne 0 ]; then
        tail -40 "logs/$target.log" >&2
        echo "fuzz target $target failed; the crashing input is in tests/fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
