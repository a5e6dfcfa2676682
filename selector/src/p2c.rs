//! Power of two choices over EWMA statistics (the default algorithm).
//!
//! A pick draws two distinct eligible nodes at random and takes the one with the higher score
//! (see [`NodeStats::score`]): success rate over the square root of latency, divided by the
//! in-flight count plus one. A node without a latency sample yet (just added) is scored with
//! its rival's latency, so it is compared on in-flight requests and success alone: it gets its
//! share of traffic at once instead of waiting for a penalty to wear off. If the losing node
//! has not been picked for more than [`FORCE_PICK_GAP`], it is picked instead, at most once
//! per gap, so a node that failed once can show it recovered. `Node::weight` is not used, as
//! in Kratos' p2c. Kratos also predicts latency from the age of in-flight requests; that needs
//! a list of start times, so it is left out: a hung node's growing in-flight count already
//! drives its score down.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::ewma::NodeStats;
use crate::node_set::{Candidates, Entry, NodeSet, eligible};
use crate::{Done, Node, NodeFilter, SelectError, Selector, rng};

/// A node not picked for longer than this is picked once when it loses a comparison.
pub(crate) const FORCE_PICK_GAP: Duration = Duration::from_secs(3);

/// The p2c selector.
#[derive(Default)]
pub(crate) struct P2c {
    nodes: NodeSet<NodeStats>,
}

impl P2c {
    /// Picks among the nodes passing `filters` as of `now`.
    pub(crate) fn select_at(
        &self,
        filters: &[NodeFilter],
        now: Instant,
    ) -> Result<(Arc<Node>, Done), SelectError> {
        let entries = self.nodes.load();
        if filters.is_empty() {
            pick(entries.as_slice(), now)
        } else {
            pick(eligible(&entries, filters).as_slice(), now)
        }
    }

    /// Replaces the nodes as of `now`: a new node counts as just picked, so it is not owed a
    /// forced pick before [`FORCE_PICK_GAP`].
    pub(crate) fn apply_at(&self, nodes: Vec<Node>, now: Instant) {
        self.nodes.apply(nodes, || NodeStats::new(now));
    }

    /// The statistics of the node at `address`, if present (tests).
    #[cfg(test)]
    pub(crate) fn stats(&self, address: &str) -> Option<Arc<NodeStats>> {
        self.nodes
            .load()
            .iter()
            .find(|entry| entry.node.address == address)
            .map(|entry| Arc::clone(&entry.state))
    }
}

fn pick<C: Candidates<NodeStats> + ?Sized>(
    candidates: &C,
    now: Instant,
) -> Result<(Arc<Node>, Done), SelectError> {
    let chosen = match candidates.len() {
        0 => return Err(SelectError::NoAvailable),
        1 => candidates.get(0),
        len => {
            let (a, b) = rng::two_distinct(len);
            choose(candidates.get(a), candidates.get(b), now)
        }
    };
    let pick = chosen.state.pick(now);
    Ok((Arc::clone(&chosen.node), Done { pick: Some(pick) }))
}

/// The better of two nodes, or the worse one when it is owed a forced pick.
fn choose<'a>(
    a: &'a Entry<NodeStats>,
    b: &'a Entry<NodeStats>,
    now: Instant,
) -> &'a Entry<NodeStats> {
    let (latency_a, latency_b) = match (a.state.latency(), b.state.latency()) {
        (Some(la), Some(lb)) => (la, lb),
        (Some(la), None) => (la, la),
        (None, Some(lb)) => (lb, lb),
        (None, None) => (0.0, 0.0),
    };
    let (winner, loser) = if b.state.score(latency_b) > a.state.score(latency_a) {
        (b, a)
    } else {
        (a, b)
    };
    if loser.state.try_force(now, FORCE_PICK_GAP) {
        loser
    } else {
        winner
    }
}

impl Selector for P2c {
    fn select(&self, filters: &[NodeFilter]) -> Result<(Arc<Node>, Done), SelectError> {
        self.select_at(filters, Instant::now())
    }

    fn apply(&self, nodes: Vec<Node>) {
        self.apply_at(nodes, Instant::now());
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.nodes()
    }
}
