//! `[limits]`: the frame size, the connection edge's slots and timeouts, and what each
//! shard holds (queues, pending requests, assets, rotation ids). The rate-limit keys of
//! `[limits]` are read with `[policy]`'s rate limits ([`super::policy`]).

use super::resolver::Resolver;
use super::{ConnectionLimits, Limits};
use crate::bounds;
use std::time::Duration;

/// `[limits]` as resolved, each value if its key resolved: the checks across sections
/// look at some of them whether or not the rest did.
pub(super) struct LimitKeys {
    max_frame: Option<i64>,
    connection: Option<ConnectionLimits>,
    cross_depth: Option<i64>,
    pub(super) pending_max: Option<i64>,
    assets_max: Option<i64>,
    rotation_retention: Option<i64>,
    rotation_ids_max: Option<i64>,
}

impl LimitKeys {
    /// [`Limits`], if every key resolved; `rate_limit_buckets` is the one read with
    /// `[policy]`.
    pub(super) fn finish(self, rate_limit_buckets: i64) -> Option<Limits> {
        Some(Limits {
            max_frame_body_bytes: self.max_frame? as u32,
            connection: self.connection?,
            cross_core_queue_depth: self.cross_depth? as u32,
            max_pending_per_shard: self.pending_max? as u32,
            max_assets_per_shard: self.assets_max? as u64,
            rotation_id_retention: Duration::from_secs(self.rotation_retention? as u64),
            rotation_ids_max_per_shard: self.rotation_ids_max? as u32,
            rate_limit_buckets_per_shard: rate_limit_buckets as u32,
        })
    }
}

/// `[limits]` but its rate-limit keys.
pub(super) fn resolve_limits(r: &mut Resolver<'_>) -> LimitKeys {
    let max_frame = r.int(
        "limits.max_frame_body_bytes",
        256,
        i64::from(bounds::FRAME_BODY_BYTES_CAP),
    );
    let connection = resolve_connection_limits(r);
    let cross_depth = r.int(
        "limits.cross_core_queue_depth",
        1,
        i64::from(bounds::CROSS_CORE_QUEUE_DEPTH_CAP),
    );
    let pending_max = r.int(
        "limits.max_pending_per_shard",
        1,
        i64::from(bounds::PENDING_PER_SHARD_CAP),
    );
    let assets_max = r.int("limits.max_assets_per_shard", 1, bounds::ASSETS_CAP as i64);
    let rotation_retention = r.int("limits.rotation_id_retention_s", 60, 30 * 86_400);
    let rotation_ids_max = r.int(
        "limits.rotation_ids_max_per_shard",
        1,
        bounds::ROTATION_IDS_PER_SHARD_CAP as i64,
    );
    LimitKeys {
        max_frame,
        connection,
        cross_depth,
        pending_max,
        assets_max,
        rotation_retention,
        rotation_ids_max,
    }
}

/// The slots of the connection edge that bound one another.
struct Slots {
    per_core: u32,
    per_identity: u32,
    per_roleless: u32,
    roleless: u32,
    handshakes: u32,
    per_source: u32,
}

/// `[limits]`' connection bounds, with the checks that make them mean what they say: each
/// per-identity and per-source bound below the core's, so that no one identity or source
/// can fill a core.
fn resolve_connection_limits(r: &mut Resolver<'_>) -> Option<ConnectionLimits> {
    let count =
        |r: &mut Resolver<'_>, key, cap: u32| r.int(key, 1, i64::from(cap)).map(|n| n as u32);
    let per_core = count(
        r,
        "limits.max_connections_per_core",
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let inflight = count(
        r,
        "limits.max_inflight_per_connection",
        bounds::INFLIGHT_PER_CONNECTION_CAP,
    );
    let per_identity = count(
        r,
        "limits.max_connections_per_identity",
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let per_roleless = count(
        r,
        "limits.max_connections_per_roleless_identity",
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let roleless = count(
        r,
        "limits.max_roleless_connections_per_core",
        bounds::CONNECTIONS_PER_CORE_CAP,
    );
    let handshakes = count(
        r,
        "limits.max_handshakes_per_core",
        bounds::HANDSHAKES_PER_CORE_CAP,
    );
    let per_source = count(
        r,
        "limits.max_handshakes_per_source",
        bounds::HANDSHAKES_PER_CORE_CAP,
    );
    let ms = |r: &mut Resolver<'_>, key, min, max| {
        r.int(key, min, max)
            .map(|n| Duration::from_millis(n as u64))
    };
    let frame_timeout = ms(r, "limits.frame_timeout_ms", 10, 600_000);
    let idle_timeout = r
        .int("limits.idle_timeout_s", 1, 86_400)
        .map(|s| Duration::from_secs(s as u64));
    let write_timeout = ms(r, "limits.write_timeout_ms", 10, 600_000);
    let slots = Slots {
        per_core: per_core?,
        per_identity: per_identity?,
        per_roleless: per_roleless?,
        roleless: roleless?,
        handshakes: handshakes?,
        per_source: per_source?,
    };
    slots.check(r);
    Some(ConnectionLimits {
        max_connections_per_core: slots.per_core,
        max_inflight_per_connection: inflight?,
        max_connections_per_identity: slots.per_identity,
        max_connections_per_roleless_identity: slots.per_roleless,
        max_roleless_connections_per_core: slots.roleless,
        max_handshakes_per_core: slots.handshakes,
        max_handshakes_per_source: slots.per_source,
        frame_timeout: frame_timeout?,
        idle_timeout: idle_timeout?,
        write_timeout: write_timeout?,
    })
}

impl Slots {
    /// Each per-identity and per-source bound below the core's, and one roleless
    /// identity's within all roleless identities'.
    fn check(&self, r: &mut Resolver<'_>) {
        let below = |r: &mut Resolver<'_>, key: &'static str, n: u32, bound: &str, of: u32| {
            if n >= of && of > 1 {
                r.problem::<()>(key, format!("{n} must be below {bound} ({of}), so that no one identity or source can take all of a core's slots"));
            }
        };
        below(
            r,
            "limits.max_connections_per_identity",
            self.per_identity,
            "limits.max_connections_per_core",
            self.per_core,
        );
        below(
            r,
            "limits.max_roleless_connections_per_core",
            self.roleless,
            "limits.max_connections_per_core",
            self.per_core,
        );
        below(
            r,
            "limits.max_handshakes_per_source",
            self.per_source,
            "limits.max_handshakes_per_core",
            self.handshakes,
        );
        if self.per_roleless > self.roleless {
            r.problem::<()>(
                "limits.max_connections_per_roleless_identity",
                format!(
                    "{} is above limits.max_roleless_connections_per_core ({})",
                    self.per_roleless, self.roleless
                ),
            );
        }
    }
}
