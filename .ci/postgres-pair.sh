#!/usr/bin/env bash
# Makes sure the PostgreSQL failover tests (tests/pg_failover.rs) can make their own
# primary and synchronous streaming replica; prints the server tools' directory, which
# they read from CUSTODY_TEST_PG_BIN. Changes nothing on the machine; safe to rerun.
#
#   CUSTODY_TEST_PG_BIN=$(bash .ci/postgres-pair.sh) cargo test --release --test pg_failover
#
# Why the tests make a pair of their own (tests/common/pg_pair.rs: initdb, pg_basebackup,
# pg_ctl under a temp dir on free ports, stopped and removed by a drop guard) rather than
# this script giving the shared server on 5432 a replica on 5433:
# - a primary with `synchronous_standby_names` holds every commit until its replica has
#   it: the failover test kills servers (`-m immediate`) and promotes, and a replica down
#   for a moment would hang every PostgreSQL test running in parallel against 5432;
# - a promoted replica cannot become a standby again without a new base backup, so a
#   shared pair would need rebuilding after each run, and a failed run would leave 5432
#   waiting for a standby that is gone;
# - synchronous commit would slow every other test's commits and shift their timings.
# A pair per test costs about 3 s (initdb, a fast base backup, the replica's start).
#
# Needs: the server tools (initdb, pg_ctl, pg_basebackup, psql) and, when run as root
# (CI), the postgres user (initdb refuses root; the tests run the tools with runuser).
set -euo pipefail

version=${CUSTODY_TEST_PG_VERSION:-$(ls /etc/postgresql 2>/dev/null | sort -n | tail -n 1)}
bin=${CUSTODY_TEST_PG_BIN:-/usr/lib/postgresql/$version/bin}
for tool in initdb pg_ctl pg_basebackup psql; do
    if ! [ -x "$bin/$tool" ]; then
        echo "postgres-pair: $bin/$tool is missing (the postgresql-$version package)" >&2
        exit 1
    fi
done
if [ "$(id -u)" = 0 ]; then
    if ! id -u postgres >/dev/null 2>&1; then
        echo "postgres-pair: running as root and there is no postgres user to run initdb" >&2
        exit 1
    fi
    if ! command -v runuser >/dev/null 2>&1; then
        echo "postgres-pair: runuser (util-linux) is missing" >&2
        exit 1
    fi
    # The temp dirs are made under $TMPDIR (or /tmp) and handed to postgres, who must be
    # able to reach them.
    tmp=${TMPDIR:-/tmp}
    if ! runuser -u postgres -- test -x "$tmp"; then
        echo "postgres-pair: the postgres user cannot enter $tmp" >&2
        exit 1
    fi
fi
echo "postgres-pair: $("$bin/initdb" --version) in $bin; the failover tests make their own primary and replica" >&2
echo "$bin"
