//! The operations' codecs against docs/protocol.md: round trips, every refusal typed,
//! the documented dumps byte for byte, and the fuzz entry point on garbage.

use super::list_assets::LISTED_ASSET_BYTES;
use super::*;
use crate::bounds;
use crate::lifecycle::AssetState;
use crate::wire::*;

fn derive_body() -> DeriveBody {
    DeriveBody {
        asset: Uuid::from_bytes([0x11; 16]),
        path: "m/44'/0'/0'/0'/7".into(),
        region: "US-EAST".into(),
        purpose: 1,
        ttl_s: 300,
    }
}

#[test]
fn header_layout_is_byte_exact() {
    let mut out = Vec::new();
    Request::Status {
        asset: Uuid::from_bytes([0xAB; 16]),
    }
    .encode(0x0102030405060708, &mut out);
    assert_eq!(
        &out[..HEADER_LEN],
        &[
            0x43, 0x53, 0x54, 0x44, // "CSTD"
            0x03, // version
            0x04, // STATUS
            0x00, 0x00, // flags
            0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07, 0x08, // request id
            0x00, 0x00, 0x00, 0x10, // body length 16
        ]
    );
    assert_eq!(out.len(), HEADER_LEN + 16);
}

#[test]
fn request_round_trip() {
    for req in [
        Request::Hello,
        Request::Register {
            asset: Uuid::from_bytes([7; 16]),
        },
        Request::Status {
            asset: Uuid::from_bytes([9; 16]),
        },
        Request::Derive(derive_body()),
        Request::Seal,
        Request::SealStatus,
        Request::Suspend {
            asset: Uuid::from_bytes([4; 16]),
        },
        Request::Resume {
            asset: Uuid::from_bytes([5; 16]),
        },
        Request::Retire {
            asset: Uuid::from_bytes([6; 16]),
        },
        Request::Rotate(RotateBody {
            asset: Uuid::from_bytes([7; 16]),
            rotation_id: Uuid::from_bytes([8; 16]),
            expected_counter: None,
        }),
        Request::Regions,
        Request::SetRegion {
            region: "EU-WEST".into(),
            enabled: false,
        },
        Request::Rotate(RotateBody {
            asset: Uuid::from_bytes([7; 16]),
            rotation_id: Uuid::from_bytes([8; 16]),
            expected_counter: Some(u64::MAX),
        }),
        Request::Unseal {
            reset: false,
            share: ShareText::new(""),
        },
        Request::Unseal {
            reset: true,
            share: ShareText::new("custody-share/1:5b0d:3:1:00ff:0a0b0c0d"),
        },
    ] {
        let mut out = Vec::new();
        req.encode(42, &mut out);
        let frame = decode_frame(&out, 1024).unwrap().unwrap();
        assert_eq!(frame.consumed, out.len());
        assert_eq!(frame.header.request_id, 42);
        assert_eq!(
            Request::decode(frame.header.opcode, frame.body).unwrap(),
            req
        );
    }
}

#[test]
fn every_prefix_is_incomplete_not_invalid() {
    let mut out = Vec::new();
    Request::Derive(derive_body()).encode(1, &mut out);
    for end in 0..out.len() {
        assert_eq!(decode_frame(&out[..end], 1024), Ok(None), "prefix {end}");
    }
    assert!(decode_frame(&out, 1024).unwrap().is_some());
}

#[test]
fn invalid_headers_are_refused_early() {
    assert_eq!(decode_frame(b"CSX", 1024), Err(WireError::BadMagic));
    assert_eq!(
        decode_frame(b"GET / HTTP/1.1", 1024),
        Err(WireError::BadMagic)
    );
    assert_eq!(
        decode_frame(b"CSTD\x01", 1024),
        Err(WireError::UnsupportedVersion(1))
    );
    let mut out = Vec::new();
    Request::Hello.encode(1, &mut out);
    out[6] = 0x80;
    assert_eq!(
        decode_frame(&out, 1024),
        Err(WireError::ReservedFlags(0x8000))
    );
    // An oversized frame is refused from its header alone.
    let mut big = Vec::new();
    FrameHeader {
        opcode: 1,
        request_id: 1,
        body_len: 4097,
    }
    .encode(&mut big);
    assert_eq!(
        decode_frame(&big, 4096),
        Err(WireError::TooLarge {
            len: 4097,
            max: 4096
        })
    );
}

