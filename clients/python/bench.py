"""Derivations per second from one Python process, pipelined, against a running appliance.

    python3 clients/python/bench.py --addr 127.0.0.1:7443 --certs ./dev/certs [--seconds 10]
        [--window 2000] [--assets 200] [--sharded]

Registers --assets new assets, then keeps --window derivations in flight for --seconds
and prints the rate, the latency percentiles and this process's CPU per derivation. Each
asset takes its share of the rate: keep rate / assets under the appliance's rate limit
(`custodyd dev`: 1000/1s per requester and asset).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import custody  # noqa: E402


async def main(args: argparse.Namespace) -> dict:
    client = await custody.connect_async(args.addr, certs=args.certs, sharded=args.sharded)
    assets = [str(uuid.uuid4()) for _ in range(args.assets)]
    await asyncio.gather(*(client.register(a) for a in assets))
    latencies: list = []
    refused: dict = {}
    done = 0
    stop_at = 0.0

    async def worker(n: int) -> None:
        nonlocal done
        i = n
        while time.perf_counter() < stop_at:
            asset = assets[i % len(assets)]
            t0 = time.perf_counter()
            try:
                await client.derive(asset, "m/44'/0'/0'/0'/%d" % (i % 1000))
                latencies.append(time.perf_counter() - t0)
                done += 1
            except custody.Refused as e:
                refused[e.status_name] = refused.get(e.status_name, 0) + 1
            i += args.window

    # A second of warm-up, then the measured window.
    stop_at = time.perf_counter() + 1.0
    await asyncio.gather(*(worker(n) for n in range(args.window)))
    latencies.clear()
    done = 0
    refused.clear()
    cpu0, t0 = time.process_time(), time.perf_counter()
    stop_at = t0 + args.seconds
    await asyncio.gather(*(worker(n) for n in range(args.window)))
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
    await client.close()
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000 if latencies else float("nan")

    return {
        "derivations": done,
        "seconds": round(elapsed, 3),
        "derivations_per_s": round(done / elapsed),
        "p50_ms": round(pct(0.50), 3),
        "p99_ms": round(pct(0.99), 3),
        "max_ms": round(latencies[-1] * 1000, 3) if latencies else None,
        "python_cpu_us_per_derivation": round(cpu / max(done, 1) * 1e6, 1),
        "refused": refused,
        "window": args.window,
        "assets": args.assets,
        "sharded": args.sharded,
        "python": sys.version.split()[0],
    }


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--addr", default="127.0.0.1:7443")
    p.add_argument("--certs", default="./dev/certs")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--window", type=int, default=2000, help="derivations in flight")
    p.add_argument("--assets", type=int, default=200)
    p.add_argument("--sharded", action="store_true", help="route by HELLO's shard ports")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    result = asyncio.run(main(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(
            "%(derivations_per_s)d derivations/s from one Python %(python)s process "
            "(%(derivations)d in %(seconds)s s, %(window)d in flight over %(assets)d assets%(s)s): "
            "p50 %(p50_ms)s ms, p99 %(p99_ms)s ms, max %(max_ms)s ms; "
            "%(python_cpu_us_per_derivation)s us of Python CPU per derivation; refused %(refused)s"
            % dict(result, s=", shard-aware" if result["sharded"] else "")
        )
