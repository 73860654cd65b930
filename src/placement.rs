//! Which shard owns an asset.
//!
//! The owner of an asset is `jump(fnv1a64(asset_id bytes), shard_count)`: FNV-1a 64 over
//! the 16 RFC 4122 bytes, then Lamping and Veach's jump consistent hash. Both are a few
//! lines, stable across versions and platforms, and documented in docs/protocol.md so that
//! a client can tell which shard owns an asset (the `shard` of replies and receipts). Pure:
//! the shard, the router, the stores and the client all ask it.

use uuid::Uuid;

/// FNV-1a, 64-bit.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// Jump consistent hash (Lamping, Veach 2014): a bucket in `0..buckets`.
pub fn jump_hash(mut key: u64, buckets: u16) -> u16 {
    let buckets = i64::from(buckets.max(1));
    let mut b: i64 = -1;
    let mut j: i64 = 0;
    while j < buckets {
        b = j;
        key = key.wrapping_mul(2_862_933_555_777_941_757).wrapping_add(1);
        j = ((b.wrapping_add(1) as f64)
            * ((1u64 << 31) as f64 / ((key >> 33).wrapping_add(1) as f64))) as i64;
    }
    b as u16
}

/// The shard that owns `asset` among `shard_count` shards.
pub fn shard_of(asset: &Uuid, shard_count: u16) -> u16 {
    jump_hash(fnv1a64(asset.as_bytes()), shard_count)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_reference_values() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn jump_hash_reference_values() {
        // Values from the paper's reference implementation.
        assert_eq!(jump_hash(0, 1), 0);
        assert_eq!(jump_hash(1, 1), 0);
        let mut moved = 0;
        for key in 0..10_000u64 {
            let k = fnv1a64(&key.to_be_bytes());
            let a = jump_hash(k, 2);
            let b = jump_hash(k, 3);
            assert!(a < 2 && b < 3);
            // Growing 2 → 3 moves keys only to the new bucket.
            if a != b {
                assert_eq!(b, 2);
                moved += 1;
            }
        }
        assert!((2_800..3_900).contains(&moved), "moved {moved} of 10000");
    }

    #[test]
    fn shard_of_is_stable() {
        // Pinned (and computed independently in docs/protocol.md's Python snippet): clients
        // route with this, and changing it would move every asset to another shard.
        let pinned: [(&str, u64, [u16; 8]); 3] = [
            (
                "6ba7b810-9dad-11d1-80b4-00c04fd430c8",
                0x90fc22069f42281c,
                [0, 0, 0, 0, 0, 0, 0, 0],
            ),
            (
                "0b9f3c5e-8d1a-4f6b-9c2d-3e4f5a6b7c8d",
                0x649706058e16c0bc,
                [0, 0, 2, 2, 2, 2, 2, 2],
            ),
            (
                "123e4567-e89b-42d3-a456-426614174000",
                0x981305aa165835b0,
                [0, 1, 2, 2, 2, 2, 2, 2],
            ),
        ];
        for (text, fnv, shards) in pinned {
            let asset = Uuid::parse_str(text).unwrap();
            assert_eq!(fnv1a64(asset.as_bytes()), fnv, "{text}");
            let got: Vec<u16> = (1..=8).map(|n| shard_of(&asset, n)).collect();
            assert_eq!(got, shards, "{text}");
        }
    }
}
