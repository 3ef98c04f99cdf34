//! The interval tree of one anon_vma: its chain entries keyed by page-offset range.
//!
//! Linux keeps `anon_vma->rb_root`, an augmented rbtree of `anon_vma_chain`s ordered by
//! their vma's `vm_pgoff` and augmented with the largest last page offset of each subtree,
//! so that `anon_vma_interval_tree_foreach(pgoff)` costs O(log n + hits) rather than a scan
//! of every vma that ever shared the anon_vma. This module is the same idea as a treap
//! (a binary search tree ordered by `(start, end, id)` that is heap-ordered by a priority
//! derived from the entry's id, so its expected depth is O(log n) whatever the insertion
//! order), augmented with each subtree's largest `end`.
//!
//! Nodes are allocated by the caller ([`Node::new`]) before any lock is taken, so that
//! [`IntervalTree::insert`] never allocates and linking under the root lock cannot fail;
//! [`IntervalTree::remove`] hands the node back so that it can be freed after unlocking.
//! The tree itself is plain data: whoever owns it (an anon_vma's lock-protected state)
//! decides how it is protected.

use std::cmp::Ordering;
use std::ops::ControlFlow;

/// A node's key: the page-offset range `[start, end)` it covers and the id of the chain
/// entry it belongs to (unique within a context, so keys never collide).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct Key {
    /// First page offset covered.
    pub(crate) start: u64,
    /// One past the last page offset covered.
    pub(crate) end: u64,
    /// The chain entry's id.
    pub(crate) id: u64,
}

type Link<V> = Option<Box<Node<V>>>;

/// One tree node: a chain entry's key and the mapping handle it reports to walks.
#[derive(Debug)]
pub(crate) struct Node<V> {
    key: Key,
    prio: u64,
    /// Largest `end` in this node's subtree (the augmentation).
    max_end: u64,
    value: V,
    left: Link<V>,
    right: Link<V>,
}

/// SplitMix64: a bijective mix, so distinct ids give distinct, well-spread priorities.
fn mix(id: u64) -> u64 {
    let mut z = id.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl<V> Node<V> {
    /// Allocates a detached node for `key` carrying `value`.
    pub(crate) fn new(key: Key, value: V) -> Box<Node<V>> {
        Box::new(Node {
            key,
            prio: mix(key.id),
            max_end: key.end,
            value,
            left: None,
            right: None,
        })
    }

    /// The node's key.
    pub(crate) fn key(&self) -> Key {
        self.key
    }

    fn update(&mut self) {
        let mut m = self.key.end;
        if let Some(l) = &self.left {
            m = m.max(l.max_end);
        }
        if let Some(r) = &self.right {
            m = m.max(r.max_end);
        }
        self.max_end = m;
    }
}

/// An interval tree of chain entries; see the module docs.
#[derive(Debug)]
pub(crate) struct IntervalTree<V> {
    root: Link<V>,
    len: usize,
}

impl<V> Default for IntervalTree<V> {
    fn default() -> Self {
        IntervalTree { root: None, len: 0 }
    }
}

/// Splits `t` into the keys `< key` and the keys `>= key`.
fn split<V>(t: Link<V>, key: &Key) -> (Link<V>, Link<V>) {
    match t {
        None => (None, None),
        Some(mut n) => {
            if n.key < *key {
                let (l, r) = split(n.right.take(), key);
                n.right = l;
                n.update();
                (Some(n), r)
            } else {
                let (l, r) = split(n.left.take(), key);
                n.left = r;
                n.update();
                (l, Some(n))
            }
        }
    }
}

/// Joins `a` and `b`, every key of `a` being smaller than every key of `b`.
fn merge<V>(a: Link<V>, b: Link<V>) -> Link<V> {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(mut a), Some(mut b)) => {
            if a.prio > b.prio {
                a.right = merge(a.right.take(), Some(b));
                a.update();
                Some(a)
            } else {
                b.left = merge(Some(a), b.left.take());
                b.update();
                Some(b)
            }
        }
    }
}

fn insert<V>(link: &mut Link<V>, mut node: Box<Node<V>>) {
    match link {
        Some(n) if n.prio >= node.prio => {
            if node.key < n.key {
                insert(&mut n.left, node);
            } else {
                insert(&mut n.right, node);
            }
            n.update();
        }
        _ => {
            let (l, r) = split(link.take(), &node.key);
            node.left = l;
            node.right = r;
            node.update();
            *link = Some(node);
        }
    }
}

fn remove<V>(link: &mut Link<V>, key: &Key) -> Option<Box<Node<V>>> {
    let ord = key.cmp(&link.as_ref()?.key);
    let removed = match ord {
        Ordering::Less => remove(&mut link.as_mut()?.left, key),
        Ordering::Greater => remove(&mut link.as_mut()?.right, key),
        Ordering::Equal => {
            let mut node = link.take()?;
            *link = merge(node.left.take(), node.right.take());
            node.max_end = node.key.end;
            return Some(node);
        }
    };
    if removed.is_some() {
        if let Some(n) = link.as_mut() {
            n.update();
        }
    }
    removed
}

fn stab<V>(
    link: &Link<V>,
    p: u64,
    visited: &mut u64,
    f: &mut impl FnMut(&V) -> ControlFlow<()>,
) -> ControlFlow<()> {
    let Some(n) = link else {
        return ControlFlow::Continue(());
    };
    if n.max_end <= p {
        return ControlFlow::Continue(());
    }
    *visited += 1;
    stab(&n.left, p, visited, f)?;
    if n.key.start <= p {
        if p < n.key.end {
            f(&n.value)?;
        }
        stab(&n.right, p, visited, f)?;
    }
    ControlFlow::Continue(())
}

