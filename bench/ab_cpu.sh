#!/usr/bin/env bash
# A/B of two builds on the README's demo (embedded store, dev seal), rounds alternating:
# per round and build, the demo's achieved rate, p50/p99 and its cost line (custodyd's
# and the harness's CPU per request and custodyd's context switches per request, from
# /proc over the measured window, with the machine's idle share over the same seconds).
# DEMO_ARGS are passed to both demos (e.g. "--postgres postgresql://root@127.0.0.1/test"
# or "--cores 2").
#
#   bash bench/ab_cpu.sh A_TARGET_DIR B_TARGET_DIR [RATE ...]
#   e.g. bash bench/ab_cpu.sh /tmp/base-target/release target/release 1000 15000
#
# ROUNDS (default 3) rounds of DURATION (default 8) seconds at each rate.
set -euo pipefail
a=$1 b=$2; shift 2
rates=${*:-1000 15000}
rounds=${ROUNDS:-3}
duration=${DURATION:-8}

one() { # BUILD_DIR RATE -> "throughput p50 p99 custodyd_us harness_us ctxsw idle"
    local bin=$1 rate=$2 dir out
    dir=$(mktemp -d -t custody-ab-XXXXXX)
    out=$dir/out.txt
    "$bin/custody-load" demo --rate "$rate" --duration "$duration" --warmup 1 --no-reconcile \
        --state-dir "$dir" ${DEMO_ARGS:-} >"$out" 2>&1 || true
    # The demo's own figures over its measured window: achieved rate, latency, and its
    # cost line (custodyd's and the harness's CPU per request from /proc, custodyd's
    # context switches per request, the machine's idle share).
    local thr lat cost
    thr=$(grep -a '^  throughput' "$out" | awk '{print $2}')
    lat=$(grep -a '^  latency' "$out" | awk '{print $3, $9}')
    cost=$(grep -a '^  cost' "$out" | sed 's/[^0-9. ]/ /g' | awk '{print $1, $4, $5, $NF}')
    echo "${thr:-0} ${lat:-- -} ${cost:-- - - -}"
    rm -rf "$dir"
}

echo "| offered req/s | round | build | achieved req/s | p50 ms | p99 ms | custodyd CPU µs/req | custodyd context switches/req | harness CPU µs/req | machine idle % |"
echo "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"
for rate in $rates; do
    for round in $(seq 1 "$rounds"); do
        for build in A B; do
            dir=$a; [ "$build" = B ] && dir=$b
            read -r thr p50 p99 cpu cs harness idle < <(one "$dir" "$rate")
            echo "| $rate | $round | $build | $thr | $p50 | $p99 | $cpu | $cs | $harness | $idle |"
        done
    done
done
