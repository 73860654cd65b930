#!/usr/bin/env python3
"""Availability figures of issue 19: takeover after a SIGKILL, and the cost of a standby.

Two custodyd appliances, A and B, on one fresh PostgreSQL database (dev seal, both with the
same dev seed, development certificates, the default owner lease and margin), driven by
custody-load at --rate (default 15,000 req/s) over 4 TLS connections that follow the
active. Needs a release build (cargo build --release) and psql on the PATH.

    python3 bench/failover.py takeover [--rounds 10] [--period-s 8] [--rate 15000]
    python3 bench/failover.py standby-cost [--rounds 4] [--duration 10] [--rate 15000]
    python3 bench/failover.py all          (both, one after the other)

takeover: one custody-load run against --addr A,B with --json, --ack-log and
--failure-log; every --period-s seconds the active is SIGKILLed (A, then B, alternating),
and once the other serves the killed one is started again and waits as a standby. The
kill's time is read on CLOCK_MONOTONIC just before kill(2) and placed on the harness's
clock with the run's start on the same clock (the JSON's run_start.monotonic_ms). Per
round: the time from the kill to the first acknowledgement from the new active, the
longest gap between two acknowledgements around the kill, the requests refused
NOT_ACTIVE and of unknown outcome until the next round, and from the new active's log
when it took the lease and when every shard was loaded (the takeover's parts). Then the
median and maximum of each, and every line of the ack log looked up in the store that
survived (shard, seq -> event, asset, counter, hash): 0 missing is required (exit 1).

standby-cost: A active alone, custody-load --addr A for --duration seconds a round,
rounds alternating without B and with B running as a standby; per round the derivations'
p50/p99 and A's CPU per request (utime+stime from /proc/PID/stat, sampled every 100 ms and
read at the measured window's ends, 1 s in from each), the standby's CPU, and the
machine's idle share (/proc/stat) over the same seconds; then medians and the ratio.

PostgreSQL: $CUSTODY_BENCH_POSTGRES (default postgresql://root@127.0.0.1:5432/test); the
database custody_failover_<pid> is made for the run and dropped at the end (--keep keeps
it and the work directory).
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release")
HZ = os.sysconf("SC_CLK_TCK")

# The harness's client (CN custody-load) registers, derives and reconciles; its rate
# limits are out of the way of the measurement.
POLICY = """
[policy]
derivers = [{ identity = "custody-load", purposes = ["TRADING", "SETTLEMENT", "AUDIT", "BACKUP"], regions = ["US-EAST", "EU-WEST", "APAC"] }]
operators = ["custody-load"]
auditors = ["custody-load"]
rate_limits = { deriver = "1000000000/1s", operator = "1000000000/1s", auditor = "1000000000/1s" }
"""


def now_ms():
    """CLOCK_MONOTONIC in ms: the clock of the harness's run_start.monotonic_ms."""
    return time.clock_gettime(time.CLOCK_MONOTONIC) * 1000.0


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Database:
    """A fresh database on the server of `url`, dropped by drop()."""

    def __init__(self, url):
        u = urllib.parse.urlparse(url)
        self.host = u.hostname or "127.0.0.1"
        self.port = u.port or 5432
        self.user = u.username or os.environ.get("USER", "postgres")
        self.admin_db = (u.path or "/postgres").lstrip("/") or "postgres"
        self.name = "custody_failover_%d" % os.getpid()
        self.psql(self.admin_db, "DROP DATABASE IF EXISTS %s" % self.name)
        self.psql(self.admin_db, "CREATE DATABASE %s" % self.name)

    def psql(self, db, sql, extra=()):
        out = subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", self.host, "-p", str(self.port),
             "-U", self.user, "-d", db, "-At", *extra, "-c", sql],
            check=True, capture_output=True, text=True)
        return out.stdout.strip()

    def query(self, sql):
        return self.psql(self.name, sql)

    def drop(self):
        self.psql(self.admin_db, "DROP DATABASE IF EXISTS %s WITH (FORCE)" % self.name)


