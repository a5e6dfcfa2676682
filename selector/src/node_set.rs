//! The node list shared by every algorithm: swapped whole on apply, read lock-free on select.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::{Node, NodeFilter};

/// One node and the algorithm's per-node state, which survives apply.
pub(crate) struct Entry<S> {
    pub(crate) node: Arc<Node>,
    pub(crate) state: Arc<S>,
}

/// The current nodes of a selector.
pub(crate) struct NodeSet<S> {
    entries: ArcSwap<Vec<Entry<S>>>,
    /// Serialises writers so each apply diffs against the snapshot it replaces.
    apply_lock: Mutex<()>,
}

impl<S> Default for NodeSet<S> {
    fn default() -> Self {
        NodeSet {
            entries: ArcSwap::from_pointee(Vec::new()),
            apply_lock: Mutex::new(()),
        }
    }
}

impl<S> NodeSet<S> {
    /// The current snapshot; cheap and lock-free.
    pub(crate) fn load(&self) -> arc_swap::Guard<Arc<Vec<Entry<S>>>> {
        self.entries.load()
    }

    /// Replaces the nodes. A node whose (address, tls) was present keeps its state; others get
    /// `new_state`. When an address appears twice, only the first occurrence inherits.
    pub(crate) fn apply(&self, nodes: Vec<Node>, new_state: impl Fn() -> S) {
        // A poisoned lock only means another apply panicked; the swap below is still sound.
        let _writer = self
            .apply_lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let old = self.entries.load_full();
        // Old state by address, then by tls flag.
        let mut survivors: HashMap<&str, [Option<&Arc<S>>; 2]> = HashMap::new();
        for entry in old.iter() {
            let slots = survivors.entry(entry.node.address.as_str()).or_default();
            let slot = &mut slots[usize::from(entry.node.tls)];
            if slot.is_none() {
                *slot = Some(&entry.state);
            }
        }
        let entries = nodes
            .into_iter()
            .map(|node| {
                let inherited = survivors
                    .get_mut(node.address.as_str())
                    .and_then(|slots| slots[usize::from(node.tls)].take());
                let state = match inherited {
                    Some(state) => Arc::clone(state),
                    None => Arc::new(new_state()),
                };
                Entry {
                    node: Arc::new(node),
                    state,
                }
            })
            .collect();
        self.entries.store(Arc::new(entries));
    }

    /// The current nodes in apply order.
    pub(crate) fn nodes(&self) -> Vec<Arc<Node>> {
        self.load()
            .iter()
            .map(|entry| Arc::clone(&entry.node))
            .collect()
    }
}

/// Random access to the nodes a pick chooses from: the whole set or a filtered subset.
pub(crate) trait Candidates<S> {
    fn len(&self) -> usize;
    fn get(&self, index: usize) -> &Entry<S>;
}

impl<S> Candidates<S> for [Entry<S>] {
    fn len(&self) -> usize {
        <[Entry<S>]>::len(self)
    }

    fn get(&self, index: usize) -> &Entry<S> {
        &self[index]
    }
}

impl<S> Candidates<S> for [&Entry<S>] {
    fn len(&self) -> usize {
        <[&Entry<S>]>::len(self)
    }

    fn get(&self, index: usize) -> &Entry<S> {
        self[index]
    }
}

/// The entries passing every filter.
pub(crate) fn eligible<'a, S>(
    entries: &'a [Entry<S>],
    filters: &[NodeFilter],
) -> Vec<&'a Entry<S>> {
    // One allocation, sized for the worst case, instead of regrowing as matches come in.
    let mut passing = Vec::with_capacity(entries.len());
    passing.extend(
        entries
            .iter()
            .filter(|entry| filters.iter().all(|filter| filter(&entry.node))),
    );
    passing
}
