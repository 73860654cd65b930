#!/usr/bin/env bash
# The highest rate whose derive p99 stays under an objective, for one target: runs the
# harness at each rate given, in order, 10 s each (after 1 s warm-up), and prints each
# run's figures; the answer is the last rate that met the objective before the first
# that missed it. One line per run, so the table in docs/benchmarks.md is what it prints.
#   bash bench/slo_search.sh demo|pg|article SLO RATE...
#   e.g. bash bench/slo_search.sh demo 5ms 15000 30000 60000
# pg and article use $CUSTODY_BENCH_POSTGRES (default postgresql://root@127.0.0.1:5432/test).
set -euo pipefail
cd "$(dirname "$0")/.."
target=$1 slo=$2
shift 2
url=${CUSTODY_BENCH_POSTGRES:-postgresql://root@127.0.0.1:5432/test}
load=./target/release/custody-load
[ -x "$load" ] || { echo "build first: cargo build --release" >&2; exit 1; }
case $target in
  demo) args=(demo) ;;
  pg) args=(demo --postgres "$url") ;;
  article) args=(article --postgres "$url") ;;
  *) echo "target: demo, pg or article" >&2; exit 2 ;;
esac
best=none
printf '%-8s %8s %11s %9s %9s %9s %7s %s\n' target rate throughput p50_ms p99_ms p999_ms errors objective
for rate in "$@"; do
  set +e
  out=$("$load" "${args[@]}" --rate "$rate" --duration 10 --warmup 1 --slo-p99 "$slo" --json 2>/dev/null)
  code=$?
  set -e
  line=$(printf '%s' "$out" | python3 -c "
import json, sys
d = json.load(sys.stdin); l = d['latency_ms'] or {}
print('%9.0f %9.3f %9.3f %9.3f %7d %s' % (d['throughput_rps'], l.get('p50', 0), l.get('p99', 0), l.get('p99_9', 0), sum(d['errors'].values()), 'met' if d['slo_met'] else 'missed'))" 2>/dev/null || echo "(no report: exit $code)")
  printf '%-8s %8s %s\n' "$target" "$rate" "$line"
  if [ "$code" -eq 0 ]; then best=$rate; elif [ "$code" -eq 6 ]; then break; else echo "run failed: exit $code" >&2; exit "$code"; fi
done
echo "highest rate meeting p99 < $slo: $best"
