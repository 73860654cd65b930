#!/usr/bin/env python3
"""How long the disk takes to make a small write durable, sampled every 2 ms.

Writes 8 KiB and calls fdatasync in a loop for SECONDS, prints every call over 20 ms with
its wall-clock time (to line up with an appliance's commit stats), then p50, p99, max and
how many calls took over 2 and 5 ms. Run it beside a load run to see whether commit stalls
are the disk's.

    python3 bench/fsync_probe.py [DIRECTORY] [SECONDS] [--every-ms MS] [--cost N]

--every-ms MS samples every MS ms instead of 2. --cost N instead writes one 4 KiB page (a
WAL frame's size) and syncs it N times back to back and prints the CPU one such commit
costs (user and system, from getrusage): the floor under any design that makes each
acknowledgement durable on its own.
"""
import os
import resource
import sys
import time


def option(name, default):
    return float(sys.argv[sys.argv.index(name) + 1]) if name in sys.argv else default


args = [a for i, a in enumerate(sys.argv[1:], 1)
        if not a.startswith("--") and not sys.argv[i - 1].startswith("--")]
directory = args[0] if len(args) > 0 else "/var/lib/postgresql"
seconds = float(args[1]) if len(args) > 1 else 12.0
every_s = option("--every-ms", 2.0) / 1000
cost_n = int(option("--cost", 0))
path = os.path.join(directory, "custody-fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
buf = b"x" * 8192
lat = []
end = time.time() + seconds
i = 0
try:
    if cost_n:
        before = resource.getrusage(resource.RUSAGE_SELF)
        for i in range(cost_n):
            os.pwrite(fd, buf[:4096], (i % 1000) * 4096)
            os.fdatasync(fd)
        after = resource.getrusage(resource.RUSAGE_SELF)
        user = (after.ru_utime - before.ru_utime) * 1e6 / cost_n
        system = (after.ru_stime - before.ru_stime) * 1e6 / cost_n
        print(f"one 4 KiB page written and fdatasynced: CPU user {user:.1f} µs, system {system:.1f} µs")
        sys.exit(0)
    while time.time() < end:
        os.pwrite(fd, buf, (i % 1000) * 8192)
        i += 1
        t = time.perf_counter()
        os.fdatasync(fd)
        ms = (time.perf_counter() - t) * 1000
        lat.append(ms)
        if ms > 20:
            print(f"  fdatasync {ms:.1f} ms at {time.time():.3f}")
        time.sleep(every_s)
finally:
    os.close(fd)
    os.unlink(path)
lat.sort()
n = len(lat)
print(f"{n} fdatasync calls: p50 {lat[n // 2]:.3f} ms, p99 {lat[n * 99 // 100]:.3f} ms, max {lat[-1]:.1f} ms, "
      f"over 2 ms {sum(t > 2 for t in lat)}, over 5 ms {sum(t > 5 for t in lat)}")