class Appliance:
    """One custodyd: its state directory, config, ports and process."""

    def __init__(self, name, work, certs, seed, db):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir)
        shutil.copy(seed, os.path.join(self.dir, "dev-seed.bin"))
        os.chmod(os.path.join(self.dir, "dev-seed.bin"), 0o600)
        self.addr = "127.0.0.1:%d" % free_port()
        self.admin = "127.0.0.1:%d" % free_port()
        self.config = os.path.join(self.dir, "custody.toml")
        self.proc = None
        self.starts = 0
        with open(self.config, "w") as f:
            f.write(f"""# written by bench/failover.py
[server]
listen = "{self.addr}"
admin_listen = "{self.admin}"
state_dir = "{self.dir}"
log_level = "info"
log_format = "json"

[tls]
cert = "{certs}/server.pem"
key = "{certs}/server.key"
client_ca = "{certs}/ca.pem"

[store]
backend = "postgres"
postgres_host = "{db.host}"
postgres_port = {db.port}
postgres_user = "{db.user}"
postgres_dbname = "{db.name}"

[seal]
provider = "dev"
{POLICY}""")

    def custodyd(self, *args):
        subprocess.run([os.path.join(BIN, "custodyd"), *args, "--config", self.config],
                       check=True, capture_output=True)

    def log_path(self, n=None):
        return os.path.join(self.dir, "custodyd-%d.log" % (self.starts if n is None else n))

    def start(self):
        self.starts += 1
        log = open(self.log_path(), "w")
        self.proc = subprocess.Popen(
            [os.path.join(BIN, "custodyd"), "run", "--config", self.config],
            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        log.close()

    def kill9(self):
        """SIGKILL; the CLOCK_MONOTONIC ms just before the signal."""
        at = now_ms()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.proc = None
        return at

    def stop(self):
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def role(self):
        """active, activating, standby, or None (not answering)."""
        try:
            body = urllib.request.urlopen("http://%s/metrics" % self.admin, timeout=1).read().decode()
        except OSError:
            return None
        m = re.search(r'^custody_role\{role="(\w+)"\} 1$', body, re.M)
        return m.group(1) if m else None

    def wait_role(self, role, limit_s=30.0, poll_s=0.01):
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                sys.exit("%s exited with %s; log %s" % (self.name, self.proc.returncode, self.log_path()))
            if self.role() == role:
                return
            time.sleep(poll_s)
        sys.exit("%s not %s within %.0f s; log %s" % (self.name, role, limit_s, self.log_path()))

    def log_events(self, n, unix0_ms):
        """(took the lease, every shard loaded) of start n, ms on the harness's clock."""
        took = loaded = None
        try:
            lines = open(self.log_path(n)).read().splitlines()
        except OSError:
            return None, None
        for line in lines:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            msg = e.get("fields", {}).get("message") or e.get("message") or ""
            ts = e.get("timestamp") or e.get("ts")
            if ts is None:
                continue
            at = parse_ts_ms(ts) - unix0_ms
            if took is None and msg.startswith("took the store's lease"):
                took = at
            if loaded is None and msg.startswith("every shard is loaded"):
                loaded = at
        return took, loaded

    def cpu_ticks(self):
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])


def parse_ts_ms(ts):
    """A log timestamp (RFC 3339, or Unix ms) as Unix ms."""
    if isinstance(ts, (int, float)):
        return float(ts)
    from datetime import datetime
    m = re.match(r"(.*?)(\.\d+)?(Z|[+-]\d\d:\d\d)$", ts)
    base = datetime.fromisoformat(m.group(1) + ("+00:00" if m.group(3) == "Z" else m.group(3)))
    frac = float(m.group(2) or 0)
    return (int(base.timestamp()) + frac) * 1000.0


def idle_total():
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], sum(v)


