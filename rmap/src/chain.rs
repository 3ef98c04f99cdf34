//! The region side of the reverse map, and the operations that link and unlink it.
//!
//! A [`RegionRmap`] is what a guest RAM region (Linux: a `vm_area_struct`) keeps for the
//! reverse map: the anon_vma its new copy-on-write frames are filed under, and its chain
//! of entries (Linux: `anon_vma_chain`, here `Avc`), one per anon_vma whose frames it may
//! map. Each entry is listed twice: in the region's chain (here, a `Vec` in the
//! `RegionRmap`) and in that anon_vma's interval tree (a node carrying the region's
//! mapping handle and page-offset range).
//!
//! The operations ([`Rmap::anon_vma_prepare`], [`Rmap::anon_vma_fork`],
//! [`Rmap::anon_vma_clone`], [`Rmap::unlink_anon_vmas`]) live on the [`Rmap`] context,
//! which selects the design ([`Design::Chain`], seed 2, or the pre-2010 [`Design::Flat`])
//! and the clone locking ([`CloneLocking::Batched`], seed 3, or [`CloneLocking::PerEntry`]),
//! holds the counters, and holds the allocation failpoint.
//!
//! Linking allocates (seed 2: "linking a VMA to anon_vmas now involves memory
//! allocations"). Here every chain entry and anon_vma a link needs is allocated *before*
//! any lock is taken or any structure touched; the link phase under the root lock cannot
//! fail. So an allocation failure returns [`RmapError::AllocFailed`] with every structure
//! exactly as it was, which is stronger than Linux (whose `anon_vma_clone` failure leaves
//! the destination unlinked and relies on the caller to tear it down).

use std::fmt;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::anon_vma::{AnonVma, RootWrite};
use crate::counters::{CounterSnapshot, Counters};
use crate::sync::Arc;
use crate::tree::{Key, Node};

/// Which reverse-map design a context builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Design {
    /// anon_vma chains (Linux 2.6.34, seed 2): each fork child gets its own anon_vma for
    /// its COW frames, linked under the parent's root; a region's chain lists every
    /// anon_vma whose frames it may map. A walk of a child's frame examines the child.
    Chain,
    /// One anon_vma shared by a whole fork tree (Linux before 2010): a fork child is
    /// linked to its parent's anon_vma and files its COW frames there too, so a walk of
    /// any frame examines every region of the tree.
    Flat,
}

/// How `anon_vma_clone` (and fork, and unlink) take the root lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CloneLocking {
    /// Take the root lock once for all consecutive chain entries with the same root
    /// (Linus's `lock_anon_vma_root`, seed 3): one acquisition per clone.
    Batched,
    /// Take and release the root lock around each chain entry (Linux before 2011).
    PerEntry,
}

/// A context's choices. The default is what Linux does today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RmapConfig {
    /// The reverse-map design.
    pub design: Design,
    /// The clone locking.
    pub clone_locking: CloneLocking,
    /// Reuse an ancestor's anon_vma on fork when it has no active region and fewer than
    /// two children (Linux commit 7a3ef208, 2014), bounding chain growth when a VM forks
    /// and exits generation after generation. `Chain` only; `Flat` never allocates one.
    pub reuse_anon_vmas: bool,
}

impl Default for RmapConfig {
    fn default() -> Self {
        RmapConfig {
            design: Design::Chain,
            clone_locking: CloneLocking::Batched,
            reuse_anon_vmas: true,
        }
    }
}

/// Errors of the linking operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RmapError {
    /// A region was given an empty or reversed page-offset range.
    #[error(
        "region page-offset range {start}..{end} is empty or reversed: give each region at \
         least one page, with start < end"
    )]
    EmptyRange {
        /// The range's start.
        start: u64,
        /// The range's end.
        end: u64,
    },
    /// An allocation needed to link failed; nothing was changed.
    #[error(
        "out of memory allocating {what} while linking a region; nothing was changed: free \
         memory (or clear the allocation failpoint) and retry the operation"
    )]
    AllocFailed {
        /// What could not be allocated.
        what: &'static str,
    },
    /// A region passed to a context was created by another context.
    #[error(
        "the region was created by another Rmap context: link regions only with the context \
         that created them (each context has its own design, locking and counters)"
    )]
    ForeignRegion,
    /// Fork or clone into a region that is already linked.
    #[error(
        "the destination region is already linked to anon_vmas: fork or clone only into a \
         freshly created region, or call unlink_anon_vmas on it first"
    )]
    AlreadyLinked,
}

