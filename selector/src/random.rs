//! Uniform random selection.

use std::sync::Arc;

use crate::node_set::{Candidates, NodeSet, eligible};
use crate::{Done, Node, NodeFilter, SelectError, Selector, rng};

/// Picks uniformly among the eligible nodes; keeps no statistics.
#[derive(Default)]
pub(crate) struct Random {
    nodes: NodeSet<()>,
}

fn pick<C: Candidates<()> + ?Sized>(candidates: &C) -> Result<(Arc<Node>, Done), SelectError> {
    match candidates.len() {
        0 => Err(SelectError::NoAvailable),
        1 => Ok((Arc::clone(&candidates.get(0).node), Done::untracked())),
        len => Ok((
            Arc::clone(&candidates.get(rng::index(len)).node),
            Done::untracked(),
        )),
    }
}

impl Selector for Random {
    fn select(&self, filters: &[NodeFilter]) -> Result<(Arc<Node>, Done), SelectError> {
        let entries = self.nodes.load();
        if filters.is_empty() {
            pick(entries.as_slice())
        } else {
            pick(eligible(&entries, filters).as_slice())
        }
    }

    fn apply(&self, nodes: Vec<Node>) {
        self.nodes.apply(nodes, || ());
    }

    fn nodes(&self) -> Vec<Arc<Node>> {
        self.nodes.nodes()
    }
}
