//! Metrics and health for SREs: per-core counters and latency histograms, merged when
//! Prometheus scrapes the admin listener.
//!
//! Each core counts into plain fields it alone owns ([`NetMetrics`] on the connection side,
//! the shard's [`ShardFigures`]); nothing on the request path touches memory
//! another thread writes. Every `server.metrics_publish_ms` the core copies its figures into
//! its own slot of the [`Registry`] (a mutex only that core and the scraper take), and a
//! scrape merges the slots. A scrape therefore sees figures at most one publish interval
//! old; the seal state and the policy generation are read live.
//!
//! The admin listener (`server.admin_listen`, loopback by default) runs on a thread of its
//! own, never on an executor, and answers one small request per connection:
//! `GET /metrics` (Prometheus text format 0.0.4), `GET /healthz` (every core published
//! recently: none is stuck) and `GET /readyz` (unsealed, the store took the last commit of
//! every shard, every core alive).
//!
//! The rooms: `figures` (what each core counts and publishes, and the merge), `registry`
//! (the slots, the live sources, health and readiness), `render` (the text exposition, a
//! function per family or group of families) and `admin` (the listener and its parser).

mod admin;
mod figures;
mod registry;
mod render;

pub use admin::{fuzz_decode, parse_request, spawn_admin_listener, AdminRequest};
pub use figures::{
    batch_histogram, latency_histogram, CoreFigures, Latency, NetMetrics, ShardFigures,
};
pub use registry::{Health, Registry};
pub use render::{opcode_label, seal_state_name};
