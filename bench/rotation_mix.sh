#!/usr/bin/env bash
# Derive latency at 15,000 req/s with 1 % rotations in the mix against none, alternating in
# one command (the machine is shared and noisy: compare within a round, quote medians).
#   bash bench/rotation_mix.sh [ROUNDS]        (default 3 rounds; needs a release build)
set -euo pipefail
cd "$(dirname "$0")/.."
rounds=${1:-3}
load=./target/release/custody-load
[ -x "$load" ] || { echo "build first: cargo build --release" >&2; exit 1; }
printf '%-6s %-8s %10s %9s %9s %9s %9s %7s %12s\n' round rotate throughput p50_ms p99_ms p999_ms max_ms errors rotations_ok
for r in $(seq 1 "$rounds"); do
  for pct in 0 1; do
    "$load" demo --rotate-percent "$pct" --json 2>/dev/null | python3 -c "
import json, sys
d = json.load(sys.stdin); l = d['latency_ms']
print('%-6s %-8s %10.0f %9.3f %9.3f %9.3f %9.3f %7d %12d' % ('$r', '$pct %', d['throughput_rps'], l['p50'], l['p99'], l['p99_9'], l['max'], sum(d['errors'].values()), d['by_op'].get('rotate', {}).get('ok', 0)))"
  done
done
