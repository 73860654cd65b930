"""The custody wire protocol v3 (docs/protocol.md), sans I/O: frames, request bodies, reply
bodies, statuses and the shard hash. Every integer is big-endian."""

from __future__ import annotations

import enum
import struct
import uuid
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Tuple, Union

MAGIC = b"CSTD"
VERSION = 3
HEADER_LEN = 20
_HEADER = struct.Struct(">4sBBHQI")

#: The largest reply body the appliance sends is 8,965 bytes (a LIST_ASSETS page; any
#: other reply is at most 786, protocol.md §4.4); a reply announcing more than this is not
#: from a custody appliance.
MAX_REPLY_BODY = 64 * 1024

#: Fixed field limits (protocol.md §6).
PATH_MAX = 64
REGION_MAX = 32
SHARE_MAX = 160
LIST_ASSETS_PAGE_MAX = 256
#: An error reply's message (text16), and NOT_ACTIVE's active address (protocol.md §4.4).
MESSAGE_MAX = 512
ACTIVE_ADDRESS_MAX = 264

#: The status of a standby (protocol.md §5): its error reply names the active after the
#: message.
NOT_ACTIVE = 35


class Op(enum.IntEnum):
    HELLO = 0x01
    REGISTER = 0x02
    DERIVE = 0x03
    STATUS = 0x04
    SEAL = 0x05
    UNSEAL = 0x06
    SEAL_STATUS = 0x07
    ROTATE = 0x08
    SUSPEND = 0x09
    RESUME = 0x0A
    RETIRE = 0x0B
    SET_REGION = 0x0C
    REGIONS = 0x0D
    POLICY_RELOAD = 0x0E
    RECONCILE = 0x0F
    PROVE_RECEIPT = 0x10
    LIST_ASSETS = 0x11


#: Opcode of a connection-level refusal (CONNECTION_LIMIT), sent with request id 0.
CONNECTION_REFUSAL_OPCODE = 0x80

#: Every status (protocol.md §5): number -> name. Numbers are never reused.
STATUSES: Dict[int, str] = {
    0: "OK",
    1: "UNSUPPORTED_VERSION",
    2: "MALFORMED_FRAME",
    3: "FRAME_TOO_LARGE",
    4: "UNKNOWN_OPCODE",
    5: "BAD_BODY",
    6: "FRAME_TIMEOUT",
    10: "INVALID_ASSET_ID",
    11: "INVALID_PATH",
    12: "INVALID_REGION",
    13: "INVALID_PURPOSE",
    14: "INVALID_TTL",
    15: "INVALID_ROTATION_ID",
    16: "REGION_DISABLED",
    20: "UNKNOWN_ASSET",
    21: "ASSET_EXISTS",
    22: "ASSET_SUSPENDED",
    23: "ASSET_RETIRED",
    24: "COUNTER_MISMATCH",
    25: "ROTATION_ID_REUSED",
    26: "COUNTER_EXHAUSTED",
    27: "INVALID_TRANSITION",
    30: "BUSY",
    31: "STORE_UNAVAILABLE",
    32: "SEALED",
    33: "SHUTTING_DOWN",
    34: "CONNECTION_LIMIT",
    35: "NOT_ACTIVE",
    40: "FORBIDDEN",
    41: "RATE_LIMITED",
    50: "INTERNAL",
    60: "SHARE_INVALID",
    61: "SHARE_REPEATED",
    62: "SEED_MISMATCH",
    63: "ALREADY_UNSEALED",
    70: "POLICY_INVALID",
    71: "RELOAD_UNAVAILABLE",
}

#: Statuses after which the appliance closes the connection (framing, connection limit).
CLOSING_STATUSES = frozenset({1, 2, 3, 6, 34})


class Purpose(enum.IntEnum):
    TRADING = 1
    SETTLEMENT = 2
    AUDIT = 3
    BACKUP = 4


class AssetState(enum.IntEnum):
    ACTIVE = 1
    ROTATING = 2
    SUSPENDED = 3
    RETIRED = 4


class SealState(enum.IntEnum):
    UNSEALED = 1
    SERVING_STALE = 2
    SEALED = 3
    UNSEALING = 4
    SEALED_BY_OPERATOR = 5
    SEALED_BY_FAILURE = 6


class SealProvider(enum.IntEnum):
    DEV = 1
    PKCS11 = 2
    SHAMIR = 3


class Verdict(enum.IntEnum):
    PROVEN = 1
    UNAUTHENTICATED = 2
    MISMATCH = 3
    NOT_FOUND = 4
    BROKEN = 5