#[test]
fn bad_bodies_are_typed() {
    assert_eq!(
        Request::decode(0x7f, &[]),
        Err(WireError::UnknownOpcode(0x7f))
    );
    assert_eq!(
        Request::decode(Opcode::Status as u8, &[0; 15]),
        Err(WireError::Truncated {
            field: "asset_id",
            needed: 1
        })
    );
    assert_eq!(
        Request::decode(Opcode::Status as u8, &[0; 17]),
        Err(WireError::TrailingBytes(1))
    );
    let mut out = Vec::new();
    let mut body = derive_body();
    body.path = "m/44'/0'/0'/0'/\u{7}".into();
    Request::Derive(body).encode(1, &mut out);
    assert_eq!(
        Request::decode(Opcode::Derive as u8, &out[HEADER_LEN..]),
        Err(WireError::BadField {
            field: "path",
            reason: "not printable ASCII"
        })
    );
    for e in [
        WireError::TrailingBytes(1),
        WireError::Truncated {
            field: "x",
            needed: 1,
        },
    ] {
        assert_eq!(e.status(), Status::BadBody);
    }
}

#[test]
fn unseal_bodies_are_checked() {
    // Reserved flag bits, an over-long share, a share that is not printable ASCII.
    assert_eq!(
        Request::decode(Opcode::Unseal as u8, &[0x02, 0]),
        Err(WireError::BadField {
            field: "flags",
            reason: "reserved bits set"
        })
    );
    let mut long = vec![0u8, (bounds::SHARE_TEXT_BYTES_MAX + 1) as u8];
    long.extend(std::iter::repeat(b'a').take(bounds::SHARE_TEXT_BYTES_MAX + 1));
    assert_eq!(
        Request::decode(Opcode::Unseal as u8, &long),
        Err(WireError::BadField {
            field: "share",
            reason: "longer than its limit"
        })
    );
    assert_eq!(
        Request::decode(Opcode::Unseal as u8, &[0, 2, b'a', b' ']),
        Err(WireError::BadField {
            field: "share",
            reason: "not printable ASCII"
        })
    );
    assert_eq!(
        Request::decode(Opcode::Seal as u8, &[0]),
        Err(WireError::TrailingBytes(1))
    );
    // The share never shows in a Debug print of the request.
    let req = Request::Unseal {
        reset: false,
        share: ShareText::new("custody-share/1:secret-part"),
    };
    assert!(!format!("{req:?}").contains("secret-part"));
}

#[test]
fn rotate_bodies_are_checked() {
    let mut body = vec![0u8; 41];
    body[32] = 0x02;
    assert_eq!(
        Request::decode(Opcode::Rotate as u8, &body),
        Err(WireError::BadField {
            field: "flags",
            reason: "reserved bits set"
        })
    );
    body[32] = 0;
    assert_eq!(
        Request::decode(Opcode::Rotate as u8, &body[..40]),
        Err(WireError::Truncated {
            field: "expected_counter",
            needed: 1
        })
    );
    // Without the flag the expected counter must be zero (one encoding per request).
    body[32] = 0;
    body[40] = 9;
    assert_eq!(
        Request::decode(Opcode::Rotate as u8, &body),
        Err(WireError::BadField {
            field: "expected_counter",
            reason: "non-zero without the EXPECTED flag"
        })
    );
    body[40] = 0;
    assert!(matches!(
        Request::decode(Opcode::Rotate as u8, &body),
        Ok(Request::Rotate(RotateBody {
            expected_counter: None,
            ..
        }))
    ));
    let mut reply = Vec::new();
    Reply::Rotated(Rotated {
        asset: Uuid::nil(),
        rotation_id: Uuid::nil(),
        counter: 1,
        previous_counter: 0,
        receipt: Receipt {
            shard: 0,
            seq: 1,
            hash: [0xab; 32],
        },
        replayed: false,
    })
    .encode(Opcode::Rotate as u8, 1, &mut reply);
    let last = reply.len() - 1;
    reply[last] = 2;
    assert!(Reply::decode(Opcode::Rotate, &reply[HEADER_LEN..]).is_err());
}

