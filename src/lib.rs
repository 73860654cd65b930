//! custody: a key-custody appliance. Deterministic, audited key derivation over mutual
//! TLS, thread-per-core on glommio.
//!
//! # Layout
//!
//! ## The path of a DERIVE, in the order it meets the code (10 files)
//!
//! 1. `net.rs`: the connection on the core that accepted it: admission to a slot
//!    ([`admission`]), the TLS handshake ([`tls`], [`tls::stream`]), frames read into
//!    the core's buffer and cut by [`wire`]'s `decode_frame`, `dispatch`, and the outbox
//!    its replies are written from.
//! 2. `op/mod.rs`: `Request::decode`, the opcode's gate, `Request::handle` (after
//!    `net.rs` asked [`lease`] whether this appliance may acknowledge: a standby answers
//!    NOT_ACTIVE).
//! 3. `op/derive.rs`: DERIVE's body, its field rules (`DeriveBody::check`), its handler
//!    (who may derive, the seal) and, once durable, its reply.
//! 4. `policy.rs`: the identity's roles, purposes, regions, asset groups and rate.
//! 5. `router.rs`: to the shard that owns the asset ([`placement`]: jump hash), over the
//!    bounded mesh when it is another core.
//! 6. `shard/registry.rs`: the asset's state allows it; its audit record is queued at the
//!    counter in force (the rate limit in `shard/mod.rs` first).
//! 7. `shard/commit.rs`: the committer seals a batch, numbered and chained ([`audit`]),
//!    with its MACed [`checkpoint`], and hands it to the store.
//! 8. `store/sqlite/mod.rs` (or `store/postgres/shard.rs`): the commit thread folds the
//!    shards' batches into one transaction (`store/sqlite/write.rs`), COMMIT, and wakes
//!    the shard through [`store::handoff`]; only now is the answer released (I1).
//! 9. `seal/cache.rs`: back on the connection's core, the core's key (`CoreKey`)...
//! 10. `kdf.rs`: ...derives the key from the durable counter (SP 800-108, HMAC-SHA256);
//!     `net.rs` encodes it into the outbox and wipes the bytes once written.
//!
//! ## Where to make a change
//!
//! - **An operation**: a row in `wire/codes.rs` (`Opcode`: number, name and metrics
//!   label, `Gate`), a file in `op/` (bodies, codec, handler: what it asks the shard or
//!   the auditor and how its reply is made), its arms in `op/mod.rs` (`Request`, `Reply`,
//!   `Request::handle`), a `ShardOp` in `shard/mod.rs` and its `accept_*` in
//!   `shard/registry.rs` if the shard applies it, and its section in docs/protocol.md.
//! - **A status**: a row in `wire/codes.rs` (`Status`: number, name, whether it closes
//!   the connection) and docs/protocol.md.
//! - **A config key**: a row in `config/keys.rs` (`KEYS`: its default and meaning, the
//!   only place the default is written), the read in its section's file (`config/store.rs`,
//!   `seal.rs`, `limits.rs`, `policy.rs`, or `resolve.rs` for `[server]`, `[tls]`,
//!   `[audit]`), the field in `config/mod.rs`, and appliance/custody.toml.
//! - **A metric**: what a core counts in `metrics/figures.rs`, its family in
//!   `metrics/render.rs`.
//!
//! ## The modules
//!
//! - On the request path: [`net`] and [`context`] (what every connection on a core
//!   shares), [`admission`], [`tls`] with [`certs`] (the PEM files) and [`settings`]
//!   (the TLS acceptor and limits new connections get, replaced whole by [`reload`]),
//!   [`wire`], [`op`], [`policy`] with [`regions`] (the compliance switch every core
//!   reads), [`placement`], [`router`], [`shard`] with [`ratelimit`] and [`lifecycle`]
//!   (asset states and their transitions), [`audit`], [`checkpoint`], [`store`], [`seal`]
//!   (the seed's providers: `pkcs11`, the sealed-seed file, `shamir` shares, `dev`), [`kdf`].
//! - Starting and stopping: [`server`] (`start.rs`: the start-up's steps; `executor.rs`:
//!   one core's mesh, shard, committer and listeners; `stop.rs`: READY, the drain;
//!   `signals.rs`), [`preflight`] (io_uring, RLIMIT_MEMLOCK, CPUs), [`systemd`] (READY,
//!   STATUS, watchdog), [`config`] (two-stage TOML, plain settings: it imports no runtime
//!   module), [`dev`] (`custodyd dev`).
//! - Availability: [`lease`] (who may acknowledge: the role, the fencing token, the
//!   self-fencing deadline; pure, read by every core per request) kept at PostgreSQL by
//!   `store/postgres/lease.rs` (a thread of its own: take, renew, step down); a takeover
//!   re-reads each shard (`Shard::reread`, followed by `server/executor.rs`).
//! - Beside the request path: [`reconcile`] (the audit log against its chain, checkpoints
//!   and counters; pure) run by [`auditor`] (its own thread: every
//!   `audit.reconcile_interval_s`, RECONCILE, PROVE_RECEIPT, LIST_ASSETS), [`metrics`]
//!   (per-core figures merged at scrape time; the admin listener: /metrics, /healthz,
//!   /readyz).
//! - Building blocks: [`bounds`] (hard caps), [`hex`], [`heap`] (jemalloc, its figures),
//!   [`locked`] (locked, undumpable, zeroizing memory for keyed state), [`signal`]
//!   (wake-ups between tasks of one core), [`published`] (a value every core reads and a
//!   reload replaces whole), [`client`] (the tokio client the CLI and the load harness
//!   use; `ShardedClient` sends each asset's requests to its shard's port;
//!   `FailoverClient` follows the active across several appliances).
//!
//! No module imports a module that imports it back, however far round: `tests/layout.rs`
//! checks the whole graph.

