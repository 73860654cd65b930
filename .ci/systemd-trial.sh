#!/usr/bin/env bash
# The unit under a real systemd, on a host whose PID 1 is not systemd (CI's sandbox):
# appliance/install.sh installs custody for real, then systemd boots as PID 1 of its own
# PID, mount, network, UTS and IPC namespaces (as in a container), with /tmp, /var/tmp,
# the journal and /var/lib/systemd private, the units that would change the host masked
# (tmpfiles, sysctl, binfmt, sysusers, modules, and the host's sockets, timers and paths),
# and starts only custodyd.service (dev seal, embedded store); the cgroups and /dev/log it
# made on the host are removed afterwards. Checked:
#   READY and the status line; a derivation; watchdog pings; `systemctl reload` with a new
#   certificate (new connections are shown it); `systemctl stop` (drained, exit 0); a
#   start-up check failing (LimitMEMLOCK=64K: exit 2, not restarted); a frozen process
#   (the watchdog kills and restarts it).
#
#   sudo .ci/systemd-trial.sh            (needs the release build: cargo build --release)
#
# It installs into /usr/local/bin, /etc/custody, /var/lib/custody, /usr/share and
# /etc/systemd/system and removes them at the end: it refuses to run where any of them
# exists already. If systemd cannot be booted here at all it says so and exits 0, unless
# CUSTODY_REQUIRE_SERVICES=1 (CI), when that fails too; any check that fails once
# systemd answers exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
here=$(pwd)

[ "$(id -u)" = 0 ] || { echo "systemd-trial: run as root" >&2; exit 1; }
installed_paths="/etc/custody /var/lib/custody /etc/systemd/system/custodyd.service
    /etc/systemd/system/custodyd.service.d /etc/systemd/system/custody-trial.target
    /usr/local/bin/custodyd /usr/local/bin/custody /usr/share/custody /usr/share/doc/custody"
for p in $installed_paths; do
    if [ -e "$p" ]; then
        echo "systemd-trial: $p exists: custody is installed on this host; not touching it" >&2
        exit 1
    fi
done
systemd_bin=/lib/systemd/systemd
if ! [ -x "$systemd_bin" ] || ! command -v unshare >/dev/null || ! command -v nsenter >/dev/null; then
    echo "systemd-trial: no $systemd_bin, unshare or nsenter here"
    if [ "${CUSTODY_REQUIRE_SERVICES:-}" = 1 ]; then
        echo "systemd-trial: FAILED: required (CUSTODY_REQUIRE_SERVICES)" >&2
        exit 1
    fi
    echo "systemd-trial: SKIPPED"
    exit 0
fi
[ -x target/release/custodyd ] || { echo "systemd-trial: build first (cargo build --release)" >&2; exit 1; }

# Not under /tmp, which is private inside the namespaces.
work=$(mktemp -d -p /var/lib custody-trial.XXXXXX)
init_pid=""
unshare_pid=""
# What systemd leaves on the host beyond the namespaces: its cgroups (the hierarchies are
# shared: only units' directories at a hierarchy's top, *.slice, *.scope, *.service,
# *.mount, …, that were not there before, are removed, never anyone else's), the /dev/log
# link, and the user custody that install.sh makes.
systemd_cgroups() {
    find /sys/fs/cgroup -mindepth 2 -maxdepth 2 -type d \
        \( -name '*.slice' -o -name '*.scope' -o -name '*.service' -o -name '*.mount' \
        -o -name '*.socket' -o -name '*.swap' -o -name '*.automount' \) 2>/dev/null | sort
}
systemd_cgroups >"$work/cgroups.before"
dev_log_before=$([ -e /dev/log ] || [ -L /dev/log ] && echo yes || echo no)
user_before=$(getent passwd custody >/dev/null && echo yes || echo no)
group_before=$(getent group custody >/dev/null && echo yes || echo no)
cleanup() {
    if [ -n "$init_pid" ]; then kill -9 "$init_pid" 2>/dev/null || true; fi
    if [ -n "$unshare_pid" ]; then
        kill -9 "$unshare_pid" 2>/dev/null || true
        wait "$unshare_pid" 2>/dev/null || true
    fi
    # The new units' cgroups with their subtrees, deepest first (rmdir removes only
    # empty ones).
    # (Killed processes leave their cgroups as they are reaped: retry for a few seconds.)
    for _ in $(seq 1 25); do
        systemd_cgroups >"$work/cgroups.after" || true
        left=$(comm -13 "$work/cgroups.before" "$work/cgroups.after")
        [ -z "$left" ] && break
        for top in $left; do
            find "$top" -depth -type d -exec rmdir {} \; 2>/dev/null || true
        done
        sleep 0.2
    done
    if [ "$dev_log_before" = no ]; then rm -f /dev/log; fi
    if [ "$user_before" = no ]; then userdel custody 2>/dev/null || true; fi
    if [ "$group_before" = no ]; then groupdel custody 2>/dev/null || true; fi
    # shellcheck disable=SC2086
    rm -rf $installed_paths "$work"
}
trap cleanup EXIT