class ProtocolError(Exception):
    """Bytes from the appliance that are not a valid v3 frame or reply body."""


AssetId = Union[str, uuid.UUID, bytes]


def asset_bytes(asset: AssetId) -> bytes:
    """The 16 bytes of a UUID (text, uuid.UUID or 16 bytes), in RFC 4122 order."""
    if isinstance(asset, uuid.UUID):
        return asset.bytes
    if isinstance(asset, (bytes, bytearray)):
        if len(asset) != 16:
            raise ValueError("an asset id is 16 bytes")
        return bytes(asset)
    return uuid.UUID(asset).bytes


# ---------------------------------------------------------------------------- frames


def frame(opcode: int, request_id: int, body: bytes = b"") -> bytes:
    return _HEADER.pack(MAGIC, VERSION, opcode, 0, request_id, len(body)) + body


class FrameReader:
    """Splits received bytes into frames (opcode, request_id, body); raises
    ProtocolError on an invalid header."""

    def __init__(self, max_body: int = MAX_REPLY_BODY) -> None:
        self._buf = bytearray()
        self._max_body = max_body

    def feed(self, data: bytes) -> Iterator[Tuple[int, int, bytes]]:
        self._buf += data
        buf = self._buf
        at = 0
        try:
            while len(buf) - at >= HEADER_LEN:
                magic, version, opcode, flags, request_id, body_len = _HEADER.unpack_from(buf, at)
                if magic != MAGIC:
                    raise ProtocolError("reply frame with bad magic %r" % (magic,))
                if version != VERSION:
                    raise ProtocolError("reply frame of protocol version %d (this client speaks %d)" % (version, VERSION))
                if flags != 0:
                    raise ProtocolError("reply frame with flags %#06x" % flags)
                if body_len > self._max_body:
                    raise ProtocolError("reply body of %d bytes (at most %d)" % (body_len, self._max_body))
                end = at + HEADER_LEN + body_len
                if len(buf) < end:
                    break
                yield opcode, request_id, bytes(buf[at + HEADER_LEN : end])
                at = end
        finally:
            del buf[:at]


# ---------------------------------------------------------------------- field codecs


def _str8(text: str, limit: int, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > limit:
        raise ValueError("%s is longer than %d bytes" % (what, limit))
    return bytes([len(raw)]) + raw


class _Body:
    """Reads a reply body field by field; any shortfall or leftover is a ProtocolError."""

    __slots__ = ("b", "at")

    def __init__(self, body: bytes) -> None:
        self.b = body
        self.at = 0

    def take(self, n: int) -> bytes:
        if self.at + n > len(self.b):
            raise ProtocolError("reply body too short")
        v = self.b[self.at : self.at + n]
        self.at += n
        return v

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack(">Q", self.take(8))[0]

    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.take(16))

    def str8(self) -> str:
        return self.take(self.u8()).decode("ascii")

    def text16(self, limit: Optional[int] = None, what: str = "text") -> str:
        n = self.u16()
        if limit is not None and n > limit:
            raise ProtocolError("%s of %d bytes (at most %d)" % (what, n, limit))
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("%s is not UTF-8" % what) from None

    def end(self) -> None:
        if self.at != len(self.b):
            raise ProtocolError("reply body has %d trailing bytes" % (len(self.b) - self.at))


# ------------------------------------------------------------------ request bodies


def derive_body(asset: AssetId, path: str, region: str, purpose: Union[Purpose, int, str], ttl_s: int) -> bytes:
    if isinstance(purpose, str):
        purpose = Purpose[purpose]
    if not 0 <= ttl_s <= 0xFFFFFFFF:
        raise ValueError("ttl_s must fit in 32 bits")
    return (
        asset_bytes(asset)
        + _str8(path, PATH_MAX, "path")
        + _str8(region, REGION_MAX, "region")
        + struct.pack(">BI", int(purpose), ttl_s)
    )


def rotate_body(asset: AssetId, rotation_id: AssetId, expected_counter: Optional[int]) -> bytes:
    flags = 0 if expected_counter is None else 1
    return asset_bytes(asset) + asset_bytes(rotation_id) + struct.pack(">BQ", flags, expected_counter or 0)


def unseal_body(share: str, reset: bool) -> bytes:
    return bytes([1 if reset else 0]) + _str8(share, SHARE_MAX, "share")


def set_region_body(region: str, enabled: bool) -> bytes:
    return bytes([1 if enabled else 0]) + _str8(region, REGION_MAX, "region")