#[test]
fn list_assets_round_trips_and_checks_its_fields() {
    let request = Request::ListAssets(ListAssets {
        state: Some(AssetState::Suspended),
        after: Uuid::from_bytes([7; 16]),
        limit: 256,
    });
    let mut frame = Vec::new();
    request.encode(9, &mut frame);
    assert_eq!(frame.len(), HEADER_LEN + 19);
    assert_eq!(Request::decode(0x11, &frame[HEADER_LEN..]), Ok(request));
    let mut body = frame[HEADER_LEN..].to_vec();
    body[17..19].copy_from_slice(&257u16.to_be_bytes());
    assert!(matches!(
        Request::decode(0x11, &body),
        Err(WireError::BadField { field: "limit", .. })
    ));
    body[17..19].copy_from_slice(&1u16.to_be_bytes());
    body[0] = 9;
    assert!(matches!(
        Request::decode(0x11, &body),
        Err(WireError::BadField { field: "state", .. })
    ));
    let entry = ListedAsset {
        asset: Uuid::from_bytes([3; 16]),
        state: AssetState::Active,
        counter: 5,
        shard: 1,
        changed_unix_ms: 1_764_000_000_000,
    };
    let page = AssetPage {
        assets: vec![entry; usize::from(bounds::LIST_ASSETS_PAGE_MAX)],
        more: true,
    };
    let mut out = Vec::new();
    Reply::Assets(page.clone()).encode(0x11, 9, &mut out);
    assert_eq!(out.len() - HEADER_LEN, 5 + 256 * LISTED_ASSET_BYTES);
    assert_eq!(
        out.len() - HEADER_LEN,
        8_965,
        "docs/protocol.md gives this bound"
    );
    assert_eq!(
        Reply::decode(Opcode::ListAssets, &out[HEADER_LEN..]),
        Ok(Reply::Assets(page))
    );
}

#[test]
fn opcode_numbers_are_stable() {
    let expected = [
        (Opcode::Hello, 0x01),
        (Opcode::Register, 0x02),
        (Opcode::Derive, 0x03),
        (Opcode::Status, 0x04),
        (Opcode::Seal, 0x05),
        (Opcode::Unseal, 0x06),
        (Opcode::SealStatus, 0x07),
        (Opcode::Rotate, 0x08),
        (Opcode::Suspend, 0x09),
        (Opcode::Resume, 0x0A),
        (Opcode::Retire, 0x0B),
        (Opcode::SetRegion, 0x0C),
        (Opcode::Regions, 0x0D),
        (Opcode::PolicyReload, 0x0E),
        (Opcode::Reconcile, 0x0F),
        (Opcode::ProveReceipt, 0x10),
        (Opcode::ListAssets, 0x11),
    ];
    for (op, number) in expected {
        assert_eq!(op as u8, number);
        assert_eq!(Opcode::from_u8(number), Some(op));
    }
    assert_eq!(Opcode::from_u8(0x12), None);
    for (code, n) in [
        (SealStateCode::Unsealed, 1),
        (SealStateCode::ServingStale, 2),
        (SealStateCode::Sealed, 3),
        (SealStateCode::Unsealing, 4),
        (SealStateCode::SealedByOperator, 5),
        (SealStateCode::SealedByFailure, 6),
    ] {
        assert_eq!(code as u8, n);
        assert_eq!(SealStateCode::from_u8(n), Some(code));
    }
    assert_eq!(SealStateCode::from_u8(0), None);
    assert_eq!(ProviderCode::from_u8(3), Some(ProviderCode::Shamir));
    assert_eq!(ProviderCode::from_u8(4), None);
}