pub mod admission;
pub mod audit;
pub mod auditor;
pub mod bounds;
pub mod certs;
pub mod checkpoint;
pub mod client;
pub mod config;
pub mod context;
pub mod dev;
pub mod heap;
pub mod hex;
pub mod kdf;
pub mod lease;
pub mod lifecycle;
pub mod locked;
pub mod metrics;
pub mod net;
pub mod op;
pub mod placement;
pub mod policy;
pub mod preflight;
pub mod published;
pub mod ratelimit;
pub mod reconcile;
pub mod regions;
pub mod reload;
pub mod router;
pub mod seal;
pub mod server;
pub mod settings;
pub mod shard;
pub mod signal;
pub mod store;
pub mod systemd;
pub mod tls;
pub mod wire;

/// The unit tests allocate as custodyd does, so that `heap`'s figures mean the same.
#[cfg(test)]
#[global_allocator]
static TEST_ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// The synchronisation primitives [`regions`] and [`lease`] are written against (loom
/// swaps these).
pub(crate) mod sync {
    pub use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicU8, Ordering};
    pub use std::sync::{Arc, Mutex, MutexGuard};
}

/// Helpers shared by the unit tests of several modules.
#[cfg(test)]
pub(crate) mod testing {
    /// A deterministic stand-in for a fuzzer: `rounds` copies of `valid`, each with up to
    /// `max_flips` bytes overwritten and cut to a pseudo-random length, handed to `f`.
    pub fn mutation_sweep(
        valid: &[u8],
        rounds: usize,
        max_flips: usize,
        mut seed: u64,
        mut f: impl FnMut(&[u8]),
    ) {
        for round in 0..rounds {
            let mut data = valid.to_vec();
            for _ in 0..(round % max_flips) + 1 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed as usize) % data.len();
                data[at] = (seed >> 32) as u8;
            }
            data.truncate((seed as usize >> 8) % (data.len() + 1));
            f(&data);
        }
    }
}