fail() {
    echo "systemd-trial: FAILED: $*" >&2
    if [ -n "$init_pid" ]; then
        nsenter -t "$init_pid" -a journalctl --no-pager -n 60 -o cat 2>&1 | tail -60 >&2 || true
    fi
    exit 1
}

bash appliance/install.sh --bin-from target/release >/dev/null
custody=/usr/local/bin/custody
$custody dev-certs /etc/custody --client-cn trial-client >/dev/null
chgrp custody /etc/custody/server.key && chmod 0640 /etc/custody/server.key
$custody dev-seed /var/lib/custody/dev-seed.bin >/dev/null
chown custody:custody /var/lib/custody/dev-seed.bin
cat > /etc/custody/custody.toml <<'TOML'
[server]
listen = "127.0.0.1:7443"
admin_listen = "127.0.0.1:7480"
cores = 0
state_dir = "/var/lib/custody"
[tls]
cert = "server.pem"
key = "server.key"
client_ca = "ca.pem"
[seal]
provider = "dev"
dev_seed_file = "dev-seed.bin"
[policy]
derivers = [{ identity = "trial-client", purposes = ["TRADING"], regions = ["US-EAST"] }]
operators = ["trial-client"]
auditors = ["trial-client"]
TOML
chgrp custody /etc/custody/custody.toml && chmod 0640 /etc/custody/custody.toml
cat > /etc/systemd/system/custody-trial.target <<'UNIT'
[Unit]
Description=custody trial: custodyd only
Requires=basic.target custodyd.service
After=basic.target custodyd.service
UNIT

# Boot. Inside the new mount namespace: private /tmp and /var/tmp, and the host-changing
# units masked (an empty file where the unit was: systemd reports it masked).
masked="systemd-tmpfiles-setup.service systemd-tmpfiles-setup-dev.service systemd-tmpfiles-clean.timer systemd-sysctl.service systemd-binfmt.service proc-sys-fs-binfmt_misc.automount systemd-sysusers.service systemd-modules-load.service systemd-remount-fs.service systemd-update-utmp.service sockets.target timers.target paths.target"
unshare --pid --fork --kill-child --mount --uts --ipc --net --mount-proc bash -c '
    set -e
    mount --make-rprivate /
    for d in /tmp /var/tmp /var/log/journal /var/lib/systemd; do
        if [ -d "$d" ]; then mount -t tmpfs tmpfs "$d"; fi
    done
    for u in '"$masked"'; do
        f=/lib/systemd/system/$u
        if [ -e "$f" ]; then mount --bind /dev/null "$f"; fi
    done
    exec env container=custody-trial '"$systemd_bin"' --unit=custody-trial.target --log-target=journal-or-kmsg
' >"$work/boot.log" 2>&1 &
unshare_pid=$!
for _ in $(seq 1 50); do
    init_pid=$(pgrep -P "$unshare_pid" | head -n 1 || true)
    [ -n "$init_pid" ] && break
    sleep 0.1
done
NS() { timeout 150 nsenter -t "$init_pid" -a "$@"; }
# Booted once systemctl answers at all (any state: custodyd's own start is checked below).
booted=""
for _ in $(seq 1 100); do
    if [ -n "$init_pid" ] && [ -n "$(timeout 5 nsenter -t "$init_pid" -a systemctl is-system-running 2>/dev/null || true)" ]; then
        booted=1
        break
    fi
    sleep 0.2
done
if [ -z "$booted" ]; then
    echo "systemd-trial: systemd could not be booted in namespaces here:"
    cat "$work/boot.log"
    if [ "${CUSTODY_REQUIRE_SERVICES:-}" = 1 ]; then
        echo "systemd-trial: FAILED: required (CUSTODY_REQUIRE_SERVICES)" >&2
        exit 1
    fi
    echo "systemd-trial: SKIPPED"
    exit 0
fi
echo "systemd-trial: systemd $(NS systemctl --version | head -n 1 | cut -d' ' -f2) booted as PID 1 of its namespaces"

# (Read whole, then searched: `journalctl | grep -q` fails under pipefail when grep
# stops reading early.)
journal_has() {
    NS journalctl -u custodyd --no-pager -o cat >"$work/journal" 2>&1 || true
    grep -q -- "$1" "$work/journal"
}

wait_state() { # UNIT PROPERTY VALUE SECONDS
    for _ in $(seq 1 $(($4 * 10))); do
        [ "$(NS systemctl show "$1" -p "$2" --value)" = "$3" ] && return 0
        sleep 0.1
    done
    fail "$1 $2 is $(NS systemctl show "$1" -p "$2" --value), not $3 after $4 s"
}

