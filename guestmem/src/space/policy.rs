//! Where a VM's new frames come from: node policies, as Linux's `set_mempolicy`.
//!
//! Each VM has a [`NodePolicy`] (forks inherit it). Every allocation of a fault
//! (zero-fill, copy-on-write, swap-in) asks for its node: the faulting thread's home
//! node ([`set_home_node`]: a vCPU's or fault handler's node) under `FirstTouch`, the
//! given node under `Preferred` and `Bind`, the next node in turn under `Interleave`.
//! Except under `Bind`, a node that is full falls back to the nodes after it, wrapping
//! around (node `n`, then `n + 1`, ..., then `0`, ..., `n - 1`); under `Bind` a full node
//! fails the allocation, which reclaims (with swap) or ends as out of memory.

use std::cell::Cell;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use super::{AddressSpace, SpaceError};
use crate::types::NodeId;

/// Where a VM's new frames come from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub enum NodePolicy {
    /// The faulting thread's home node first ([`set_home_node`]; node 0 where none was
    /// set), then the others: Linux's default local allocation.
    #[default]
    FirstTouch,
    /// This node first, then the others.
    Preferred(NodeId),
    /// This node only.
    Bind(NodeId),
    /// Each allocation from the next node in turn, then the others.
    Interleave,
}

impl NodePolicy {
    fn pack(self) -> u64 {
        match self {
            NodePolicy::FirstTouch => 0,
            NodePolicy::Preferred(n) => 1 | u64::from(n.0) << 8,
            NodePolicy::Bind(n) => 2 | u64::from(n.0) << 8,
            NodePolicy::Interleave => 3,
        }
    }

    fn unpack(v: u64) -> NodePolicy {
        let n = NodeId((v >> 8) as u16);
        match v & 0xff {
            1 => NodePolicy::Preferred(n),
            2 => NodePolicy::Bind(n),
            3 => NodePolicy::Interleave,
            _ => NodePolicy::FirstTouch,
        }
    }

    /// The node it names, if any.
    pub fn node(self) -> Option<NodeId> {
        match self {
            NodePolicy::Preferred(n) | NodePolicy::Bind(n) => Some(n),
            NodePolicy::FirstTouch | NodePolicy::Interleave => None,
        }
    }
}

impl std::fmt::Display for NodePolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NodePolicy::FirstTouch => write!(f, "first-touch"),
            NodePolicy::Preferred(n) => write!(f, "preferred:{}", n.0),
            NodePolicy::Bind(n) => write!(f, "bind:{}", n.0),
            NodePolicy::Interleave => write!(f, "interleave"),
        }
    }
}

thread_local! {
    static HOME: Cell<u16> = const { Cell::new(0) };
}

/// Sets the calling thread's home node: where `FirstTouch` allocations of the faults it
/// resolves come from (a vCPU thread, or a fault handler serving vCPUs of that node).
pub fn set_home_node(node: NodeId) {
    HOME.with(|h| h.set(node.0));
}

/// The calling thread's home node (node 0 unless [`set_home_node`] said otherwise).
pub fn home_node() -> NodeId {
    NodeId(HOME.with(Cell::get))
}

/// A VM's policy and its interleave cursor.
#[derive(Debug, Default)]
pub(super) struct PolicyState {
    packed: AtomicU64,
    next: AtomicU32,
}

impl PolicyState {
    pub(super) fn new(p: NodePolicy) -> PolicyState {
        PolicyState {
            packed: AtomicU64::new(p.pack()),
            next: AtomicU32::new(0),
        }
    }

    pub(super) fn get(&self) -> NodePolicy {
        // Relaxed: a policy change applies to the allocations that see it.
        NodePolicy::unpack(self.packed.load(Ordering::Relaxed))
    }

    /// The node to try first, and whether it is the only one allowed.
    pub(super) fn pick(&self, nodes: usize) -> (NodeId, bool) {
        match self.get() {
            NodePolicy::FirstTouch => (home_node(), false),
            NodePolicy::Preferred(n) => (n, false),
            NodePolicy::Bind(n) => (n, true),
            NodePolicy::Interleave => {
                let i = self.next.fetch_add(1, Ordering::Relaxed) as usize % nodes.max(1);
                (NodeId(i as u16), false)
            }
        }
    }
}

impl AddressSpace {
    /// The VM's node policy.
    pub fn policy(&self) -> NodePolicy {
        self.policy.get()
    }

    /// Sets the VM's node policy for its later allocations (pages already placed stay
    /// where they are: [`AddressSpace::migrate`] moves them).
    pub fn set_policy(&self, p: NodePolicy) -> Result<(), SpaceError> {
        let nodes = self.mm.pool.nodes().len();
        if let Some(node) = p.node().filter(|n| usize::from(n.0) >= nodes) {
            return Err(SpaceError::NoSuchNode { node, nodes });
        }
        self.policy.packed.store(p.pack(), Ordering::Relaxed);
        Ok(())
    }
}

impl AddressSpace {
    /// The VM's resident pages on each node of the pool (a block shared with a fork
    /// counted for each VM sharing it). Blocks whose lock is poisoned are left out.
    pub fn pages_per_node(&self) -> Vec<u64> {
        let mut n = vec![0; self.mm.pool.nodes().len()];
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        for r in &regions.list {
            for b in 0..r.pt.table.blocks() {
                let Ok(slot) = r.pt.table.lock_block(b) else {
                    continue;
                };
                for s in 0..r.pt.table.block_len(b) {
                    if let Some(pfn) = slot.pte(s).frame() {
                        n[usize::from(self.mm.pool.node_of(pfn).id().0)] += 1;
                    }
                }
            }
        }
        n
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn policies_round_trip_through_their_packing() {
        for p in [
            NodePolicy::FirstTouch,
            NodePolicy::Preferred(NodeId(3)),
            NodePolicy::Bind(NodeId(65535)),
            NodePolicy::Interleave,
        ] {
            assert_eq!(NodePolicy::unpack(p.pack()), p);
        }
    }

    #[test]
    fn interleave_takes_every_node_in_turn() {
        let s = PolicyState::new(NodePolicy::Interleave);
        let got: Vec<u16> = (0..6).map(|_| s.pick(3).0.0).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2]);
        set_home_node(NodeId(2));
        assert_eq!(
            PolicyState::new(NodePolicy::FirstTouch).pick(3),
            (NodeId(2), false)
        );
        assert_eq!(
            PolicyState::new(NodePolicy::Bind(NodeId(1))).pick(3),
            (NodeId(1), true)
        );
    }
}
