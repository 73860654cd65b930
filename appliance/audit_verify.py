#!/usr/bin/env python3
"""Checks custody's audit log without custody: the hash chain of every shard and, given
the root seed, the MAC of every checkpoint. Python standard library only.

The record encoding, the chain and the checkpoint MAC are specified byte by byte in
docs/audit.md; this script is a second, independent implementation of that page.

Usage:
  audit_verify.py --sqlite /var/lib/custody/custody.db [--seed-file F | --seed-hex HEX] [--json]
  audit_verify.py --tsv records.tsv checkpoints.tsv [--seed-file F | --seed-hex HEX] [--json]

The TSV files are PostgreSQL exports, made with the psql commands in docs/audit.md.
Exit status: 0 when every check passed, 1 when something was found, 2 on bad usage.
"""

import argparse
import hashlib
import hmac
import json
import sqlite3
import struct
import sys
import urllib.parse
import uuid

GENESIS = bytes(32)
RECORD_DOMAIN = b"custody/audit-record/v1\x00"
CHECKPOINT_DOMAIN = b"custody/audit-checkpoint/v1\x00"
AUDIT_LABEL = b"custody/audit/v1"
EVENTS = {"REGISTER": 1, "DERIVE": 2, "ROTATE": 3, "SUSPEND": 4, "RESUME": 5,
          "RETIRE": 6, "REGION_ENABLE": 7, "REGION_DISABLE": 8}
STATES = {"ACTIVE": 1, "ROTATING": 2, "SUSPENDED": 3, "RETIRED": 4}
PURPOSES = {"TRADING": 1, "SETTLEMENT": 2, "AUDIT": 3, "BACKUP": 4}
COLUMNS = ["shard", "seq", "event", "asset_id", "counter", "state_at_event", "requester",
           "request_id", "ts_ms", "derivation_path", "purpose", "region", "ttl_s",
           "scheme_version", "rotation_id", "prev_hash", "hash"]


def text8(b):
    b = b[:255]
    return bytes([len(b)]) + b


def canonical(r):
    """The canonical encoding of a record (docs/audit.md, "The record"). Columns the
    encoding leaves out must be empty, or the record is not one custody wrote."""
    derive_columns = [r[k] for k in ("derivation_path", "purpose", "ttl_s", "scheme_version")]
    if r["event"] != "DERIVE" and any(v is not None for v in derive_columns):
        raise ValueError("a %s with derivation fields" % r["event"])
    if r["event"] not in ("DERIVE", "REGION_ENABLE", "REGION_DISABLE") and r["region"] is not None:
        raise ValueError("a %s with a region" % r["event"])
    if r["event"] != "ROTATE" and r["rotation_id"]:
        raise ValueError("a %s with a rotation id" % r["event"])
    out = struct.pack(">HQB", r["shard"], r["seq"], EVENTS[r["event"]])
    out += uuid.UUID(r["asset_id"]).bytes
    out += struct.pack(">QB", r["counter"], STATES[r["state_at_event"]])
    requester = r["requester"].encode("utf-8")[:65535]
    out += struct.pack(">H", len(requester)) + requester
    out += struct.pack(">QQ", r["request_id"] & 0xFFFFFFFFFFFFFFFF, r["ts_ms"])
    if r["event"] == "DERIVE":
        out += b"\x01" + text8(r["derivation_path"].encode("ascii"))
        out += bytes([PURPOSES[r["purpose"]]]) + text8(r["region"].encode("utf-8"))
        out += struct.pack(">IB", r["ttl_s"], r["scheme_version"])
    else:
        out += b"\x00"
    if r["rotation_id"]:
        out += b"\x01" + uuid.UUID(r["rotation_id"]).bytes
    else:
        out += b"\x00"
    if r["event"] in ("REGION_ENABLE", "REGION_DISABLE"):
        out += b"\x01" + text8(r["region"].encode("utf-8"))
    else:
        out += b"\x00"
    return out


def chain_hash(r, prev):
    return hashlib.sha256(RECORD_DOMAIN + canonical(r) + prev).digest()


def audit_key(seed):
    """KBKDF (SP 800-108, counter mode, HMAC-SHA256, one block) with the audit label."""
    message = struct.pack(">I", 1) + AUDIT_LABEL + b"\x00" + struct.pack(">I", 256)
    return hmac.new(seed, message, hashlib.sha256).digest()


def checkpoint_mac(key, shard, seq, h):
    return hmac.new(key, CHECKPOINT_DOMAIN + struct.pack(">HQ", shard, seq) + h,
                    hashlib.sha256).digest()


def read_sqlite(path):
    conn = sqlite3.connect("file:%s?mode=ro" % urllib.parse.quote(path), uri=True)
    conn.row_factory = sqlite3.Row
    records = [dict(row) for row in conn.execute(
        "SELECT %s FROM custody_audit_log ORDER BY shard, seq" % ", ".join(COLUMNS))]
    checkpoints = [dict(row) for row in conn.execute(
        "SELECT shard, seq, hash, mac FROM custody_audit_checkpoints ORDER BY shard, seq")]
    for r in records:
        for k in ("prev_hash", "hash"):
            v = r[k]
            r[k] = None if v is None else bytes(v) if isinstance(v, (bytes, memoryview)) \
                else str(v).encode()
    for c in checkpoints:
        c["hash"], c["mac"] = bytes(c["hash"]), bytes(c["mac"])
    return records, checkpoints


