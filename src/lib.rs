//! custody: a key-custody appliance. Deterministic, audited key derivation over mutual
//! TLS, thread-per-core on glommio.
//!
//! # Layout
//!
//! The modules in the order a derive request meets them:
//!
//! - [`server`]: starts one executor per core, each with its shard, listener and mesh.
//! - [`net`]: accepts on the shared port, TLS handshake, reads frames, writes replies;
//!   [`admission`] decides who holds a handshake or connection slot (per core, source
//!   and identity), and every wait for a client has a timeout.
//! - [`tls`]: rustls configuration; the requester is the client certificate's identity;
//!   [`certs`] reads the PEM files; [`settings`] is what each new connection is
//!   accepted with (TLS acceptor and limits), replaced whole by [`reload`];
//!   [`tls::stream`] is the server side of a connection over rustls's unbuffered API
//!   (an idle connection holds no TLS buffer).
//! - [`wire`]: the sans-IO framing of protocol v3 and its tables of codes (an opcode's
//!   number, name, metrics label and who may send it; statuses); [`op`]: one file per
//!   operation (`op/derive.rs`) with its request and reply bodies, its field rules, what
//!   it asks the shard and how its reply is made; `net` carries out what the handler
//!   decided. [`context`] is what every connection on a core shares.
//! - [`policy`]: the gate every request passes before it reaches a shard: the identity's
//!   roles (deriver by purpose, region and asset group, operator, admin, auditor) and the
//!   field rules, with [`regions`] (the compliance regions' on/off switch shared by every
//!   core); the whole policy is replaced on a reload (SIGHUP or POLICY_RELOAD).
//! - [`placement`]: asset → shard hash; [`router`]: the bounded mesh between cores.
//! - [`shard`]: the owning core's registry, audit records and group commit; the
//!   (requester, asset) rate limit of [`ratelimit`] is kept here.
//! - [`lifecycle`]: asset states and their transitions (rotate, suspend, resume, retire
//!   are applied by the owning shard and audited like derivations).
//! - [`audit`]: the audit record of every acknowledged operation, its canonical encoding
//!   and hash chain (computed by the shard as it seals a batch); [`checkpoint`]: a
//!   shard's authenticated position in its chain, MACed with the seed's audit key.
//! - [`store`]: the durable store trait, the shard→commit-thread hand-off, SQLite, and
//!   PostgreSQL driven on each core (with TLS, single owner, partitions).
//! - [`kdf`]: NIST SP 800-108 KBKDF with HMAC-SHA256, keyed once per seed; run on the
//!   connection's core once the record is durable.
//! - [`seal`]: where the root seed comes from: the `pkcs11` provider (sealed by a key in
//!   an HSM, `custody init`), the sealed-seed file, the `shamir` provider (k-of-n shares
//!   submitted with UNSEAL; every init also writes shares for `custody recover`), and the
//!   `dev` provider.
//!
//! Beside the request path: [`reconcile`] (the audit log checked against its chain,
//! checkpoints and the counters; pure) run by [`auditor`] (a thread of its own, every
//! `audit.reconcile_interval_s` and on RECONCILE).
//!
//! Around the request path: [`metrics`] (per-core figures merged at scrape time, and
//! the admin listener: /metrics, /healthz, /readyz), [`systemd`] (READY, STATUS,
//! STOPPING and watchdog pings gated on every core's health), [`config`] (two-stage TOML,
//! plain settings: it imports no runtime module),
//! [`dev`] (`custodyd dev`: a development appliance in one command), [`bounds`] (hard caps), [`preflight`] (the host checks before start: io_uring,
//! RLIMIT_MEMLOCK, CPUs),
//! [`hex`] (the one hex encoder and decoder),
//! [`heap`] (custodyd's allocator, jemalloc, its figures and its decay of freed memory),
//! [`locked`] (locked, undumpable, zeroizing memory for the keyed state),
//! [`signal`] (lock-free wake-ups between tasks of one core),
//! [`published`] (a value every core reads and a reload replaces whole: the policy, the
//! TLS acceptor and the connection limits),
//! [`client`] (the tokio client library the CLI and the load harness use; its
//! `ShardedClient` sends each request to the port of the core that owns its asset).
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

/// The synchronisation primitives [`regions`] is written against (loom swaps these).
pub(crate) mod sync {
    pub use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
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