def list_assets_body(state: Optional[Union["AssetState", int, str]], after: Optional[AssetId], limit: int) -> bytes:
    if isinstance(state, str):
        state = AssetState[state]
    if not 1 <= limit <= LIST_ASSETS_PAGE_MAX:
        raise ValueError("limit must be 1 to %d" % LIST_ASSETS_PAGE_MAX)
    after_bytes = bytes(16) if after is None else asset_bytes(after)
    return bytes([0 if state is None else int(state)]) + after_bytes + struct.pack(">H", limit)


def prove_body(shard: int, seq: int, hash_: bytes) -> bytes:
    if len(hash_) != 32:
        raise ValueError("a receipt hash is 32 bytes")
    return struct.pack(">HQ", shard, seq) + bytes(hash_)


# -------------------------------------------------------------------- reply bodies


@dataclass(frozen=True)
class Hello:
    version: int
    shard_count: int
    shard_hash: int
    max_frame_body_bytes: int
    max_inflight_per_connection: int
    shard_ports: List[int]


@dataclass(frozen=True)
class AssetInfo:
    asset: uuid.UUID
    state: AssetState
    counter: int
    shard: int


@dataclass(frozen=True)
class ListedAsset:
    asset: uuid.UUID
    state: AssetState
    counter: int
    shard: int
    changed_unix_ms: int


@dataclass(frozen=True)
class AssetPage:
    assets: List[ListedAsset]
    more: bool


@dataclass(frozen=True)
class Receipt:
    shard: int
    seq: int
    hash: bytes


@dataclass(frozen=True)
class Derived:
    counter: int
    scheme_version: int
    key: bytes
    receipt: Receipt

    def __repr__(self) -> str:  # never print a key by accident
        return "Derived(counter=%d, scheme_version=%d, key=<32 bytes>, receipt=%r)" % (
            self.counter,
            self.scheme_version,
            self.receipt,
        )


@dataclass(frozen=True)
class Rotated:
    asset: uuid.UUID
    rotation_id: uuid.UUID
    counter: int
    previous_counter: int
    receipt: Receipt
    replayed: bool


@dataclass(frozen=True)
class SealInfo:
    state: SealState
    provider: SealProvider
    shares_received: int
    threshold: int
    shares: int
    since_unix_ms: int
    key_unsealed_unix_ms: int
    calls_ok: int
    calls_failed: int
    calls_timed_out: int
    breaker_opened: int
    fingerprint: bytes
    reason: str


@dataclass(frozen=True)
class PolicyReloaded:
    generation: int
    identities: int
    regions: int
    asset_groups: int


@dataclass(frozen=True)
class Reconciled:
    records_checked: int
    checkpoints_checked: int
    assets_checked: int
    assets_drifted: int
    macs_checked: bool
    findings_total: int
    findings: List[str]


@dataclass(frozen=True)
class Proof:
    verdict: Verdict
    checkpoint_seq: int
    detail: str


@dataclass(frozen=True)
class ErrorReply:
    status: int
    retry_after_ms: int
    message: str
    #: NOT_ACTIVE only: the active appliance's client address (``host:port``), when the
    #: standby knows it; None otherwise.
    active: Optional[str] = None


def status_of(body: bytes) -> int:
    if len(body) < 2:
        raise ProtocolError("reply body too short for a status")
    return struct.unpack_from(">H", body)[0]


def decode_error(body: bytes) -> ErrorReply:
    """An error reply (protocol.md §4.4): status, retry_after_ms, message; NOT_ACTIVE adds
    the active's address (length 0: unknown)."""
    r = _Body(body)
    status = r.u16()
    if status == 0:
        raise ProtocolError("an OK reply is not an error reply")
    retry = r.u32()
    message = r.text16(MESSAGE_MAX, "error message")
    active = None
    if status == NOT_ACTIVE:
        active = r.text16(ACTIVE_ADDRESS_MAX, "active address") or None
    r.end()
    return ErrorReply(status, retry, message, active)


def error_body(status: int, message: str, retry_after_ms: int = 0, active: Optional[str] = None) -> bytes:
    """An error reply body as the appliance writes it (for tests and fake servers)."""
    raw = message.encode("utf-8")
    out = struct.pack(">HIH", status, retry_after_ms, len(raw)) + raw
    if status == NOT_ACTIVE:
        addr = (active or "").encode("utf-8")
        out += struct.pack(">H", len(addr)) + addr
    return out