impl<V> IntervalTree<V> {
    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// True if the tree holds no entry.
    pub(crate) fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Links a node allocated by [`Node::new`]; never allocates.
    pub(crate) fn insert(&mut self, node: Box<Node<V>>) {
        insert(&mut self.root, node);
        self.len += 1;
    }

    /// Unlinks the node with `key` and returns it (to be freed by the caller, outside any
    /// lock), or `None` if no node has that key.
    pub(crate) fn remove(&mut self, key: &Key) -> Option<Box<Node<V>>> {
        let node = remove(&mut self.root, key);
        if node.is_some() {
            self.len -= 1;
        }
        node
    }

    /// Calls `f` with the value of every entry whose range contains `pgoff`, in key order,
    /// until `f` breaks. Adds to `visited` the number of nodes examined on the way.
    pub(crate) fn for_each_containing(
        &self,
        pgoff: u64,
        visited: &mut u64,
        mut f: impl FnMut(&V) -> ControlFlow<()>,
    ) -> ControlFlow<()> {
        stab(&self.root, pgoff, visited, &mut f)
    }

    /// Every key, in order (tests and statistics).
    #[cfg(all(test, not(loom)))]
    pub(crate) fn keys(&self) -> Vec<Key> {
        fn walk<V>(l: &Link<V>, out: &mut Vec<Key>) {
            if let Some(n) = l {
                walk(&n.left, out);
                out.push(n.key);
                walk(&n.right, out);
            }
        }
        let mut out = Vec::with_capacity(self.len);
        walk(&self.root, &mut out);
        out
    }

    /// Checks the ordering, heap and augmentation invariants; returns the depth.
    #[cfg(all(test, not(loom)))]
    pub(crate) fn check(&self) -> usize {
        fn walk<V>(l: &Link<V>) -> (usize, u64) {
            let Some(n) = l else { return (0, 0) };
            let (dl, ml) = walk(&n.left);
            let (dr, mr) = walk(&n.right);
            if let Some(c) = &n.left {
                assert!(c.key < n.key && c.prio <= n.prio);
            }
            if let Some(c) = &n.right {
                assert!(c.key > n.key && c.prio <= n.prio);
            }
            assert_eq!(n.max_end, n.key.end.max(ml).max(mr));
            (1 + dl.max(dr), n.max_end)
        }
        walk(&self.root).0
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use rand::rngs::SmallRng;
    use rand::{Rng, SeedableRng};

    fn key(start: u64, end: u64, id: u64) -> Key {
        Key { start, end, id }
    }

    fn stab_ids(t: &IntervalTree<u64>, p: u64) -> (Vec<u64>, u64) {
        let mut out = Vec::new();
        let mut visited = 0;
        let _ = t.for_each_containing(p, &mut visited, |v| {
            out.push(*v);
            ControlFlow::Continue(())
        });
        out.sort_unstable();
        (out, visited)
    }

    #[test]
    fn stab_matches_brute_force_under_random_inserts_and_removes() {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut tree = IntervalTree::default();
        let mut live: Vec<Key> = Vec::new();
        for id in 0..2000u64 {
            if !live.is_empty() && rng.random_bool(0.4) {
                let k = live.swap_remove(rng.random_range(0..live.len()));
                let node = tree.remove(&k).expect("live key is in the tree");
                assert_eq!(node.key(), k);
            } else {
                let s = rng.random_range(0..100);
                let k = key(s, s + rng.random_range(1..30), id);
                tree.insert(Node::new(k, id));
                live.push(k);
            }
            assert_eq!(tree.len(), live.len());
            let mut sorted = live.clone();
            sorted.sort_unstable();
            assert_eq!(tree.keys(), sorted);
            if id % 97 == 0 {
                tree.check();
                for p in 0..130 {
                    let mut want: Vec<u64> = live
                        .iter()
                        .filter(|k| k.start <= p && p < k.end)
                        .map(|k| k.id)
                        .collect();
                    want.sort_unstable();
                    assert_eq!(stab_ids(&tree, p).0, want, "pgoff {p}");
                }
            }
        }
    }

    #[test]
    fn removing_a_missing_key_returns_none_and_keeps_len() {
        let mut tree = IntervalTree::default();
        tree.insert(Node::new(key(0, 4, 1), 1u64));
        assert!(tree.remove(&key(0, 4, 2)).is_none());
        assert_eq!(tree.len(), 1);
    }

    #[test]
    fn disjoint_entries_are_found_by_visiting_few_nodes() {
        // 4096 disjoint one-page ranges: a stab must touch O(log n) nodes, not all.
        let mut tree = IntervalTree::default();
        for i in 0..4096u64 {
            tree.insert(Node::new(key(i, i + 1, i), i));
        }
        let depth = tree.check();
        assert!(depth < 64, "treap depth {depth}");
        let (hits, visited) = stab_ids(&tree, 1234);
        assert_eq!(hits, vec![1234]);
        assert!(visited <= 2 * depth as u64, "visited {visited} nodes");
    }

    #[test]
    fn a_break_stops_the_walk() {
        let mut tree = IntervalTree::default();
        for i in 0..10u64 {
            tree.insert(Node::new(key(0, 10, i), i));
        }
        let mut calls = 0;
        let mut visited = 0;
        let r = tree.for_each_containing(5, &mut visited, |_| {
            calls += 1;
            if calls == 3 {
                ControlFlow::Break(())
            } else {
                ControlFlow::Continue(())
            }
        });
        assert_eq!(r, ControlFlow::Break(()));
        assert_eq!(calls, 3);
    }
}
