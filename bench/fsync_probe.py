#!/usr/bin/env python3
"""The disk's own fsync, beside a measurement or alone (issue 20).

    python3 bench/fsync_probe.py FILE SECONDS [--every-ms MS] [--cost N]

Every MS milliseconds (default 5) writes one 4 KiB page of FILE (a ring of 64 pages) and
fdatasyncs it, and prints the count, p50, p99 and worst fdatasync and how many took over
2 and 5 ms: run it beside a demo to tell the disk's stalls from the appliance's. With
--cost N it instead writes and syncs N times back to back and prints the CPU one commit
of a page costs (user and system, from getrusage): the floor under any design that makes
each acknowledgement durable on its own. FILE is removed afterwards.
"""
import os
import resource
import sys
import time

PAGE = b"\x01" * 4096
RING = 64


def open_ring(path):
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    os.ftruncate(fd, len(PAGE) * RING)
    for i in range(RING):
        os.pwrite(fd, PAGE, i * len(PAGE))
    os.fsync(fd)
    return fd


def probe(fd, seconds, every_ms):
    took = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        start = time.perf_counter()
        os.pwrite(fd, PAGE, (len(took) % RING) * len(PAGE))
        os.fdatasync(fd)
        took.append((time.perf_counter() - start) * 1e3)
        time.sleep(every_ms / 1e3)
    took.sort()
    n = len(took)
    print(
        f"probe: {n} fdatasyncs, p50 {took[n // 2]:.3f} ms p99 {took[n * 99 // 100]:.3f} ms "
        f"max {took[-1]:.3f} ms, >2ms {sum(t > 2 for t in took)}, >5ms {sum(t > 5 for t in took)}"
    )


def cost(fd, n):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for i in range(n):
        os.pwrite(fd, PAGE, (i % RING) * len(PAGE))
        os.fdatasync(fd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    user = (after.ru_utime - before.ru_utime) * 1e6 / n
    system = (after.ru_stime - before.ru_stime) * 1e6 / n
    print(f"one page written and fdatasynced: wall {wall * 1e6 / n:.1f} µs, CPU user {user:.1f} µs, system {system:.1f} µs")


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    path, seconds = argv[1], float(argv[2])
    every_ms = float(argv[argv.index("--every-ms") + 1]) if "--every-ms" in argv else 5.0
    fd = open_ring(path)
    try:
        if "--cost" in argv:
            cost(fd, int(argv[argv.index("--cost") + 1]))
        else:
            probe(fd, seconds, every_ms)
    finally:
        os.close(fd)
        os.unlink(path)


if __name__ == "__main__":
    main(sys.argv)
