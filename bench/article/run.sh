#!/usr/bin/env bash
# The article's design on the same PostgreSQL: durable derivations per second with
# pgbench, one transaction per derivation. Runs 10 s at 4, 8 and 16 clients (2 threads)
# and prints each, then the best: the fair figure is the design at its best client count.
# Usage: bench/article/run.sh [DATABASE_URL] [SECONDS]
set -euo pipefail
url="${1:-postgresql://root@127.0.0.1:5432/test}"
secs="${2:-10}"
here="$(dirname "$0")"
psql -q "$url" -f "$here/schema.sql" 2>/dev/null
best=0
for clients in 4 8 16; do
    tps=$(pgbench -n -c "$clients" -j 2 -T "$secs" -f "$here/derive.sql" "$url" 2>/dev/null |
        awk '/^tps/ { printf "%.0f", $3 }')
    echo "article: $clients clients: $tps derivations/s"
    if [ "$tps" -gt "$best" ]; then best=$tps; fi
done
psql -q "$url" -c "DROP TABLE article_audit_log; DROP TABLE article_keys;"
echo "article: best $best derivations/s"