def setup(args, work):
    certs = os.path.join(work, "certs")
    subprocess.run([os.path.join(BIN, "custody"), "dev-certs", certs, "--client-cn", "custody-load"],
                   check=True, capture_output=True)
    seed = os.path.join(work, "dev-seed.bin")
    subprocess.run([os.path.join(BIN, "custody"), "dev-seed", seed], check=True, capture_output=True)
    db = Database(args.postgres)
    a = Appliance("A", work, certs, seed, db)
    b = Appliance("B", work, certs, seed, db)
    a.custodyd("migrate")
    return certs, db, a, b


def load_command(args, certs, addrs, duration, extra=()):
    return [os.path.join(BIN, "custody-load"), "run", "--addr", ",".join(addrs), "--certs", certs,
            "--rate", str(args.rate), "--duration", str(duration), "--warmup", "1", "--json", *extra]


def median(xs):
    return statistics.median(xs) if xs else float("nan")


# ---------------------------------------------------------------------------------------
# takeover


def takeover(args, work, certs, db, a, b):
    apps = [a, b]
    a.start()
    a.wait_role("active")
    b.start()
    b.wait_role("standby")
    acks = os.path.join(work, "acks.tsv")
    failures = os.path.join(work, "failures.tsv")
    lead_s = 3.0
    duration = lead_s + args.rounds * args.period_s + 1.0
    cmd = load_command(args, certs, [a.addr, b.addr], duration,
                       ["--ack-log", acks, "--failure-log", failures]
                       + ([] if args.reconcile else ["--no-reconcile"]))
    print("$ " + " ".join(cmd), file=sys.stderr)
    out = open(os.path.join(work, "load.json"), "w")
    load = subprocess.Popen(cmd, stdout=out, stderr=open(os.path.join(work, "load.stderr"), "w"))
    try:
        rounds, idle_pct = kill_rounds(args, apps, load, acks, work)
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()
    out.close()
    report = json.load(open(os.path.join(work, "load.json")))
    start = report["run_start"]
    addr_of = {a.addr: "A", b.addr: "B"}
    ack_times = {"A": [], "B": []}
    all_acks = []
    with open(acks) as f:
        for line in f:
            if line.startswith("#"):
                continue
            ms, endpoint = line.split("\t", 2)[:2]
            ms = float(ms)
            ack_times[addr_of[endpoint]].append(ms)
            all_acks.append(ms)
    all_acks.sort()
    fails = []
    with open(failures) as f:
        for line in f:
            if not line.startswith("#"):
                ms, _, outcome = line.rstrip("\n").split("\t")
                fails.append((float(ms), outcome))
    rows = []
    for i, r in enumerate(rounds):
        kill = r["kill_mono_ms"] - start["monotonic_ms"]
        until = (rounds[i + 1]["kill_mono_ms"] - start["monotonic_ms"]) if i + 1 < len(rounds) else float("inf")
        heir = r["heir"].name
        first = min((t for t in ack_times[heir] if t > kill), default=None)
        if first is None:
            sys.exit("round %d: no acknowledgement from %s after the kill" % (i + 1, heir))
        last_before = max((t for t in all_acks if t <= kill), default=kill)
        # The longest silence between two acknowledgements from a second before the kill
        # to a second after the first acknowledgement from the new active.
        window = [t for t in all_acks if kill - 1000 <= t <= first + 1000]
        gap = max((y - x for x, y in zip(window, window[1:])), default=0.0)
        in_round = [o for t, o in fails if kill - 1000 <= t < until - 1000]
        took, loaded = r["heir"].log_events(r["heir_start"], start["unix_ms"])
        rows.append({
            "round": i + 1, "killed": r["victim"].name, "heir": heir, "kill_ms": kill,
            "takeover_ms": first - kill, "gap_ms": gap, "last_ack_before_kill_ms": kill - last_before,
            "lease_taken_ms": None if took is None else took - kill,
            "shards_loaded_ms": None if loaded is None else loaded - kill,
            "not_active": sum(1 for o in in_round if o == "NOT_ACTIVE"),
            "unknown": sum(1 for o in in_round if o == "OUTCOME_UNKNOWN"),
            "not_sent": sum(1 for o in in_round if o == "NOT_SENT"),
            "other": sum(1 for o in in_round if o not in ("NOT_ACTIVE", "OUTCOME_UNKNOWN", "NOT_SENT")),
        })
    first_kill = rows[0]["kill_ms"] if rows else float("inf")
    before_first = sum(1 for t, _ in fails if t < first_kill - 1000)
    check = check_store(db, acks, work)
    print_takeover(rows, report, check, before_first)
    print("machine idle share over the rounds (/proc/stat): %.0f %%" % idle_pct)
    json.dump({"rounds": rows, "store_check": check, "failover": report["failover"],
               "failures_before_first_kill": before_first},
              open(os.path.join(work, "takeover.json"), "w"), indent=1)
    return check["missing"] == 0 and check["mismatched"] == 0



