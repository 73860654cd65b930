#!/usr/bin/env bash
# The article's design on the same PostgreSQL: durable derivations per second with
# pgbench (4 clients, 2 threads, 10 s). Usage: bench/article/run.sh [DATABASE_URL]
set -euo pipefail
url="${1:-postgresql://root@127.0.0.1:5432/test}"
here="$(dirname "$0")"
psql -q "$url" -f "$here/schema.sql"
pgbench -n -c 4 -j 2 -T 10 -f "$here/derive.sql" "$url"
psql -q "$url" -c "DROP TABLE article_audit_log; DROP TABLE article_keys;"
