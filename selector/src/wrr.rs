//! Smooth weighted round robin (the nginx algorithm).
//!
//! Every pick adds each eligible node's weight to its current weight, picks the node with the
//! highest current weight (the first one on a tie) and subtracts the total eligible weight
//! from it. Over any window of `total` picks each node is chosen `weight` times, spread out
//! rather than in bursts. Weights come from [`Node::effective_weight`].
//!
//! The update of all current weights must be consistent, so a pick runs under a short mutex
//! (O(eligible nodes) additions). Current weights live in per-node atomics so they survive
//! apply; the atomics are only written under that mutex.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use crate::node_set::{Candidates, NodeSet, eligible};
use crate::{Done, Node, NodeFilter, SelectError, Selector};

/// A node's smooth-wrr current weight.
#[derive(Debug, Default)]
pub(crate) struct CurrentWeight(AtomicI64);

/// The smooth weighted round robin selector.
#[derive(Default)]
pub(crate) struct Wrr {
    nodes: NodeSet<CurrentWeight>,
    /// Held while current weights are read and written.
    pick_lock: Mutex<()>,
}

impl Wrr {
    fn pick<C: Candidates<CurrentWeight> + ?Sized>(
        &self,
        candidates: &C,
    ) -> Result<(Arc<Node>, Done), SelectError> {
        let len = candidates.len();
        if len == 0 {
            return Err(SelectError::NoAvailable);
        }
        if len == 1 {
            return Ok((Arc::clone(&candidates.get(0).node), Done::untracked()));
        }
        // Current weights are plain numbers guarded by this lock, so a poisoned lock (a panic
        // elsewhere while holding it) leaves nothing inconsistent worth refusing service for.
        let _guard = self
            .pick_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut total = 0i64;
        let mut best = 0usize;
        let mut best_weight = i64::MIN;
        for index in 0..len {
            let entry = candidates.get(index);
            let weight = entry.node.effective_weight();
            total += weight;
            let current = entry.state.0.load(Ordering::Relaxed) + weight;
            entry.state.0.store(current, Ordering::Relaxed);
            if current > best_weight {
                best_weight = current;
                best = index;
            }
        }
        let chosen = candidates.get(best);
        chosen.state.0.store(best_weight - total, Ordering::Relaxed);
        Ok((Arc::clone(&chosen.node), Done::untracked()))
    }

    /// The current weight of the node at `address`, if present (tests).
    #[cfg(test)]
    pub(crate) fn current_weight(&self, address: &str) -> Option<i64> {
        self.nodes
            .load()
            .iter()
            .find(|entry| entry.node.address == address)
            .map(|entry| entry.state.0.load(Ordering::Relaxed))
    }
}

impl Selector for Wrr {
    fn select(&self, filters: &[NodeFilter]) -> Result<(Arc<Node>, Done), SelectError> {
        let entries = self.nodes.load();
        if filters.is_empty() {
            self.pick(entries.as_slice())
        } else {
            self.pick(eligible(&entries, filters).as_slice())
        }
    }

    fn apply(&self, nodes: Vec<Node>) {
        self.nodes.apply(nodes, CurrentWeight::default);
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.nodes()
    }
}
