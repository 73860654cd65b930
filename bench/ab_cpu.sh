#!/usr/bin/env bash
# A/B of two builds on the README's demo (embedded store, dev seal), rounds alternating:
# per round and build, the demo's p50/p99 and custodyd's CPU per request, read from
# /proc/PID/stat over the middle of the measured window, with the machine's idle share
# (/proc/stat) over the same seconds.
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
hz=$(getconf CLK_TCK)
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
idle_total() { awk '/^cpu / {t=0; for (i=2; i<=NF; i++) t+=$i; print $5 + $6, t}' /proc/stat; }

one() { # BUILD_DIR RATE -> "p50 p99 cpu_us_per_req idle%"
    local bin=$1 rate=$2 dir out pid t0 t1 i0 i1 n0 n1
    dir=$(mktemp -d -t custody-ab-XXXXXX)
    out=$dir/out.txt
    "$bin/custody-load" demo --rate "$rate" --duration "$duration" --warmup 1 --no-reconcile \
        --state-dir "$dir" >"$out" 2>&1 &
    local harness=$!
    for _ in $(seq 1 100); do
        pid=$(pgrep -f "custodyd run --config $dir/custody.toml" || true)
        [ -n "$pid" ] && break
        sleep 0.05
    done
    # The middle of the measured window: after start-up and warm-up, before the end.
    sleep 3
    t0=$(cpu_ticks "$pid"); read -r i0 n0 < <(idle_total)
    sleep $((duration - 3))
    t1=$(cpu_ticks "$pid"); read -r i1 n1 < <(idle_total)
    wait "$harness" || true
    local lat
    lat=$(grep -a '^  latency' "$out" | awk '{print $3, $9}')
    awk -v t="$((t1 - t0))" -v hz="$hz" -v s="$((duration - 3))" -v r="$rate" \
        -v idle="$((i1 - i0))" -v tot="$((n1 - n0))" -v lat="$lat" \
        'BEGIN { printf "%s %.1f %.0f\n", lat, t / hz * 1e6 / (s * r), 100 * idle / tot }'
    rm -rf "$dir"
}

echo "| rate | round | build | p50 ms | p99 ms | custodyd CPU µs/request | machine idle % |"
echo "|---:|---:|---|---:|---:|---:|---:|"
for rate in $rates; do
    for round in $(seq 1 "$rounds"); do
        for build in A B; do
            dir=$a; [ "$build" = B ] && dir=$b
            read -r p50 p99 cpu idle < <(one "$dir" "$rate")
            echo "| $rate | $round | $build | $p50 | $p99 | $cpu | $idle |"
        done
    done
done