def kill_rounds(args, apps, load, acks, work):
    """The kills, alternating, during the harness's run: each round's victim, heir and
    kill time (CLOCK_MONOTONIC ms); and the machine's idle share over them."""
    lead_s = 3.0
    # The schedule has started once the ack log grows past its header (a buffer's worth).
    while not (os.path.exists(acks) and os.path.getsize(acks) > 100):
        if load.poll() is not None:
            sys.exit("custody-load ended early: see %s/load.stderr" % work)
        time.sleep(0.01)
    base = time.monotonic()
    idle0 = idle_total()
    rounds = []
    for k in range(args.rounds):
        victim, heir = apps[k % 2], apps[1 - k % 2]
        time.sleep(max(0.0, base + lead_s + k * args.period_s - time.monotonic()))
        if victim.role() != "active" or heir.role() != "standby":
            sys.exit("round %d: %s is %s and %s is %s before the kill" %
                     (k + 1, victim.name, victim.role(), heir.name, heir.role()))
        killed = victim.kill9()
        heir.wait_role("active", limit_s=args.period_s)
        victim.start()
        victim.wait_role("standby")
        rounds.append({"victim": victim, "heir": heir, "kill_mono_ms": killed, "heir_start": heir.starts})
        print("round %d: killed %s, %s active" % (k + 1, victim.name, heir.name), file=sys.stderr)
    idle1 = idle_total()
    load.wait()
    idle_pct = 100.0 * (idle1[0] - idle0[0]) / max(1, idle1[1] - idle0[1])
    return rounds, idle_pct


def check_store(db, acks, work):
    """Every line of the ack log looked up in the audit log by (shard, seq)."""
    clean = os.path.join(work, "acks-copy.tsv")
    with open(acks) as src, open(clean, "w") as dst:
        for line in src:
            if not line.startswith("#"):
                dst.write(line)
    db.query("CREATE TABLE bench_acks (ms float8, endpoint text, op text, asset uuid, "
             "counter bigint, shard smallint, seq bigint, hash text)")
    subprocess.run(["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-h", db.host, "-p", str(db.port),
                    "-U", db.user, "-d", db.name, "-c", "\\copy bench_acks FROM '%s'" % clean],
                   check=True, capture_output=True)
    out = db.query(
        "SELECT count(*), count(l.seq), "
        "count(*) FILTER (WHERE l.seq IS NOT NULL AND (l.event <> a.op OR l.asset_id <> a.asset "
        "OR l.counter <> a.counter OR encode(l.hash, 'hex') <> a.hash)), "
        "(SELECT count(*) FROM custody_audit_log) "
        "FROM bench_acks a LEFT JOIN custody_audit_log l ON l.shard = a.shard AND l.seq = a.seq")
    db.query("DROP TABLE bench_acks")
    acked, found, mismatched, stored = (int(x) for x in out.split("|"))
    return {"acknowledged": acked, "found": found, "missing": acked - found,
            "mismatched": mismatched, "audit_rows": stored}