def read_tsv(records_file, checkpoints_file):
    def field(v):
        return None if v == "" else v

    ints = {"shard", "seq", "counter", "request_id", "ts_ms", "ttl_s", "scheme_version"}
    records = []
    with open(records_file, encoding="utf-8") as f:
        for line in f:
            values = line.rstrip("\n").split("\t")
            if len(values) != len(COLUMNS):
                raise ValueError("%s: a line with %d fields, not %d" %
                                 (records_file, len(values), len(COLUMNS)))
            r = {}
            for k, v in zip(COLUMNS, values):
                v = field(v)
                if v is not None and k in ints:
                    v = int(v)
                elif v is not None and k in ("prev_hash", "hash"):
                    v = bytes.fromhex(v)
                r[k] = v
            records.append(r)
    checkpoints = []
    with open(checkpoints_file, encoding="utf-8") as f:
        for line in f:
            shard, seq, h, mac = line.rstrip("\n").split("\t")
            checkpoints.append({"shard": int(shard), "seq": int(seq),
                                "hash": bytes.fromhex(h), "mac": bytes.fromhex(mac)})
    records.sort(key=lambda r: (r["shard"], r["seq"]))
    checkpoints.sort(key=lambda c: (c["shard"], c["seq"]))
    return records, checkpoints


def verify(records, checkpoints, key):
    findings = []
    report = {"records": len(records), "checkpoints": len(checkpoints), "shards": {},
              "macs_checked": key is not None}
    by_shard = {}
    for r in records:
        by_shard.setdefault(r["shard"], []).append(r)
    cps = {}
    for c in checkpoints:
        cps.setdefault(c["shard"], []).append(c)
    for shard in sorted(set(by_shard) | set(cps)):
        rows = by_shard.get(shard, [])
        hashes = {}
        prev = GENESIS
        chained = 0
        unchained = 0
        for i, r in enumerate(rows):
            where = "shard %d record %d" % (shard, r["seq"])
            if r["seq"] != i + 1:
                findings.append(("CHAIN_BROKEN", "%s: expected sequence number %d" % (where, i + 1)))
                break
            if r["hash"] is None:
                if chained:
                    findings.append(("CHAIN_BROKEN", "%s: no hash after chained records" % where))
                    break
                unchained += 1
                continue
            if r["prev_hash"] != prev:
                findings.append(("CHAIN_BROKEN", "%s: its previous hash does not link" % where))
                break
            try:
                h = chain_hash(r, prev)
            except (KeyError, ValueError, TypeError, AttributeError, struct.error) as e:
                findings.append(("CHAIN_BROKEN", "%s: its fields are not a record (%s)" % (where, e)))
                break
            if h != r["hash"]:
                findings.append(("CHAIN_BROKEN", "%s: its hash does not match its fields" % where))
                break
            hashes[r["seq"]] = h
            prev = h
            chained += 1
        covered = 0
        for c in cps.get(shard, []):
            where = "shard %d checkpoint %d" % (shard, c["seq"])
            if hashes.get(c["seq"]) != c["hash"]:
                findings.append(("CHAIN_BROKEN", "%s: does not match the record's hash" % where))
                continue
            if key is not None and not hmac.compare_digest(
                    checkpoint_mac(key, shard, c["seq"], c["hash"]), c["mac"]):
                findings.append(("CHAIN_BROKEN", "%s: its MAC does not verify" % where))
                continue
            covered = max(covered, c["seq"])
        report["shards"][str(shard)] = {
            "records": len(rows), "unchained_prefix": unchained, "chained": chained,
            "last_checkpoint": covered,
            "unauthenticated_tail": max(0, len(rows) - max(covered, unchained)),
        }
    report["findings"] = [{"kind": k, "detail": d} for k, d in findings]
    return report


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--sqlite", metavar="FILE")
    src.add_argument("--tsv", nargs=2, metavar=("RECORDS", "CHECKPOINTS"))
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed-file", metavar="FILE",
                      help="the root seed: 32 raw bytes or 64 hex digits")
    seed.add_argument("--seed-hex", metavar="HEX", help="the root seed, 64 hex digits")
    p.add_argument("--json", action="store_true")
    a = p.parse_args()
    key = None
    if a.seed_file or a.seed_hex:
        if a.seed_file:
            s = open(a.seed_file, "rb").read()
            if len(s) != 32:  # 64 hex digits, as `custody recover --write-seed` writes it
                s = bytes.fromhex(s.decode("ascii").strip())
        else:
            s = bytes.fromhex(a.seed_hex)
        if len(s) != 32:
            p.error("the seed is %d bytes, not 32" % len(s))
        key = audit_key(s)
    records, checkpoints = read_sqlite(a.sqlite) if a.sqlite else read_tsv(*a.tsv)
    report = verify(records, checkpoints, key)
    if a.json:
        print(json.dumps(report, indent=2))
    else:
        print("%d records, %d checkpoints, MACs %s" % (
            report["records"], report["checkpoints"],
            "checked" if key is not None else "not checked (no seed)"))
        for shard, s in report["shards"].items():
            print("shard %s: %d records (%d before the chain), checkpointed to %d, %d after" % (
                shard, s["records"], s["unchained_prefix"], s["last_checkpoint"],
                s["unauthenticated_tail"]))
        for f in report["findings"]:
            print("%s %s" % (f["kind"], f["detail"]))
        print("OK" if not report["findings"] else "FOUND %d" % len(report["findings"]))
    return 1 if report["findings"] else 0


if __name__ == "__main__":
    sys.exit(main())
