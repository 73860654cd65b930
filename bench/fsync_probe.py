#!/usr/bin/env python3
"""How long the disk takes to make a small write durable, sampled every 2 ms.

Writes 8 KiB and calls fdatasync in a loop for SECONDS, prints every call over 20 ms with
its wall-clock time (to line up with an appliance's commit stats), then p50, p99 and max.
Run it beside a load run to see whether commit stalls are the disk's.

    python3 bench/fsync_probe.py [DIRECTORY] [SECONDS]
"""
import os
import sys
import time

directory = sys.argv[1] if len(sys.argv) > 1 else "/var/lib/postgresql"
seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 12.0
path = os.path.join(directory, "custody-fsync-probe")
fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
buf = b"x" * 8192
lat = []
end = time.time() + seconds
i = 0
try:
    while time.time() < end:
        os.pwrite(fd, buf, (i % 1000) * 8192)
        i += 1
        t = time.perf_counter()
        os.fdatasync(fd)
        ms = (time.perf_counter() - t) * 1000
        lat.append(ms)
        if ms > 20:
            print(f"  fdatasync {ms:.1f} ms at {time.time():.3f}")
        time.sleep(0.002)
finally:
    os.close(fd)
    os.unlink(path)
lat.sort()
n = len(lat)
print(f"{n} fdatasync calls: p50 {lat[n // 2]:.3f} ms, p99 {lat[n * 99 // 100]:.3f} ms, max {lat[-1]:.1f} ms")
