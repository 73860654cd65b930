//! Which shard owns an asset, and the bounded channels that carry operations between cores.
//!
//! The owner of an asset is `jump(fnv1a64(asset_id bytes), shard_count)`: FNV-1a 64 over
//! the 16 RFC 4122 bytes, then Lamping and Veach's jump consistent hash. Both are a few
//! lines, stable across versions and platforms, and documented in docs/protocol.md so that
//! a client can tell which shard owns an asset (the `shard` of replies and receipts).
//!
//! A connection's core runs an operation itself when it owns the asset; otherwise it
//! forwards the operation over the glommio channel mesh (bounded; a full channel answers
//! BUSY) and awaits the reply the owner sends back on the same mesh.

use crate::shard::{OpResult, RateCheck, Shard, ShardOp};
use crate::wire::{Refusal, Status};
use glommio::channels::channel_mesh::{Receivers, Senders};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tokio::sync::oneshot;
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

/// What travels between cores.
#[derive(Debug)]
pub enum MeshMsg {
    Forward {
        from: u16,
        ticket: u64,
        op: ShardOp,
        rate: Option<RateCheck>,
    },
    Reply {
        ticket: u64,
        result: OpResult,
    },
}

/// One core's view of the shards: its own, and the mesh to the others.
pub struct ShardRouter {
    shard: Rc<Shard>,
    shard_count: u16,
    senders: Option<Senders<MeshMsg>>,
    waiting: RefCell<HashMap<u64, oneshot::Sender<OpResult>>>,
    next_ticket: Cell<u64>,
    /// Operations handed to another core so far.
    forwarded: Cell<u64>,
}

impl ShardRouter {
    pub fn new(shard: Rc<Shard>, shard_count: u16, senders: Option<Senders<MeshMsg>>) -> Self {
        ShardRouter {
            shard,
            shard_count,
            senders,
            waiting: RefCell::new(HashMap::new()),
            next_ticket: Cell::new(1),
            forwarded: Cell::new(0),
        }
    }

    /// Operations this core has handed to the core that owns their asset.
    pub fn forwarded(&self) -> u64 {
        self.forwarded.get()
    }

    pub fn shard_count(&self) -> u16 {
        self.shard_count
    }

    pub fn local_shard(&self) -> &Rc<Shard> {
        &self.shard
    }

    /// Runs `op` on the shard that owns its asset.
    pub async fn route(&self, op: ShardOp, rate: Option<RateCheck>) -> OpResult {
        let owner = op.owner(self.shard_count);
        if owner == self.shard.id() {
            return self.shard.execute_limited(op, rate).await;
        }
        let Some(senders) = &self.senders else {
            return Err(Refusal::new(
                Status::Internal,
                "no mesh to the owning shard",
            ));
        };
        self.forwarded.set(self.forwarded.get() + 1);
        let ticket = self.next_ticket.get();
        self.next_ticket.set(ticket.wrapping_add(1));
        let (tx, rx) = oneshot::channel();
        self.waiting.borrow_mut().insert(ticket, tx);
        let msg = MeshMsg::Forward {
            from: self.shard.id(),
            ticket,
            op,
            rate,
        };
        if senders.try_send_to(owner as usize, msg).is_err() {
            self.waiting.borrow_mut().remove(&ticket);
            let mut refusal = Refusal::new(
                Status::Busy,
                format!("the channel to shard {owner} is full (limits.cross_core_queue_depth)"),
            );
            refusal.retry_after_ms = 1;
            return Err(refusal);
        }
        rx.await.unwrap_or_else(|_| {
            Err(Refusal::new(
                Status::Internal,
                format!("shard {owner} dropped a forwarded request"),
            ))
        })
    }

    /// Serves the mesh: runs operations other cores forward here and hands their replies
    /// back; delivers replies to this core's waiting requests. Never blocks on a send, so
    /// two cores forwarding to each other cannot deadlock.
    pub async fn serve_mesh(self: Rc<Self>, mut receivers: Receivers<MeshMsg>) {
        let mut tasks = Vec::new();
        for (_, receiver) in receivers.streams() {
            let router = self.clone();
            tasks.push(glommio::spawn_local(async move {
                while let Some(msg) = receiver.recv().await {
                    router.handle_mesh(msg);
                }
            }));
        }
        for t in tasks {
            t.await;
        }
    }

    fn handle_mesh(self: &Rc<Self>, msg: MeshMsg) {
        match msg {
            MeshMsg::Reply { ticket, result } => {
                if let Some(tx) = self.waiting.borrow_mut().remove(&ticket) {
                    let _ = tx.send(result);
                }
            }
            MeshMsg::Forward {
                from,
                ticket,
                op,
                rate,
            } => {
                let router = self.clone();
                glommio::spawn_local(async move {
                    let result = router.shard.execute_limited(op, rate).await;
                    if let Some(senders) = &router.senders {
                        // Awaiting here is bounded by the requests the peer has in flight.
                        let _ = senders
                            .send_to(from as usize, MeshMsg::Reply { ticket, result })
                            .await;
                    }
                })
                .detach();
            }
        }
    }
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