/// Process-wide ids for anon_vmas and chain entries (never reused, so keys never collide).
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    // Uniqueness only: `Relaxed` suffices for a read-modify-write counter.
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Allocation budget meaning "no failpoint armed".
const UNLIMITED: u64 = u64::MAX;

#[derive(Debug)]
struct Inner {
    /// Immutable.
    config: RmapConfig,
    /// Atomics; shared with every anon_vma this context creates.
    counters: std::sync::Arc<Counters>,
    /// Allocations still allowed before the failpoint refuses them ([`UNLIMITED`] when
    /// disarmed). A test knob, not a synchronisation variable: `Relaxed`.
    budget: AtomicU64,
}

/// A reverse-map context: the design, the clone locking, the counters and the failpoint.
///
/// Cheap to clone (a shared handle). Every [`RegionRmap`] keeps the context that created
/// it, so that dropping a linked region unlinks it.
#[derive(Debug, Clone)]
pub struct Rmap {
    inner: std::sync::Arc<Inner>,
}

/// One link between a region and an anon_vma (Linux: `struct anon_vma_chain`); the
/// region's chain owns it, and the anon_vma's tree holds its node under `key`.
struct Avc<M> {
    /// Immutable: the key of this entry's node in `anon_vma`'s tree.
    key: Key,
    /// Immutable: the anon_vma this entry links the region to.
    anon_vma: Arc<AnonVma<M>>,
}

impl<M> fmt::Debug for Avc<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Avc")
            .field("id", &self.key.id)
            .field("anon_vma", &self.anon_vma.id())
            .finish()
    }
}

/// The reverse-map side of one region (Linux: the `anon_vma` and `anon_vma_chain` fields
/// of a `vm_area_struct`).
///
/// Its fields change only through `&mut RegionRmap`: the caller serialises changes the
/// way Linux does with `mmap_lock` held for writing (fork, exit, region changes). If the
/// first COW fault of a region runs under the read side, call
/// [`Rmap::anon_vma_prepare`] under a lock of the caller's that serialises it (Linux uses
/// `page_table_lock`), or simply when the region is created.
///
/// Dropping a region that is still linked unlinks it ([`Rmap::unlink_anon_vmas`]).
pub struct RegionRmap<M: Clone + Send + Sync + 'static> {
    /// Immutable: the handle walks report for this region.
    mapping: M,
    /// Immutable: the page offsets this region covers (its tree key).
    pgoff: Range<u64>,
    /// Where this region's new COW frames are filed; `&mut self` to change.
    anon_vma: Option<Arc<AnonVma<M>>>,
    /// Every anon_vma this region may map frames of, oldest first (the root's first);
    /// `&mut self` to change. Contains `anon_vma` whenever that is set.
    chain: Vec<Avc<M>>,
    /// Immutable: the context that links this region.
    rmap: Rmap,
}

impl<M: Clone + Send + Sync + 'static> fmt::Debug for RegionRmap<M> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegionRmap")
            .field("pgoff", &self.pgoff)
            .field("anon_vma", &self.anon_vma.as_ref().map(|a| a.id()))
            .field("chain", &self.chain)
            .finish_non_exhaustive()
    }
}

impl<M: Clone + Send + Sync + 'static> RegionRmap<M> {
    /// The mapping handle walks report for this region.
    pub fn mapping(&self) -> &M {
        &self.mapping
    }

    /// The page offsets this region covers.
    pub fn pgoff(&self) -> Range<u64> {
        self.pgoff.clone()
    }

    /// The anon_vma new COW frames of this region are filed under (set by
    /// [`Rmap::anon_vma_prepare`] or by fork or clone from a prepared region).
    pub fn anon_vma(&self) -> Option<&Arc<AnonVma<M>>> {
        self.anon_vma.as_ref()
    }

    /// The number of entries in this region's chain.
    pub fn chain_len(&self) -> usize {
        self.chain.len()
    }

    /// The anon_vmas this region is linked to, oldest first.
    pub fn chain(&self) -> impl Iterator<Item = &Arc<AnonVma<M>>> {
        self.chain.iter().map(|avc| &avc.anon_vma)
    }

    /// The ids of this region's chain entries, oldest first (for tests that check a
    /// failed operation changed nothing).
    pub fn chain_ids(&self) -> Vec<u64> {
        self.chain.iter().map(|avc| avc.key.id).collect()
    }
}