def _ok(body: bytes) -> _Body:
    r = _Body(body)
    if r.u16() != 0:
        raise ProtocolError("not an OK reply")
    return r


def decode_hello(body: bytes) -> Hello:
    r = _ok(body)
    version, shards, hash_, max_body, inflight, ports = r.u8(), r.u16(), r.u8(), r.u32(), r.u32(), r.u16()
    out = Hello(version, shards, hash_, max_body, inflight, [r.u16() for _ in range(ports)])
    r.end()
    return out


def decode_asset(body: bytes) -> AssetInfo:
    r = _ok(body)
    asset = r.uuid()
    state = r.u8()
    out = AssetInfo(asset, _enum(AssetState, state, "asset state"), r.u64(), r.u16())
    r.end()
    return out


_LISTED = struct.Struct(">16sBQHQ")


def decode_asset_page(body: bytes) -> AssetPage:
    r = _ok(body)
    n = r.u16()
    if n > LIST_ASSETS_PAGE_MAX:
        raise ProtocolError("a page of %d assets" % n)
    assets = []
    for _ in range(n):
        raw, state, counter, shard, changed = _LISTED.unpack(r.take(_LISTED.size))
        assets.append(ListedAsset(uuid.UUID(bytes=raw), _enum(AssetState, state, "asset state"), counter, shard, changed))
    more = r.u8()
    if more > 1:
        raise ProtocolError("more is %d" % more)
    r.end()
    return AssetPage(assets, more == 1)


_DERIVED = struct.Struct(">HQB32sHQ32s")


def decode_derived(body: bytes) -> Derived:
    # The hot path: one unpack.
    if len(body) != _DERIVED.size:
        raise ProtocolError("DERIVE reply of %d bytes (85 expected)" % len(body))
    status, counter, scheme, key, shard, seq, hash_ = _DERIVED.unpack(body)
    if status != 0:
        raise ProtocolError("not an OK reply")
    return Derived(counter, scheme, key, Receipt(shard, seq, hash_))


def decode_rotated(body: bytes) -> Rotated:
    r = _ok(body)
    asset, rotation, counter, previous = r.uuid(), r.uuid(), r.u64(), r.u64()
    receipt = Receipt(r.u16(), r.u64(), r.take(32))
    out = Rotated(asset, rotation, counter, previous, receipt, r.u8() == 1)
    r.end()
    return out


def decode_seal(body: bytes) -> SealInfo:
    r = _ok(body)
    state, provider = r.u8(), r.u8()
    received, threshold, shares = r.u8(), r.u8(), r.u8()
    counts = [r.u64() for _ in range(6)]
    fingerprint = r.take(16)
    out = SealInfo(
        _enum(SealState, state, "seal state"),
        _enum(SealProvider, provider, "seal provider"),
        received,
        threshold,
        shares,
        *counts,
        fingerprint,
        r.text16(),
    )
    r.end()
    return out


def decode_regions(body: bytes) -> List[Tuple[str, bool]]:
    r = _ok(body)
    out = [(r.str8(), r.u8() == 1) for _ in range(r.u8())]
    r.end()
    return out


def decode_policy(body: bytes) -> PolicyReloaded:
    r = _ok(body)
    out = PolicyReloaded(r.u64(), r.u32(), r.u16(), r.u16())
    r.end()
    return out


def decode_reconciled(body: bytes) -> Reconciled:
    r = _ok(body)
    records, checkpoints, assets, drifted = r.u64(), r.u64(), r.u64(), r.u64()
    macs, total = r.u8() == 1, r.u32()
    findings = [r.text16() for _ in range(r.u8())]
    r.end()
    return Reconciled(records, checkpoints, assets, drifted, macs, total, findings)


def decode_proof(body: bytes) -> Proof:
    r = _ok(body)
    verdict = _enum(Verdict, r.u8(), "verdict")
    out = Proof(verdict, r.u64(), r.text16())
    r.end()
    return out


def _enum(kind, value: int, what: str):
    try:
        return kind(value)
    except ValueError:
        raise ProtocolError("unknown %s %d" % (what, value)) from None


# ---------------------------------------------------------------------- shard hash


def fnv1a64(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


def jump(key: int, buckets: int) -> int:
    b, j = -1, 0
    while j < max(buckets, 1):
        b = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((b + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return b


def shard_of(asset: AssetId, shard_count: int) -> int:
    """The shard that owns an asset (protocol.md §9)."""
    return jump(fnv1a64(asset_bytes(asset)), shard_count)
