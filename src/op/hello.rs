//! HELLO: no request body; the reply says what this appliance speaks and how it is
//! sharded, so a client can size its window and route each asset to its shard's port.
//!
//! ```text
//! reply: status (2) | version (1) | shard_count (2) | shard_hash (1)
//!        | max_frame_body_bytes (4) | max_inflight_per_connection (4)
//!        | shard_port_count (2, 0 or shard_count) | shard_port (2) each
//! ```

use super::{Asking, Handled, Reply};
use crate::wire::{Reader, WireError, SHARD_HASH_JUMP_FNV1A64, VERSION};

/// What HELLO reports.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HelloInfo {
    pub version: u8,
    pub shard_count: u16,
    pub shard_hash: u8,
    pub max_frame_body_bytes: u32,
    pub max_inflight_per_connection: u32,
    /// The port each shard also listens on, by shard (`server.shard_listen`): a client
    /// that sends each asset's requests to its shard's port never has them cross cores.
    /// Empty when the appliance has no per-shard ports.
    pub shard_ports: Vec<u16>,
}

impl HelloInfo {
    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.push(self.version);
        out.extend_from_slice(&self.shard_count.to_be_bytes());
        out.push(self.shard_hash);
        out.extend_from_slice(&self.max_frame_body_bytes.to_be_bytes());
        out.extend_from_slice(&self.max_inflight_per_connection.to_be_bytes());
        out.extend_from_slice(&(self.shard_ports.len() as u16).to_be_bytes());
        for port in &self.shard_ports {
            out.extend_from_slice(&port.to_be_bytes());
        }
    }

    pub(super) fn decode(r: &mut Reader<'_>) -> Result<HelloInfo, WireError> {
        let version = r.u8("version")?;
        let shard_count = r.u16("shard_count")?;
        let shard_hash = r.u8("shard_hash")?;
        let max_frame_body_bytes = r.u32("max_frame_body_bytes")?;
        let max_inflight_per_connection = r.u32("max_inflight_per_connection")?;
        let n = r.u16("shard_port_count")?;
        if n != 0 && n != shard_count {
            return Err(WireError::BadField {
                field: "shard_port_count",
                reason: "neither 0 nor shard_count",
            });
        }
        let mut shard_ports = Vec::with_capacity(usize::from(n));
        for _ in 0..n {
            match r.u16("shard_port")? {
                0 => {
                    return Err(WireError::BadField {
                        field: "shard_port",
                        reason: "port 0",
                    })
                }
                port => shard_ports.push(port),
            }
        }
        Ok(HelloInfo {
            version,
            shard_count,
            shard_hash,
            max_frame_body_bytes,
            max_inflight_per_connection,
            shard_ports,
        })
    }
}

/// HELLO: the appliance's shape, with the in-flight bound in force now (a reload may have
/// changed it since start).
pub(super) fn handle(a: &Asking<'_>) -> Handled {
    let ctx = a.ctx;
    Handled::Now(Ok(Reply::Hello(HelloInfo {
        version: VERSION,
        shard_count: ctx.shard_count,
        shard_hash: SHARD_HASH_JUMP_FNV1A64,
        max_frame_body_bytes: ctx.limits.max_frame_body_bytes,
        max_inflight_per_connection: ctx.settings.get().limits.max_inflight_per_connection,
        shard_ports: ctx.shard_ports.clone(),
    })))
}
