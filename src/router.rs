//! The bounded channels that carry operations between cores.
//!
//! A connection's core runs an operation itself when it owns the asset (which one does is
//! [`crate::placement`]'s); otherwise it forwards the operation over the glommio channel
//! mesh (bounded; a full channel answers BUSY) and awaits the reply the owner sends back on
//! the same mesh.

use crate::shard::{OpResult, RateCheck, Shard, ShardOp};
use crate::wire::{Refusal, Status};
use glommio::channels::channel_mesh::{Receivers, Senders};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use tokio::sync::oneshot;

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