#[test]
fn replies_round_trip() {
    let replies = [
        (
            Opcode::Hello,
            Reply::Hello(HelloInfo {
                version: 1,
                shard_count: 2,
                shard_hash: SHARD_HASH_JUMP_FNV1A64,
                max_frame_body_bytes: 4096,
                max_inflight_per_connection: 256,
                shard_ports: vec![7450, 7451],
            }),
        ),
        (
            Opcode::Status,
            Reply::Asset(AssetInfo {
                asset: Uuid::from_bytes([3; 16]),
                state: AssetState::Suspended,
                counter: 9,
                shard: 1,
            }),
        ),
        (
            Opcode::Derive,
            Reply::Derived(Derived {
                counter: 3,
                scheme_version: 1,
                key: zeroize::Zeroizing::new([0x5a; KEY_LEN]),
                receipt: Receipt {
                    shard: 1,
                    seq: 77,
                    hash: [7; 32],
                },
            }),
        ),
        (
            Opcode::Unseal,
            Reply::Seal(SealInfo {
                state: SealStateCode::Unsealing,
                provider: ProviderCode::Shamir,
                shares_received: 2,
                threshold: 3,
                shares: 5,
                since_unix_ms: 1_795_000_000_000,
                key_unsealed_unix_ms: 0,
                calls_ok: 1,
                calls_failed: 2,
                calls_timed_out: 3,
                breaker_opened: 4,
                fingerprint: [0xab; 16],
                reason: "é".into(),
            }),
        ),
        (
            Opcode::Rotate,
            Reply::Rotated(Rotated {
                asset: Uuid::from_bytes([1; 16]),
                rotation_id: Uuid::from_bytes([2; 16]),
                counter: 8,
                previous_counter: 7,
                receipt: Receipt {
                    shard: 1,
                    seq: 99,
                    hash: [9; 32],
                },
                replayed: true,
            }),
        ),
        (
            Opcode::Regions,
            Reply::Regions(vec![("US-EAST".into(), true), ("EU-WEST".into(), false)]),
        ),
        (Opcode::SetRegion, Reply::Regions(vec![])),
        (
            Opcode::PolicyReload,
            Reply::PolicyReloaded(PolicyReloaded {
                generation: 3,
                identities: 12,
                regions: 4,
                asset_groups: 2,
            }),
        ),
        (
            Opcode::Retire,
            Reply::Asset(AssetInfo {
                asset: Uuid::from_bytes([3; 16]),
                state: AssetState::Retired,
                counter: 8,
                shard: 0,
            }),
        ),
        (
            Opcode::Unseal,
            Reply::Refused(Refusal {
                status: Status::SeedMismatch,
                retry_after_ms: 0,
                message: "fingerprint".into(),
                active: None,
            }),
        ),
        (
            Opcode::Derive,
            Reply::Refused(Refusal {
                status: Status::Busy,
                retry_after_ms: 5,
                message: "shard queue full".into(),
                active: None,
            }),
        ),
        (
            Opcode::Derive,
            Reply::Refused(Refusal::not_active(
                "a standby",
                Some("custody-a.example:7443".into()),
            )),
        ),
        (
            Opcode::Rotate,
            Reply::Refused(Refusal::not_active(
                "a standby; the active is unknown",
                None,
            )),
        ),
    ];
    for (op, reply) in replies {
        let mut out = Vec::new();
        reply.encode(op as u8, 9, &mut out);
        let frame = decode_frame(&out, 4096).unwrap().unwrap();
        assert_eq!(frame.header.opcode, op as u8 | REPLY_BIT);
        assert_eq!(Reply::decode(op, frame.body).unwrap(), reply);
    }
}

#[test]
fn status_numbers_are_stable() {
    // Changing any of these breaks deployed clients: add new numbers instead.
    let expected: [(Status, u16); 36] = [
        (Status::Ok, 0),
        (Status::UnsupportedVersion, 1),
        (Status::MalformedFrame, 2),
        (Status::FrameTooLarge, 3),
        (Status::UnknownOpcode, 4),
        (Status::BadBody, 5),
        (Status::FrameTimeout, 6),
        (Status::InvalidAssetId, 10),
        (Status::InvalidPath, 11),
        (Status::InvalidRegion, 12),
        (Status::InvalidPurpose, 13),
        (Status::InvalidTtl, 14),
        (Status::InvalidRotationId, 15),
        (Status::RegionDisabled, 16),
        (Status::UnknownAsset, 20),
        (Status::AssetExists, 21),
        (Status::AssetSuspended, 22),
        (Status::AssetRetired, 23),
        (Status::CounterMismatch, 24),
        (Status::RotationIdReused, 25),
        (Status::CounterExhausted, 26),
        (Status::InvalidTransition, 27),
        (Status::Busy, 30),
        (Status::StoreUnavailable, 31),
        (Status::Sealed, 32),
        (Status::ShuttingDown, 33),
        (Status::ConnectionLimit, 34),
        (Status::Forbidden, 40),
        (Status::RateLimited, 41),
        (Status::Internal, 50),
        (Status::ShareInvalid, 60),
        (Status::ShareRepeated, 61),
        (Status::SeedMismatch, 62),
        (Status::AlreadyUnsealed, 63),
        (Status::PolicyInvalid, 70),
        (Status::ReloadUnavailable, 71),
    ];
    for (status, number) in expected {
        assert_eq!(status as u16, number);
        assert_eq!(Status::from_u16(number), Some(status));
    }
    assert_eq!(Status::from_u16(7), None);
}

