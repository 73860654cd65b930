"""A real development appliance (`custodyd dev`) for the tests, started by them."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

REPO = HERE.parent.parent.parent
BIN = Path(os.environ.get("CUSTODY_BIN_DIR", REPO / "target" / "release"))


#: Ports the tests take, below the kernel's ephemeral range (a port bind(0) hands out may
#: be handed out again as the local port of an outgoing connection before custodyd binds
#: it) and below the Rust tests' pool, which starts at 12000 (src/net.rs).
PORTS = (10000, 12000)
_next = [PORTS[0] + (os.getpid() * 7) % (PORTS[1] - PORTS[0] - 100)]


def free_ports(n: int) -> int:
    """The first of n consecutive free loopback ports (checked by binding each)."""
    for _ in range(PORTS[1] - PORTS[0]):
        base = _next[0]
        _next[0] = base + n if base + 2 * n < PORTS[1] else PORTS[0]
        sockets = []
        try:
            for p in range(base, base + n):
                t = socket.socket()
                sockets.append(t)
                t.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for t in sockets:
                t.close()
    raise RuntimeError("no free ports in %d-%d" % PORTS)


class DevAppliance:
    """`custodyd dev` on free ports in a state directory that outlives restarts."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        base = free_ports(3)
        self.port = base
        self.addr = "127.0.0.1:%d" % base
        self.shard_base = base + 1
        self.admin = "127.0.0.1:%d" % free_ports(1)
        self.certs = str(state_dir / "certs")
        self.proc = None
        # Development certificates written before the appliance (which keeps them), with
        # a second identity that holds no role.
        subprocess.run(
            [str(BIN / "custody"), "dev-certs", self.certs, "--client-cn", "custody-dev-client", "--more-clients", "nobody"],
            check=True,
            stdout=subprocess.DEVNULL,
        )

    def start(self) -> None:
        log = open(self.state_dir / "custodyd.log", "ab")
        self.proc = subprocess.Popen(
            [
                str(BIN / "custodyd"), "dev",
                "--state-dir", str(self.state_dir),
                "--listen", self.addr,
                "--shard-listen", "127.0.0.1:%d" % self.shard_base,
                "--admin-listen", self.admin,
                "--cores", "2",
            ],
            stdout=log,
            stderr=log,
        )
        deadline = time.time() + 60
        while True:
            assert self.proc.poll() is None, "custodyd dev exited: %s" % self.log()
            try:
                with urllib.request.urlopen("http://%s/readyz" % self.admin, timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            assert time.time() < deadline, "custodyd dev not ready within 60 s: %s" % self.log()
            time.sleep(0.1)

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=30)

    def log(self) -> str:
        return (self.state_dir / "custodyd.log").read_text(errors="replace")[-4000:]

    def seed(self) -> bytes:
        return (self.state_dir / "dev-seed.bin").read_bytes()

    def nobody(self) -> dict:
        d = Path(self.certs)
        return dict(ca=str(d / "ca.pem"), cert=str(d / "clients" / "nobody.pem"), key=str(d / "clients" / "nobody.key"))


@pytest.fixture(scope="session")
def appliance(tmp_path_factory):
    if not (BIN / "custodyd").exists():
        pytest.fail("%s not found: cargo build --release first (or set CUSTODY_BIN_DIR)" % (BIN / "custodyd"))
    app = DevAppliance(tmp_path_factory.mktemp("custody-dev"))
    app.start()
    yield app
    assert app.stop() == 0, app.log()
