"""The derivation of docs/derivation.md (scheme v1: NIST SP 800-108 KBKDF in counter
mode, HMAC-SHA256), for checking a key against a known seed: test seeds and vectors,
never a production seed outside the appliance."""

from __future__ import annotations

import hashlib
import hmac
import re
import struct

from .wire import AssetId, asset_bytes

LABEL = b"custody/derive/v1"
_PATH = re.compile(r"^m/44'/([0-9]+)'/([0-9]+)'/([0-9]+)'/([0-9]+)$")


def path_indices(path: str):
    """The five indices of a canonical-form path m/44'/c'/a'/ch'/i (hardened ones with
    bit 31 set)."""
    m = _PATH.match(path)
    if not m:
        raise ValueError("not a path m/44'/c'/a'/ch'/i: %r" % path)
    values = [int(v) for v in m.groups()]
    if any(v >= 1 << 31 for v in values):
        raise ValueError("a path index is 2^31 or more")
    c, a, ch, i = values
    return [0x8000002C, c | 0x80000000, a | 0x80000000, ch | 0x80000000, i]


def context(asset: AssetId, counter: int, path: str) -> bytes:
    return asset_bytes(asset) + struct.pack(">QB5I", counter, 5, *path_indices(path))


def derive(seed: bytes, asset: AssetId, counter: int, path: str) -> bytes:
    """The key the appliance derives for (asset, counter, path) from `seed`."""
    if len(seed) != 32:
        raise ValueError("a root seed is 32 bytes")
    message = struct.pack(">I", 1) + LABEL + b"\x00" + context(asset, counter, path) + struct.pack(">I", 256)
    return hmac.new(seed, message, hashlib.sha256).digest()