impl<M: Clone + Send + Sync + 'static> Drop for RegionRmap<M> {
    fn drop(&mut self) {
        if !self.chain.is_empty() {
            let rmap = self.rmap.clone();
            rmap.unlink(self);
        }
    }
}

/// Takes root write locks for a sequence of chain entries: once per run of entries with
/// the same root (batched), or once per entry.
struct RootLocker<'a, M> {
    batched: bool,
    held: Option<RootWrite<'a, M>>,
}

impl<'a, M> RootLocker<'a, M> {
    fn new(locking: CloneLocking) -> Self {
        RootLocker {
            batched: locking == CloneLocking::Batched,
            held: None,
        }
    }

    /// The write guard of `av`'s root, taking it (and dropping another root's) if needed.
    fn lock(&mut self, av: &'a AnonVma<M>) -> &mut RootWrite<'a, M> {
        let root = av.root();
        if !matches!(&self.held, Some(g) if std::ptr::eq(g.root(), root)) {
            self.held = None;
        }
        self.held.get_or_insert_with(|| root.lock_write())
    }

    /// Ends one entry's critical section: unlocks unless batching.
    fn entry_done(&mut self) {
        if !self.batched {
            self.held = None;
        }
    }
}

impl Default for Rmap {
    fn default() -> Self {
        Rmap::new(RmapConfig::default())
    }
}

impl Rmap {
    /// A new context with `config`.
    pub fn new(config: RmapConfig) -> Rmap {
        Rmap {
            inner: std::sync::Arc::new(Inner {
                config,
                counters: std::sync::Arc::new(Counters::default()),
                budget: AtomicU64::new(UNLIMITED),
            }),
        }
    }

    /// The context's configuration.
    pub fn config(&self) -> RmapConfig {
        self.inner.config
    }

    /// The live counters (shared by every anon_vma and region of this context).
    pub fn counters(&self) -> &Counters {
        &self.inner.counters
    }

    /// A copy of the counters now.
    pub fn snapshot(&self) -> CounterSnapshot {
        self.inner.counters.snapshot()
    }

    /// Arms the allocation failpoint: the next `n` allocations of chain entries and
    /// anon_vmas succeed, every later one fails with [`RmapError::AllocFailed`].
    pub fn fail_allocations_after(&self, n: u64) {
        self.inner
            .budget
            .store(n.min(UNLIMITED - 1), Ordering::Relaxed);
    }

    /// Disarms the allocation failpoint.
    pub fn clear_failpoint(&self) {
        self.inner.budget.store(UNLIMITED, Ordering::Relaxed);
    }

    /// A new, unlinked region reporting `mapping` to walks and covering page offsets
    /// `pgoff` (in the space its frames' page offsets use, shared by its fork tree).
    pub fn region<M: Clone + Send + Sync + 'static>(
        &self,
        mapping: M,
        pgoff: Range<u64>,
    ) -> Result<RegionRmap<M>, RmapError> {
        if pgoff.start >= pgoff.end {
            return Err(RmapError::EmptyRange {
                start: pgoff.start,
                end: pgoff.end,
            });
        }
        Ok(RegionRmap {
            mapping,
            pgoff,
            anon_vma: None,
            chain: Vec::new(),
            rmap: self.clone(),
        })
    }