# READY and the status line.
wait_state custodyd ActiveState active 150
status=$(NS systemctl show custodyd -p StatusText --value)
case "$status" in "serving on 127.0.0.1:7443 with "*) ;; *) fail "status line: $status" ;; esac
echo "systemd-trial: active, status \"$status\""

# A derivation through the real TLS listener.
asset=6ba7b810-9dad-11d1-80b4-00c04fd430c8
cli=(/usr/local/bin/custody --addr 127.0.0.1:7443 --certs /etc/custody)
NS "${cli[@]}" register $asset >/dev/null || fail "register"
NS "${cli[@]}" derive $asset --path "m/44'/0'/0'/0'/1" --region US-EAST --purpose TRADING --ttl 60 \
    >"$work/derived" || fail "derive"
grep -q '^key ' "$work/derived" || fail "derive printed no key"
echo "systemd-trial: a derivation answered"

# Watchdog pings (WatchdogSec=30s: one every 7.5 s).
first=$(NS systemctl show custodyd -p WatchdogTimestampMonotonic --value)
sleep 9
second=$(NS systemctl show custodyd -p WatchdogTimestampMonotonic --value)
[ "$second" -gt "$first" ] || fail "no watchdog ping in 9 s ($first, $second)"
echo "systemd-trial: watchdog pings arrive"

# Reload with a new certificate: new connections are shown it, and the process lives.
pid=$(NS systemctl show custodyd -p MainPID --value)
$custody dev-certs "$work/next" >/dev/null || fail "dev-certs"
install -m 0644 "$work/next/server.pem" /etc/custody/server.pem.new
install -m 0640 -g custody "$work/next/server.key" /etc/custody/server.key.new
mv /etc/custody/server.pem.new /etc/custody/server.pem
mv /etc/custody/server.key.new /etc/custody/server.key
NS systemctl reload custodyd || fail "systemctl reload"
sleep 1
[ "$(NS systemctl show custodyd -p MainPID --value)" = "$pid" ] || fail "the reload restarted or killed custodyd"
journal_has "configuration reloaded" || fail "no 'configuration reloaded' in the journal"
shown=$(NS sh -c "openssl s_client -connect 127.0.0.1:7443 -cert /etc/custody/client.pem -key /etc/custody/client.key -CAfile $work/next/ca.pem </dev/null 2>/dev/null | openssl x509 -noout -serial" || true)
expected=$(openssl x509 -noout -serial -in "$work/next/server.pem")
[ "$shown" = "$expected" ] || fail "after the reload the server shows ${shown:-nothing}, not $expected"
echo "systemd-trial: reload put the new certificate in force ($expected), same process"

# Stop: drained, status 0, not failed.
NS systemctl stop custodyd || fail "systemctl stop"
[ "$(NS systemctl show custodyd -p ExecMainStatus --value)" = 0 ] || fail "stop: exit status $(NS systemctl show custodyd -p ExecMainStatus --value)"
[ "$(NS systemctl show custodyd -p ActiveState --value)" = inactive ] || fail "stop: not inactive"
journal_has "stopped: every connection answered" || fail "no drain in the journal"
echo "systemd-trial: stop drained and exited 0"

# A failing start-up check: exit 2, and systemd does not restart it.
mkdir -p /etc/systemd/system/custodyd.service.d
printf '[Service]\nLimitMEMLOCK=64K\n' > /etc/systemd/system/custodyd.service.d/trial.conf
NS systemctl daemon-reload || fail "daemon-reload"
NS systemctl start custodyd 2>/dev/null && fail "started with LimitMEMLOCK=64K"
sleep 3
[ "$(NS systemctl show custodyd -p ExecMainStatus --value)" = 2 ] || fail "memlock: exit status $(NS systemctl show custodyd -p ExecMainStatus --value)"
[ "$(NS systemctl show custodyd -p NRestarts --value)" = 0 ] || fail "memlock: restarted"
journal_has "RLIMIT_MEMLOCK is 65536 bytes" || fail "memlock: no fix in the journal"
echo "systemd-trial: LimitMEMLOCK=64K stops the start with status 2, named, not restarted"
rm -rf /etc/systemd/system/custodyd.service.d
NS systemctl daemon-reload || fail "daemon-reload"
NS systemctl reset-failed custodyd || fail "reset-failed"

# A frozen process: the watchdog has systemd kill and restart it.
NS systemctl start custodyd || fail "start after the memlock check"
wait_state custodyd ActiveState active 30
pid=$(NS systemctl show custodyd -p MainPID --value)
NS kill -STOP "$pid" || fail "SIGSTOP"
for _ in $(seq 1 60); do
    [ "$(NS systemctl show custodyd -p NRestarts --value)" -ge 1 ] && break
    sleep 1
done
[ "$(NS systemctl show custodyd -p NRestarts --value)" -ge 1 ] || fail "a frozen custodyd was not restarted within 60 s"
wait_state custodyd ActiveState active 30
echo "systemd-trial: a frozen custodyd was killed by the watchdog and restarted"
echo "systemd-trial: ok"
