#!/usr/bin/env bash
# custody against the article's design on the same PostgreSQL, alternating so that both
# see the same machine: ROUNDS times, custody's load harness at RATE (durable derivations
# per second end to end, with TLS and the harness on the same box), then the article's
# design at its best client count. Prints each round's ratio and the median.
# Usage: bench/article/compare.sh [DATABASE_URL] [RATE] [ROUNDS]
set -euo pipefail
url="${1:-postgresql://root@127.0.0.1:5432/test}"
rate="${2:-120000}"
rounds="${3:-3}"
here="$(dirname "$0")"
root="$here/../.."
ratios=()
for round in $(seq 1 "$rounds"); do
    custody=$("$root/target/release/custody-load" demo --postgres "$url" --rate "$rate" \
        --duration 10 --warmup 1 --json 2>/dev/null |
        python3 -c 'import json,sys; r=json.load(sys.stdin); a=r["audit"]; assert r["measured_errors"]==0 and a["missing"]==0 and a["mismatched"]==0, r; print(round(r["throughput_rps"]))')
    article=$("$here/run.sh" "$url" 10 | awk '/^article: best/ { print $3 }')
    ratio=$(python3 -c "print(f'{$custody/$article:.1f}')")
    echo "round $round: custody $custody/s, article $article/s, ratio ${ratio}x"
    ratios+=("$ratio")
done
printf '%s\n' "${ratios[@]}" | sort -n | awk '{ r[NR] = $1 } END { print "median ratio " r[int((NR + 1) / 2)] "x over " NR " rounds" }'