/// The hex dump of docs/protocol.md's DERIVE OK reply is what the encoder writes.
#[test]
fn the_documented_derive_reply_is_what_the_encoder_writes() {
    let documented = documented_dump("### DERIVE OK reply");
    let mut out = Vec::new();
    Reply::Derived(Derived {
        counter: 0,
        scheme_version: 1,
        key: zeroize::Zeroizing::new([0x5a; 32]),
        receipt: Receipt {
            shard: 3,
            seq: 42,
            hash: [0xc3; 32],
        },
    })
    .encode(Opcode::Derive as u8, 1, &mut out);
    assert_eq!(out, documented);
}

/// The bytes of the hex dumps (`text` blocks) of a section of docs/protocol.md, in order.
fn documented_dump(section: &str) -> Vec<u8> {
    let doc = include_str!("../../docs/protocol.md");
    let at = doc.find(section).expect("section");
    let rest = &doc[at + section.len()..];
    let rest = &rest[..rest.find("\n### ").unwrap_or(rest.len())];
    rest.split("```text\n")
        .skip(1)
        .filter_map(|block| block.split("```").next())
        .flat_map(|dump| dump.lines())
        .flat_map(|line| {
            line.get(10..58)
                .unwrap_or("")
                .split_whitespace()
                .map(|b| u8::from_str_radix(b, 16).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_documented_hello_is_what_the_encoder_writes() {
    let documented = documented_dump("### HELLO");
    let mut out = Vec::new();
    Request::Hello.encode(7, &mut out);
    Reply::Hello(HelloInfo {
        version: VERSION,
        shard_count: 4,
        shard_hash: SHARD_HASH_JUMP_FNV1A64,
        max_frame_body_bytes: 16384,
        max_inflight_per_connection: 1024,
        shard_ports: vec![7450, 7451, 7452, 7453],
    })
    .encode(Opcode::Hello as u8, 7, &mut out);
    assert_eq!(out, documented);
    // A port list that is neither empty nor one per shard is refused.
    let body = &out[20 + HEADER_LEN..];
    let mut bad = body.to_vec();
    bad[15] = 3;
    assert!(Reply::decode(Opcode::Hello, &bad).is_err());
}

#[test]
fn fuzz_entry_survives_garbage() {
    // A deterministic sweep standing in for the fuzzer on every test run.
    let mut valid = Vec::new();
    Request::Derive(derive_body()).encode(5, &mut valid);
    crate::testing::mutation_sweep(&valid, 20_000, 7, 0x9e3779b97f4a7c15, fuzz_decode);
    let mut unseal = Vec::new();
    Request::Unseal {
        reset: true,
        share: ShareText::new("custody-share/1:x:2:1:ab:cd"),
    }
    .encode(6, &mut unseal);
    crate::testing::mutation_sweep(&unseal, 5_000, 5, 0x51ab1e, fuzz_decode);
    let mut rotate = Vec::new();
    Request::Rotate(RotateBody {
        asset: Uuid::from_bytes([0x11; 16]),
        rotation_id: Uuid::from_bytes([0x22; 16]),
        expected_counter: Some(3),
    })
    .encode(8, &mut rotate);
    crate::testing::mutation_sweep(&rotate, 5_000, 5, 0x707a7e, fuzz_decode);
    let mut reply = Vec::new();
    Reply::Seal(SealInfo {
        state: SealStateCode::Sealed,
        provider: ProviderCode::Pkcs11,
        shares_received: 0,
        threshold: 0,
        shares: 0,
        since_unix_ms: 1,
        key_unsealed_unix_ms: 2,
        calls_ok: 3,
        calls_failed: 4,
        calls_timed_out: 5,
        breaker_opened: 6,
        fingerprint: [1; 16],
        reason: "r".into(),
    })
    .encode(Opcode::SealStatus as u8, 7, &mut reply);
    crate::testing::mutation_sweep(&reply, 5_000, 5, 0x5ea1, fuzz_decode);
}
