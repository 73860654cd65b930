#!/usr/bin/env bash
# Connection floods at full size (issue 16): custodyd on the embedded store (dev seal, 2
# cores), a steady deriver and a fresh connection every 100 ms measured before, during and
# after each flood, custodyd's resident memory and heap. Prints one table per run; the
# figures go to docs/benchmarks.md ("Connection floods").
#
#   bash bench/floods.sh                 # every flood at the issue's sizes
#   TCP=20000 TLS=8400 bash bench/floods.sh
#   ONLY=memory MEMORY=8000 ROUNDS=3 bash bench/floods.sh   # one part: floods, idle, memory
#
# Needs target/release (cargo build --release). The floods come from 127.0.0.2.
set -euo pipefail
cd "$(dirname "$0")/.."
TCP=${TCP:-8400}
TLS=${TLS:-8191}
MEMORY=${MEMORY:-8000}
ONLY=${ONLY:-}
bin=target/release
dir=$(mktemp -d -t custody-floods-XXXXXX)
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$dir"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

"$bin/custody" dev-certs "$dir/certs" --client-cn deriver --more-clients flood,nobody >/dev/null
"$bin/custody" dev-seed "$dir/dev-seed.bin" >/dev/null
asset=0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d

# start LIMITS: custodyd with [limits] LIMITS, serving; sets pid, addr, admin.
start() {
    addr=127.0.0.1:$(free_port)
    admin=127.0.0.1:$(free_port)
    cat >"$dir/custody.toml" <<TOML
[server]
listen = "$addr"
admin_listen = "$admin"
cores = 2
state_dir = "$dir"
log_level = "warn"

[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"

[limits]
$1

[policy]
derivers = [{ identity = "deriver", purposes = ["TRADING"], regions = ["US-EAST"] }]
operators = ["deriver"]
auditors = ["flood"]
rate_limits = { deriver = "1000000/1s" }
TOML
    "$bin/custodyd" run --config "$dir/custody.toml" 2>>"$dir/custodyd.log" &
    pid=$!
    for _ in $(seq 1 100); do
        "$bin/custody" --addr "$addr" --certs "$dir/certs" hello >/dev/null 2>&1 && break
        sleep 0.1
    done
    "$bin/custody" --addr "$addr" --certs "$dir/certs" register "$asset" >/dev/null 2>&1 || true
}

stop() { kill "$pid"; wait "$pid" || true; pid=; }

floods() {
    "$bin/custody-load" floods --addr "$addr" --certs "$dir/certs" --admin "$admin" \
        --pid "$pid" --asset "$asset" "$@"
}

echo "## $(date -u +%F), $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; custodyd $(git rev-parse --short HEAD 2>/dev/null)"
echo
part() { [ -z "$ONLY" ] || [ "$ONLY" = "$1" ]; }

if part floods; then
echo "Default limits:"
start ""
floods --kinds tcp --flood-connections "$TCP"
floods --kinds roleless,identity --flood-connections "$TLS"
floods --kinds slow-header,slow-body --flood-connections 500 --hold-s 7
stop
fi
if part idle; then
echo
echo "Idle connections closed (limits.idle_timeout_s = 3):"
start "idle_timeout_s = 3"
floods --kinds idle --flood-connections 1000 --hold-s 6
stop
fi
if part memory; then
echo
echo "Memory: $MEMORY idle established connections of one identity, opened and closed ${ROUNDS:-3} times (limits raised to hold them):"
start "max_connections_per_core = 8192
max_connections_per_identity = 8000"
floods --kinds memory --flood-connections "$MEMORY" --rounds "${ROUNDS:-3}"
stop
fi
