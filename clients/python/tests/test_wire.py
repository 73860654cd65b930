"""The codec alone, against docs/protocol.md and docs/derivation.md."""

import re
import shutil
import subprocess
import uuid

import pytest
from conftest import REPO

from custody import errors, kdf, wire


def test_the_derive_request_is_the_worked_example_byte_for_byte():
    body = wire.derive_body("6ba7b810-9dad-41d1-80b4-00c04fd430c8", "m/44'/0'/0'/0'/7", "US-EAST", "TRADING", 300)
    frame = wire.frame(wire.Op.DERIVE, 1, body)
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = doc[doc.index("### DERIVE request") :]
    dump = section[section.index("```text") + 7 : section.index("```", section.index("```text") + 7)]
    expected = bytes.fromhex("".join(line.split("|")[0][10:] for line in dump.strip().splitlines()))
    assert frame == expected


def test_the_shard_hash_gives_the_pinned_values():
    pinned = {
        "6ba7b810-9dad-11d1-80b4-00c04fd430c8": [0, 0, 0, 0, 0, 0, 0, 0],
        "0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d": [0, 0, 2, 2, 2, 2, 2, 2],
        "123e4567-e89b-42d3-a456-426614174000": [0, 1, 2, 2, 2, 2, 2, 2],
        "6ba7b810-9dad-41d1-80b4-00c04fd430c8": [0, 0, 2, 3, 3, 3, 3, 3],
    }
    for asset, shards in pinned.items():
        assert [wire.shard_of(asset, n) for n in range(1, 9)] == shards


def vectors():
    doc = (REPO / "docs" / "derivation.md").read_text()
    block = doc[doc.index("<!-- kdf-vectors-v1:begin -->") : doc.index("<!-- kdf-vectors-v1:end -->")]
    out = [dict(f.split("=", 1) for f in line.split(" ")) for line in block.splitlines() if line.startswith("seed=")]
    assert len(out) >= 10
    return out


def test_the_kdf_gives_every_vector_of_the_derivation_doc():
    for v in vectors():
        assert kdf.context(v["asset"], int(v["counter"]), v["path"]).hex() == v["context"]
        assert kdf.derive(bytes.fromhex(v["seed"]), v["asset"], int(v["counter"]), v["path"]).hex() == v["key"]