    fn check<M: Clone + Send + Sync + 'static>(&self, r: &RegionRmap<M>) -> Result<(), RmapError> {
        if std::sync::Arc::ptr_eq(&r.rmap.inner, &self.inner) {
            Ok(())
        } else {
            Err(RmapError::ForeignRegion)
        }
    }

    fn fail(&self, what: &'static str) -> RmapError {
        Counters::add(&self.inner.counters.alloc_failures, 1);
        RmapError::AllocFailed { what }
    }

    /// Charges one allocation to the failpoint budget.
    fn charge(&self, what: &'static str) -> Result<(), RmapError> {
        let ok = self
            .inner
            .budget
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| match n {
                UNLIMITED => Some(n),
                0 => None,
                n => Some(n - 1),
            })
            .is_ok();
        if ok { Ok(()) } else { Err(self.fail(what)) }
    }

    fn reserve<T>(&self, v: &mut Vec<T>, n: usize) -> Result<(), RmapError> {
        v.try_reserve(n)
            .map_err(|_| self.fail("room in a region's chain"))
    }

    /// Allocates `n` detached tree nodes for region `r`; on failure frees what it got.
    fn alloc_avcs<M: Clone + Send + Sync + 'static>(
        &self,
        r: &RegionRmap<M>,
        n: usize,
    ) -> Result<Vec<Box<Node<M>>>, RmapError> {
        let mut nodes = Vec::new();
        self.reserve(&mut nodes, n)?;
        for _ in 0..n {
            if let Err(e) = self.charge("a chain entry (Avc)") {
                self.free_avcs(nodes);
                return Err(e);
            }
            let key = Key {
                start: r.pgoff.start,
                end: r.pgoff.end,
                id: next_id(),
            };
            nodes.push(Node::new(key, r.mapping.clone()));
            Counters::add(&self.inner.counters.avcs_allocated, 1);
        }
        Ok(nodes)
    }

    fn free_avcs<M>(&self, nodes: impl IntoIterator<Item = Box<Node<M>>>) {
        let n = nodes.into_iter().count();
        Counters::add(&self.inner.counters.avcs_freed, n as u64);
    }

    /// Makes sure `r` has an anon_vma for its new COW frames (Linux:
    /// `anon_vma_prepare`) and returns it: a new root anon_vma with one chain entry
    /// linking `r`, if `r` had none. Call before filing the first COW or zero-fill frame
    /// of a region.
    ///
    /// On [`RmapError::AllocFailed`] nothing changed. Takes the new root's lock once.
    pub fn anon_vma_prepare<M: Clone + Send + Sync + 'static>(
        &self,
        r: &mut RegionRmap<M>,
    ) -> Result<Arc<AnonVma<M>>, RmapError> {
        self.check(r)?;
        if let Some(av) = &r.anon_vma {
            return Ok(av.clone());
        }
        self.reserve(&mut r.chain, 1)?;
        let mut nodes = self.alloc_avcs(r, 1)?;
        if let Err(e) = self.charge("an anon_vma") {
            self.free_avcs(nodes);
            return Err(e);
        }
        let av = AnonVma::new_root(next_id(), self.inner.counters.clone());
        let Some(node) = nodes.pop() else {
            unreachable!("alloc_avcs returned the one node asked for")
        };
        let key = node.key();
        {
            let mut guard = av.lock_write();
            av.with_locked_mut(&mut guard, |l| {
                l.tree.insert(node);
                l.num_active_vmas += 1;
            });
        }
        r.chain.push(Avc {
            key,
            anon_vma: av.clone(),
        });
        r.anon_vma = Some(av.clone());
        Ok(av)
    }

    /// Links a fork child's region (Linux: `anon_vma_fork`). `child` must be fresh
    /// (created by [`Rmap::region`], never linked); `parent` is the region it copies.
    ///
    /// `Chain`: `child` is linked to every anon_vma on `parent`'s chain (its shared
    /// frames may be found through any of them), then gets an anon_vma of its own, a
    /// child of `parent`'s, for the frames it will COW; with `reuse_anon_vmas`, an
    /// ancestor's anon_vma with no active region and fewer than two children is reused
    /// instead (commit 7a3ef208). `Flat`: `child` is linked to `parent`'s one anon_vma
    /// and shares it. If `parent` has no anon_vma there is nothing to share and `child`
    /// stays unlinked.
    ///
    /// Root locks: one with [`CloneLocking::Batched`]; one per entry of the child's
    /// chain with [`CloneLocking::PerEntry`]. On error nothing changed.
    pub fn anon_vma_fork<M: Clone + Send + Sync + 'static>(
        &self,
        child: &mut RegionRmap<M>,
        parent: &RegionRmap<M>,
    ) -> Result<(), RmapError> {
        self.link(child, parent, self.inner.config.design == Design::Chain)
    }

    /// Links `dst` to every anon_vma `src` is linked to, and files `dst`'s new COW frames
    /// where `src`'s go (Linux: `anon_vma_clone` for a region split or copy). `dst` must
    /// be fresh; its range may differ from `src`'s.
    ///
    /// Root locks: one with [`CloneLocking::Batched`], one per chain entry with
    /// [`CloneLocking::PerEntry`]. On error nothing changed.
    pub fn anon_vma_clone<M: Clone + Send + Sync + 'static>(
        &self,
        dst: &mut RegionRmap<M>,
        src: &RegionRmap<M>,
    ) -> Result<(), RmapError> {
        self.link(dst, src, false)
    }

    /// The common part of fork and clone: `own` asks for a fork child's own anon_vma.
    fn link<M: Clone + Send + Sync + 'static>(
        &self,
        dst: &mut RegionRmap<M>,
        src: &RegionRmap<M>,
        own: bool,
    ) -> Result<(), RmapError> {
        self.check(dst)?;
        self.check(src)?;
        if dst.anon_vma.is_some() || !dst.chain.is_empty() {
            return Err(RmapError::AlreadyLinked);
        }
        let Some(src_av) = src.anon_vma.clone() else {
            return Ok(());
        };
        let cfg = self.inner.config;
        let n = src.chain.len();
        let extra = usize::from(own);

        // Phase 1: allocate everything; nothing is linked yet, so failure changes nothing.
        self.reserve(&mut dst.chain, n + extra)?;
        let mut nodes = self.alloc_avcs(dst, n + extra)?;
        let mut own_node = if own { nodes.pop() } else { None };
        let own_av = if own {
            if let Err(e) = self.charge("an anon_vma") {
                self.free_avcs(nodes.into_iter().chain(own_node));
                return Err(e);
            }
            Some(AnonVma::new_child(
                next_id(),
                &src_av,
                self.inner.counters.clone(),
            ))
        } else {
            None
        };

        // Phase 2: link under the root lock; cannot fail.
        let mut active: Option<Arc<AnonVma<M>>> = None;
        let mut reused = false;
        {
            let mut locker = RootLocker::new(cfg.clone_locking);
            for (avc, node) in src.chain.iter().zip(nodes) {
                let av = &avc.anon_vma;
                let key = node.key();
                let guard = locker.lock(av);
                av.with_locked_mut(guard, |l| {
                    l.tree.insert(node);
                    if active.is_some() {
                        return;
                    }
                    // Decide and account under the same lock hold, so that two forks
                    // cannot both reuse one anon_vma (the 2022 "double reuse" bug).
                    let take = if own {
                        cfg.reuse_anon_vmas && l.num_children < 2 && l.num_active_vmas == 0
                    } else {
                        Arc::ptr_eq(av, &src_av)
                    };
                    if take {
                        l.num_active_vmas += 1;
                        active = Some(av.clone());
                        reused = own;
                    }
                });
                dst.chain.push(Avc {
                    key,
                    anon_vma: av.clone(),
                });
                locker.entry_done();
            }
            if let (None, Some(av)) = (&active, &own_av)
                && let Some(node) = own_node.take()
            {
                let key = node.key();
                let guard = locker.lock(av);
                av.with_locked_mut(guard, |l| {
                    l.tree.insert(node);
                    l.num_active_vmas += 1;
                });
                src_av.with_locked_mut(guard, |l| l.num_children += 1);
                dst.chain.push(Avc {
                    key,
                    anon_vma: av.clone(),
                });
                active = Some(av.clone());
                locker.entry_done();
            }
        }
        if reused {
            Counters::add(&self.inner.counters.anon_vmas_reused, 1);
        }
        dst.anon_vma = active;
        // Unused preallocations are released outside the lock (`own_av` by its drop).
        self.free_avcs(own_node);
        drop(own_av);
        Ok(())
    }

    /// Unlinks `r` from every anon_vma (Linux: `unlink_anon_vmas`, at exit or region
    /// removal), in Linus's two passes (seed 3): the first, under the root lock (once
    /// with batching), removes each chain entry from its anon_vma's tree, newest first,
    /// and settles the counts that the reuse rule reads (`num_children` of an anon_vma
    /// whose tree became empty, `num_active_vmas`); the second, after unlocking, frees
    /// the entries and drops the references to the anon_vmas, which frees those no frame
    /// refers to any more. Mapping handles are thus dropped outside the lock.
    ///
    /// Always succeeds; a region already unlinked is left as it is. `r` may be relinked.
    pub fn unlink_anon_vmas<M: Clone + Send + Sync + 'static>(&self, r: &mut RegionRmap<M>) {
        let rmap = r.rmap.clone();
        rmap.unlink(r);
    }

    fn unlink<M: Clone + Send + Sync + 'static>(&self, r: &mut RegionRmap<M>) {
        let chain = std::mem::take(&mut r.chain);
        let active = r.anon_vma.take();
        let mut removed = Vec::with_capacity(chain.len());
        {
            let mut locker = RootLocker::new(self.inner.config.clone_locking);
            for avc in chain.iter().rev() {
                let av = &*avc.anon_vma;
                let is_active = active
                    .as_ref()
                    .is_some_and(|a| Arc::ptr_eq(a, &avc.anon_vma));
                let guard = locker.lock(av);
                let now_empty = av.with_locked_mut(guard, |l| {
                    if let Some(node) = l.tree.remove(&avc.key) {
                        removed.push(node);
                    }
                    if is_active {
                        debug_assert!(l.num_active_vmas > 0);
                        l.num_active_vmas = l.num_active_vmas.saturating_sub(1);
                    }
                    l.tree.is_empty()
                });
                if now_empty {
                    if let Some(parent) = av.parent() {
                        parent.with_locked_mut(guard, |l| {
                            debug_assert!(l.num_children > 0);
                            l.num_children = l.num_children.saturating_sub(1);
                        });
                    }
                }
                locker.entry_done();
            }
        }
        // Second pass, unlocked: free the entries, then drop the anon_vma references.
        self.free_avcs(removed);
        drop(chain);
        drop(active);
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn ctx(design: Design, clone_locking: CloneLocking, reuse: bool) -> Rmap {
        Rmap::new(RmapConfig {
            design,
            clone_locking,
            reuse_anon_vmas: reuse,
        })
    }

    #[test]
    fn empty_range_is_refused() {
        let rmap = Rmap::default();
        assert_eq!(
            rmap.region(1u32, 5..5).unwrap_err(),
            RmapError::EmptyRange { start: 5, end: 5 }
        );
    }

    #[test]
    fn prepare_creates_one_root_with_the_region_linked() {
        let rmap = Rmap::default();
        let mut r = rmap.region(1u32, 0..10).unwrap();
        let av = rmap.anon_vma_prepare(&mut r).unwrap();
        assert!(av.is_root());
        assert_eq!(r.chain_len(), 1);
        let again = rmap.anon_vma_prepare(&mut r).unwrap();
        assert!(Arc::ptr_eq(&av, &again));
        let s = av.stats();
        assert_eq!((s.linked, s.num_children, s.num_active_vmas), (1, 1, 1));
    }

    #[test]
    fn chain_fork_gives_child_its_own_anon_vma_under_the_parents_root() {
        let rmap = ctx(Design::Chain, CloneLocking::Batched, true);
        let mut p = rmap.region(1u32, 0..10).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let mut c = rmap.region(2u32, 0..10).unwrap();
        rmap.anon_vma_fork(&mut c, &p).unwrap();
        let cav = c.anon_vma().unwrap();
        assert!(!Arc::ptr_eq(cav, &pav));
        assert!(std::ptr::eq(cav.root(), &*pav));
        assert_eq!(c.chain_len(), 2);
        assert_eq!(pav.stats().linked, 2);
        assert_eq!(pav.stats().num_children, 2, "self link plus the child");
        assert_eq!(cav.stats().linked, 1);
    }

    #[test]
    fn flat_fork_shares_the_parents_anon_vma() {
        let rmap = ctx(Design::Flat, CloneLocking::Batched, true);
        let mut p = rmap.region(1u32, 0..10).unwrap();
        let pav = rmap.anon_vma_prepare(&mut p).unwrap();
        let mut c = rmap.region(2u32, 0..10).unwrap();
        rmap.anon_vma_fork(&mut c, &p).unwrap();
        assert!(Arc::ptr_eq(c.anon_vma().unwrap(), &pav));
        assert_eq!(c.chain_len(), 1);
        assert_eq!(pav.stats().linked, 2);
    }

    #[test]
    fn batched_fork_takes_the_root_lock_once_and_per_entry_once_per_entry() {
        for (locking, want) in [(CloneLocking::Batched, 1), (CloneLocking::PerEntry, 4)] {
            let rmap = ctx(Design::Chain, locking, false);
            let mut a = rmap.region(1u32, 0..4).unwrap();
            rmap.anon_vma_prepare(&mut a).unwrap();
            let mut b = rmap.region(2u32, 0..4).unwrap();
            rmap.anon_vma_fork(&mut b, &a).unwrap();
            let mut c = rmap.region(3u32, 0..4).unwrap();
            rmap.anon_vma_fork(&mut c, &b).unwrap();
            assert_eq!(c.chain_len(), 3);
            let before = rmap.snapshot();
            let mut d = rmap.region(4u32, 0..4).unwrap();
            rmap.anon_vma_fork(&mut d, &c).unwrap();
            assert_eq!(
                rmap.snapshot().since(&before).lock_write,
                want,
                "{locking:?}"
            );
        }
    }

    #[test]
    fn fork_then_exit_generations_reuse_and_keep_the_chain_short() {
        for (reuse, max_len) in [(true, 3), (false, 51)] {
            let rmap = ctx(Design::Chain, CloneLocking::Batched, reuse);
            let mut cur = rmap.region(0u32, 0..8).unwrap();
            rmap.anon_vma_prepare(&mut cur).unwrap();
            for g in 1..=50u32 {
                let mut child = rmap.region(g, 0..8).unwrap();
                rmap.anon_vma_fork(&mut child, &cur).unwrap();
                rmap.unlink_anon_vmas(&mut cur);
                cur = child;
            }
            assert!(
                cur.chain_len() <= max_len,
                "reuse {reuse}: {}",
                cur.chain_len()
            );
            if !reuse {
                assert_eq!(cur.chain_len(), max_len);
            }
        }
    }

    #[test]
    fn unlinking_everything_frees_every_avc_and_anon_vma() {
        let rmap = Rmap::default();
        {
            let mut p = rmap.region(1u32, 0..4).unwrap();
            rmap.anon_vma_prepare(&mut p).unwrap();
            let mut kids = Vec::new();
            for i in 0..5 {
                let mut c = rmap.region(10 + i, 0..4).unwrap();
                rmap.anon_vma_fork(&mut c, &p).unwrap();
                kids.push(c);
            }
            let mut split = rmap.region(99u32, 1..3).unwrap();
            rmap.anon_vma_clone(&mut split, &kids[0]).unwrap();
            rmap.unlink_anon_vmas(&mut kids[1]);
        } // the rest unlink on drop
        let s = rmap.snapshot();
        assert_eq!(s.avcs_allocated, s.avcs_freed);
        assert_eq!(s.anon_vmas_allocated, s.anon_vmas_freed);
    }

    #[test]
    fn regions_of_another_context_are_refused() {
        let a = Rmap::default();
        let b = Rmap::default();
        let mut p = a.region(1u32, 0..4).unwrap();
        a.anon_vma_prepare(&mut p).unwrap();
        let mut c = b.region(2u32, 0..4).unwrap();
        assert_eq!(b.anon_vma_fork(&mut c, &p), Err(RmapError::ForeignRegion));
    }

    #[test]
    fn fork_into_a_linked_region_is_refused() {
        let rmap = Rmap::default();
        let mut p = rmap.region(1u32, 0..4).unwrap();
        rmap.anon_vma_prepare(&mut p).unwrap();
        let mut c = rmap.region(2u32, 0..4).unwrap();
        rmap.anon_vma_fork(&mut c, &p).unwrap();
        assert_eq!(
            rmap.anon_vma_fork(&mut c, &p),
            Err(RmapError::AlreadyLinked)
        );
    }

    #[test]
    fn failed_prepare_changes_nothing() {
        let rmap = Rmap::default();
        let mut r = rmap.region(1u32, 0..4).unwrap();
        for budget in 0..2 {
            rmap.fail_allocations_after(budget);
            assert!(matches!(
                rmap.anon_vma_prepare(&mut r),
                Err(RmapError::AllocFailed { .. })
            ));
            assert!(r.anon_vma().is_none());
            assert_eq!(r.chain_len(), 0);
        }
        rmap.clear_failpoint();
        rmap.anon_vma_prepare(&mut r).unwrap();
        let s = rmap.snapshot();
        assert_eq!(s.alloc_failures, 2);
        assert_eq!(s.avcs_allocated - s.avcs_freed, 1);
    }
}