def print_takeover(rows, report, check, before_first):
    f = report["failover"]
    print("| round | killed | new active | kill → first ack from the new active (ms) | lease taken (ms after kill) "
          "| shards loaded (ms) | longest ack gap (ms) | NOT_ACTIVE | OUTCOME_UNKNOWN | not sent | other |")
    print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    fmt = lambda v: "–" if v is None else "%.0f" % v
    for r in rows:
        print("| %d | %s | %s | %.0f | %s | %s | %.0f | %d | %d | %d | %d |" % (
            r["round"], r["killed"], r["heir"], r["takeover_ms"], fmt(r["lease_taken_ms"]),
            fmt(r["shards_loaded_ms"]), r["gap_ms"], r["not_active"], r["unknown"], r["not_sent"], r["other"]))
    for name, fn in (("median", median), ("max", max)):
        col = lambda k: fn([r[k] for r in rows if r[k] is not None]) if any(r[k] is not None for r in rows) else None
        print("| **%s** | | | **%.0f** | %s | %s | **%.0f** | %s | %s | %s | %s |" % (
            name, col("takeover_ms"), fmt(col("lease_taken_ms")), fmt(col("shards_loaded_ms")), col("gap_ms"),
            fmt(col("not_active")), fmt(col("unknown")), fmt(col("not_sent")), fmt(col("other"))))
    print()
    print("run: %d acknowledged, %d refused NOT_ACTIVE, %d of unknown outcome, %d not sent, %d other; "
          "%d endpoint switches; failures before the first kill: %d; closing reconciliation: %s" % (
              f["acknowledged"], f["refused_not_active"], f["outcome_unknown"], f["not_sent"],
              f["other_refusals"], f["switches_total"], before_first,
              "skipped" if report.get("reconciliation") is None else
              "%d records, %d findings" % (report["reconciliation"]["records_checked"],
                                           report["reconciliation"]["findings"])))
    print("store check: %d acknowledged DERIVE/ROTATE in the ack log, %d found by (shard, seq), "
          "%d missing, %d mismatched (event, asset, counter, hash); %d audit rows in the store" % (
              check["acknowledged"], check["found"], check["missing"], check["mismatched"], check["audit_rows"]))


# ---------------------------------------------------------------------------------------
# standby-cost


class Sampler(threading.Thread):
    """/proc samples every 100 ms: (monotonic ms, A ticks, B ticks or None, idle, total)."""

    def __init__(self, a, b):
        super().__init__(daemon=True)
        self.a, self.b, self.samples, self.stop = a, b, [], threading.Event()

    def run(self):
        while not self.stop.is_set():
            t = now_ms()
            ta = self.a.cpu_ticks()
            tb = self.b.cpu_ticks() if self.b.proc is not None else None
            idle, total = idle_total()
            self.samples.append((t, ta, tb, idle, total))
            time.sleep(0.1)

    def at(self, ms):
        return min(self.samples, key=lambda s: abs(s[0] - ms))


def standby_cost(args, work, certs, db, a, b):
    a.start()
    a.wait_role("active")
    rows = []
    order = [False, True] * args.rounds
    for i, with_standby in enumerate(order):
        if with_standby:
            b.start()
            b.wait_role("standby")
            time.sleep(1.0)
        cmd = load_command(args, certs, [a.addr], args.duration, ["--no-reconcile"])
        if i == 0:
            print("$ " + " ".join(cmd), file=sys.stderr)
        sampler = Sampler(a, b)
        sampler.start()
        out = subprocess.run(cmd, capture_output=True, text=True)
        sampler.stop.set()
        sampler.join()
        if out.returncode != 0:
            sys.exit("custody-load exit %d: %s" % (out.returncode, out.stderr[-2000:]))
        report = json.loads(out.stdout)
        lat = report["latency_ms"]
        w0 = report["run_start"]["monotonic_ms"] + 1000.0 + 1000.0
        w1 = report["run_start"]["monotonic_ms"] + 1000.0 + args.duration * 1000.0 - 1000.0
        s0, s1 = sampler.at(w0), sampler.at(w1)
        secs = (s1[0] - s0[0]) / 1000.0
        requests = args.rate * secs
        rows.append({
            "round": i // 2 + 1, "standby": with_standby, "throughput": report["throughput_rps"],
            "p50": lat["p50"], "p99": lat["p99"], "errors": sum(report["errors"].values()),
            "cpu_us_per_req": (s1[1] - s0[1]) / HZ * 1e6 / requests,
            "standby_cpu_pct": None if s0[2] is None or s1[2] is None else 100.0 * (s1[2] - s0[2]) / HZ / secs,
            "idle_pct": 100.0 * (s1[3] - s0[3]) / max(1, s1[4] - s0[4]),
        })
        if with_standby:
            b.stop()
        print("standby-cost %s" % json.dumps(rows[-1]), file=sys.stderr)
    print_standby_cost(rows)
    json.dump(rows, open(os.path.join(work, "standby-cost.json"), "w"), indent=1)
    return True