def openssl_kdf(seed: bytes, asset: str, counter: int, path: str) -> str:
    """The key from `openssl kdf` (docs/derivation.md, "Checking a key with OpenSSL")."""
    out = subprocess.run(
        [
            "openssl", "kdf", "-keylen", "32", "-kdfopt", "mac:HMAC", "-kdfopt", "digest:SHA2-256",
            "-kdfopt", "hexkey:" + seed.hex(), "-kdfopt", "hexsalt:" + kdf.LABEL.hex(),
            "-kdfopt", "hexinfo:" + kdf.context(asset, counter, path).hex(), "KBKDF",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return out.strip().replace(":", "").lower()


def require_openssl():
    if shutil.which("openssl") is None:
        pytest.fail("the openssl command is needed (the independent check of the keys)")


def test_openssl_agrees_with_the_vectors():
    require_openssl()
    for v in vectors()[:4]:
        assert openssl_kdf(bytes.fromhex(v["seed"]), v["asset"], int(v["counter"]), v["path"]) == v["key"]


def test_every_status_has_its_exception_class_and_family():
    assert errors.BY_STATUS[11] is errors.InvalidPath
    assert issubclass(errors.InvalidPath, errors.InvalidRequest)
    assert issubclass(errors.RateLimited, errors.Retryable)
    assert issubclass(errors.AssetSuspended, errors.StateRefused)
    assert errors.BY_STATUS[40] is errors.Forbidden
    e = errors.refusal(41, "slow down", 250)
    assert (e.status, e.status_name, e.message, e.retry_after_ms) == (41, "RATE_LIMITED", "slow down", 250)
    # A status this client does not know yet is still a refusal.
    assert isinstance(errors.refusal(99, "new"), errors.Refused)
    # The table matches docs/protocol.md §5.
    doc = (REPO / "docs" / "protocol.md").read_text()
    section = doc[doc.index("## 5. Statuses") : doc.index("## 6. Limits")]
    table = dict((int(n), name) for n, name in re.findall(r"^\| (\d+) \| ([A-Z_]+) \|", section, re.M))
    assert table == wire.STATUSES


def test_the_frame_reader_splits_frames_and_refuses_bad_headers():
    r = wire.FrameReader()
    a = wire.frame(0x81, 7, b"\x00\x00abc")
    b = wire.frame(0x83, 8, b"\x00\x01")
    got = list(r.feed(a + b[:5])) + list(r.feed(b[5:]))
    assert got == [(0x81, 7, b"\x00\x00abc"), (0x83, 8, b"\x00\x01")]
    with pytest.raises(wire.ProtocolError):
        list(wire.FrameReader().feed(b"XSTD" + bytes(16)))
    with pytest.raises(wire.ProtocolError):
        list(wire.FrameReader().feed(wire.frame(0x81, 1, b"")[:4] + b"\x02" + bytes(15)))
    with pytest.raises(wire.ProtocolError):
        list(wire.FrameReader().feed(b"CSTD\x03\x81\x00\x00" + bytes(8) + b"\xff\xff\xff\xff"))


def test_bodies_are_checked_before_they_are_sent():
    with pytest.raises(ValueError):
        wire.derive_body(uuid.uuid4(), "m/" + "1" * 70, "US-EAST", 1, 300)
    with pytest.raises(ValueError):
        wire.asset_bytes("not a uuid")
    with pytest.raises(wire.ProtocolError):
        wire.decode_asset(b"\x00\x00" + bytes(10))


def not_active_body(message: bytes, active: bytes, retry_after_ms: int = 0) -> bytes:
    """A NOT_ACTIVE error reply body written by hand from docs/protocol.md §4.4: u16 status,
    u32 retry_after_ms, u16 message_len + message, u16 active_len + active."""
    return (
        (35).to_bytes(2, "big")
        + retry_after_ms.to_bytes(4, "big")
        + len(message).to_bytes(2, "big")
        + message
        + len(active).to_bytes(2, "big")
        + active
    )


def test_a_not_active_reply_names_the_active():
    body = not_active_body(b"this appliance is a standby", b"custody-b.example:7443", 5)
    e = wire.decode_error(body)
    assert (e.status, e.retry_after_ms, e.message, e.active) == (35, 5, "this appliance is a standby", "custody-b.example:7443")
    assert wire.error_body(35, "this appliance is a standby", 5, "custody-b.example:7443") == body
    # Length 0: the standby does not know the active.
    unknown = wire.decode_error(not_active_body(b"standby", b""))
    assert unknown.active is None
    # The longest of both fields decode.
    longest = wire.decode_error(not_active_body("é".encode() * 256, b"h" * 258 + b":65535"))
    assert len(longest.message.encode()) == 512 and len(longest.active) == 264
    # Every other status has no address field: its bytes would be trailing.
    assert wire.decode_error(wire.error_body(41, "slow down", 250)).active is None
    with pytest.raises(wire.ProtocolError):
        wire.decode_error(wire.error_body(41, "slow down") + b"\x00\x00")


def test_a_not_active_reply_out_of_its_bounds_is_refused():
    ok = not_active_body(b"standby", b"a:1")
    for bad in [
        not_active_body(b"standby", b"h" * 265),  # active over 264 bytes
        not_active_body(b"m" * 513, b"a:1"),  # message over 512 bytes
        not_active_body(b"standby", b"\xff\xfe"),  # active not UTF-8
        ok[:-1],  # active cut short
        ok[: 8 + 7],  # no active_len at all
        ok + b"x",  # trailing byte
        (35).to_bytes(2, "big") + bytes(4) + b"\x00\x07standby" + b"\xff\xff",  # 65535 announced
    ]:
        with pytest.raises(wire.ProtocolError):
            wire.decode_error(bad)


def test_not_active_is_a_retryable_refusal_that_carries_the_active():
    assert errors.BY_STATUS[35] is errors.NotActive
    assert issubclass(errors.NotActive, errors.Retryable) and issubclass(errors.NotActive, errors.Refused)
    e = errors.refusal(35, "standby", 0, wire.Op.DERIVE, "b:7443")
    assert isinstance(e, errors.NotActive)
    assert (e.status, e.status_name, e.active, e.opcode) == (35, "NOT_ACTIVE", "b:7443", wire.Op.DERIVE)
    assert "b:7443" in str(e)
    assert errors.refusal(35, "standby").active is None
    u = errors.OutcomeUnknown("a:7443", wire.Op.DERIVE)
    assert isinstance(u, errors.ConnectionClosed) and (u.endpoint, u.opcode) == ("a:7443", wire.Op.DERIVE)
    assert "DERIVE" in str(u) and "a:7443" in str(u)
