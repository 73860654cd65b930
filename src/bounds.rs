//! Hard bounds: the ceilings that no configuration may exceed, in one place.
//!
//! The configurable limits live in [`crate::config::Limits`] and are checked against these
//! caps at start-up; the protocol's fixed sizes live in [`crate::wire`]. Units come last in
//! each name (TigerBeetle style): `_bytes`, `_ms`, `_us`, `_count`.

/// Largest frame body any configuration may allow (1 MiB). Requests are tiny; this cap
/// only keeps a misconfiguration from turning the read buffer into a memory sink.
pub const FRAME_BODY_BYTES_CAP: u32 = 1 << 20;

/// Largest number of pipelined requests a single connection may have in flight.
pub const INFLIGHT_PER_CONNECTION_CAP: u32 = 65_536;

/// Largest number of connections one core may hold.
pub const CONNECTIONS_PER_CORE_CAP: u32 = 65_536;

/// Largest number of TLS handshakes one core may have in progress (each holds the
/// handshake's state, a few KiB, until it ends or is evicted).
pub const HANDSHAKES_PER_CORE_CAP: u32 = 16_384;

/// Largest depth of a cross-core channel (messages per ordered pair of cores).
pub const CROSS_CORE_QUEUE_DEPTH_CAP: u32 = 65_536;

/// Largest number of audit records in one commit batch.
pub const COMMIT_BATCH_RECORDS_CAP: u32 = 65_536;

/// Largest group-commit delay (how long a shard may hold a batch open waiting for more).
pub const COMMIT_BATCH_DELAY_US_CAP: u64 = 100_000;

/// Longest the commit thread may wait for more shards' batches before it writes.
pub const COMMIT_LINGER_US_CAP: u64 = 10_000;

/// Most batches one shard may have waiting for the store at once.
pub const COMMIT_BATCHES_INFLIGHT_CAP: usize = 16;

/// Largest number of requests a shard may hold waiting for their batch to commit.
pub const PENDING_PER_SHARD_CAP: u32 = 1 << 20;

/// Largest number of assets the appliance keeps in its shards' registries.
pub const ASSETS_CAP: u64 = 100_000_000;

/// Most executors (cores) the appliance runs; the shard id is a `u16` on the wire.
pub const CORES_CAP: usize = 1024;

/// Longest textual derivation path accepted: room above the longest canonical path
/// (`kdf::PATH_TEXT_MAX`, 61 bytes; kdf asserts it fits) for a non-canonical spelling that
/// still parses.
pub const PATH_TEXT_BYTES_MAX: usize = 64;

/// Longest region name accepted on the wire and in the config.
pub const REGION_TEXT_BYTES_MAX: usize = 32;

/// Longest requester identity recorded in the audit log.
pub const IDENTITY_TEXT_BYTES_MAX: usize = 256;

/// Longest error message carried in an error reply.
pub const ERROR_MESSAGE_BYTES_MAX: usize = 512;

/// Longest active address a NOT_ACTIVE reply carries (`host:port`: a DNS name of at most
/// 253 bytes, the colon and five digits, with room for an IPv6 literal's brackets).
pub const ACTIVE_ADDRESS_BYTES_MAX: usize = 264;

/// Batches the store's commit thread folds into one transaction.
pub const STORE_BATCHES_PER_TRANSACTION_MAX: usize = 64;

/// Longest Shamir share text accepted in an UNSEAL request (a share line is at most 132 bytes).
pub const SHARE_TEXT_BYTES_MAX: usize = 160;

/// Most rotation ids one shard may be configured to remember.
pub const ROTATION_IDS_PER_SHARD_CAP: usize = 10_000_000;

/// Most rate-limit buckets one shard may be configured to keep.
pub const RATE_LIMIT_BUCKETS_PER_SHARD_CAP: usize = 10_000_000;

/// Most assets one LIST_ASSETS page carries (a page reply is then at most 8,965 bytes).
pub const LIST_ASSETS_PAGE_MAX: u16 = 256;

/// Most regions `policy.regions` may name (the configured regions, at start or after a reload).
pub const REGIONS_MAX: usize = 255;

/// Most asset groups `policy.asset_groups` may define (a deriver's grant holds them as one
/// 64-bit mask, so the check is one AND).
pub const ASSET_GROUPS_MAX: usize = 64;

/// Most memberships (asset, group) all of `policy.asset_groups` may list together.
pub const ASSET_GROUP_MEMBERS_MAX: usize = 1_000_000;

/// Records per page of the appliance's reconciliation runs: short reads, each its own, so
/// a paced run never holds the store for long (`audit.reconcile_records_per_s` is at least
/// one page a second).
pub const RECONCILE_PAGE_RECORDS: usize = 5_000;

/// Most PostgreSQL servers `store.postgres_host` may list (a primary and its standbys):
/// a connection tries them in turn, each within its timeout, so the list bounds how long
/// finding the writable one can take.
pub const PG_HOSTS_MAX: usize = 8;