def print_standby_cost(rows):
    print("| round | standby | throughput | p50 ms | p99 ms | active's CPU µs/request | standby's CPU % of a core | machine idle % | errors |")
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print("| %d | %s | %.0f | %.3f | %.3f | %.1f | %s | %.0f | %d |" % (
            r["round"], "running" if r["standby"] else "none", r["throughput"], r["p50"], r["p99"],
            r["cpu_us_per_req"], "–" if r["standby_cpu_pct"] is None else "%.2f" % r["standby_cpu_pct"],
            r["idle_pct"], r["errors"]))
    med = {}
    for s in (False, True):
        sel = [r for r in rows if r["standby"] == s]
        med[s] = {k: median([r[k] for r in sel]) for k in ("p50", "p99", "cpu_us_per_req", "idle_pct")}
        sb = [r["standby_cpu_pct"] for r in sel if r["standby_cpu_pct"] is not None]
        print("| **median** | %s | | **%.3f** | **%.3f** | **%.1f** | %s | %.0f | |" % (
            "running" if s else "none", med[s]["p50"], med[s]["p99"], med[s]["cpu_us_per_req"],
            "%.2f" % median(sb) if sb else "–", med[s]["idle_pct"]))
    print("| **ratio** (with / without) | | | **%.2f** | **%.2f** | **%.2f** | | | |" % (
        med[True]["p50"] / med[False]["p50"], med[True]["p99"] / med[False]["p99"],
        med[True]["cpu_us_per_req"] / med[False]["cpu_us_per_req"]))


# ---------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("part", choices=["takeover", "standby-cost", "all"])
    p.add_argument("--rounds", type=int, help="takeover: kills (default 10); standby-cost: rounds of each (default 4)")
    p.add_argument("--period-s", type=float, default=8.0, help="takeover: seconds between two kills (default 8)")
    p.add_argument("--duration", type=float, default=10.0, help="standby-cost: measured seconds a round (default 10)")
    p.add_argument("--rate", type=int, default=15000)
    p.add_argument("--no-reconcile", dest="reconcile", action="store_false",
                   help="takeover: skip the harness's closing reconciliation of the audit log")
    p.add_argument("--postgres", default=os.environ.get("CUSTODY_BENCH_POSTGRES",
                                                       "postgresql://root@127.0.0.1:5432/test"))
    p.add_argument("--keep", action="store_true", help="keep the database and the work directory")
    args = p.parse_args()
    for tool in ("custodyd", "custody", "custody-load"):
        if not os.access(os.path.join(BIN, tool), os.X_OK):
            sys.exit("build first: cargo build --release (%s missing)" % tool)
    ok = True
    parts = ["takeover", "standby-cost"] if args.part == "all" else [args.part]
    for part in parts:
        rounds = args.rounds or (10 if part == "takeover" else 4)
        work = tempfile.mkdtemp(prefix="custody-%s-" % part)
        print("%s: work directory %s" % (part, work), file=sys.stderr)
        certs, db, a, b = setup(args, work)
        try:
            run = takeover if part == "takeover" else standby_cost
            ok &= run(argparse.Namespace(**{**vars(args), "rounds": rounds}), work, certs, db, a, b)
        finally:
            a.stop()
            b.stop()
            if not args.keep:
                db.drop()
                shutil.rmtree(work, ignore_errors=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
