//! Nodes and the pool: the host frames the manager owns.
//!
//! A [`Node`] is one memfd of frames (a NUMA-style zone), mapped once into the VMM as the
//! node's direct map, with a [`Frame`] descriptor per frame and an allocator in front of
//! its buddy zone. A [`Pool`] is the set of nodes; frame numbers ([`Pfn`]) are global in a
//! pool, node `n` owning a contiguous range of them.
//!
//! Nothing reaches a new owner with an old owner's bytes: a frame handed out with
//! [`FrameInit::Zeroed`] is zeroed unless it is known to be zero already (fresh memfd
//! pages, or pages returned to the host with [`Pool::release_free_memory`], which read as
//! zero and cost no host memory). Callers that overwrite every byte (copy-on-write,
//! swap-in, migration) ask for [`FrameInit::Overwritten`] and skip the zeroing.

use std::os::fd::{AsFd, BorrowedFd};

use crate::alloc::{Allocator, AllocatorKind};
use crate::frame::{Frame, FrameFlags};
use crate::host::{DirectMap, HostError, Memfd, cpu_count, current_cpu};
use crate::types::{NodeId, Order, PAGE_SIZE, Pfn};

/// What the caller will do with a new frame's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameInit {
    /// The frame must read as zero.
    Zeroed,
    /// The caller overwrites every byte before anyone else can read it.
    Overwritten,
}

/// The pool cannot satisfy an allocation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    /// No node has a free run of the requested size.
    #[error(
        "the frame pool is exhausted: no node has {frames} free contiguous frame(s) ({free} frames free in all); give the pool more memory or run fewer or smaller VMs"
    )]
    Exhausted {
        /// Frames requested (2^order).
        frames: u32,
        /// Free frames in the pool when the request failed.
        free: u64,
    },
    /// The host would not back the frames with memory.
    #[error(
        "the host could not back {frames} frame(s) with memory ({reason}); free host memory or give the pool less"
    )]
    HostMemory {
        /// Frames requested.
        frames: u32,
        /// The host's error.
        reason: String,
    },
}

/// Errors creating a pool.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// A pool needs at least one node with at least one frame.
    #[error(
        "a frame pool needs at least one node of at least {min} frames; node {node} has {frames}"
    )]
    TooSmall {
        /// The node.
        node: usize,
        /// Its frames.
        frames: u32,
        /// The minimum.
        min: u32,
    },
    /// The pool's frames do not fit in a 32-bit frame number, or it has too many nodes.
    #[error(
        "a pool of {frames} frames in {nodes} node(s) cannot be indexed: at most {max_frames} frames (16 TiB) in at most {max_nodes} nodes; use a smaller pool"
    )]
    TooLarge {
        /// Frames asked for in all.
        frames: u64,
        /// Nodes asked for.
        nodes: usize,
        /// The most frames a pool can have.
        max_frames: u64,
        /// The most nodes a pool can have.
        max_nodes: usize,
    },
    /// The pool's bookkeeping alone would take too much of the host's memory.
    #[error(
        "a pool of {pool} bytes needs {meta} bytes of frame descriptors, more than a quarter of the host's {host} bytes; use a smaller pool"
    )]
    TooLargeForHost {
        /// Pool size.
        pool: u64,
        /// Bookkeeping it needs.
        meta: u64,
        /// Host memory.
        host: u64,
    },
    /// A host call failed.
    #[error(transparent)]
    Host(#[from] HostError),
}

/// Bytes of bookkeeping per frame: its descriptor plus the buddy lists' entries.
const DESCRIPTOR_BYTES: u64 = std::mem::size_of::<Frame>() as u64 + 12;

/// The host's memory (`MemTotal`), if it can be read.
fn host_memory_bytes() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// How to build one node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeConfig {
    /// Frames in the node (a pool holds at most 2^32 - 1 in all; [`Pool::new`] checks).
    pub frames: u64,
    /// Host NUMA node to bind the node's memory to, if any.
    pub host_node: Option<u32>,
}

/// How to build a pool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// One entry per node.
    pub nodes: Vec<NodeConfig>,
    /// The allocator design every node uses.
    pub allocator: AllocatorKind,
}

impl PoolConfig {
    /// `nodes` nodes of `bytes / nodes` each, unbound, with `allocator`.
    pub fn uniform(bytes: u64, nodes: usize, allocator: AllocatorKind) -> PoolConfig {
        let nodes = nodes.max(1);
        // No clamp: a size beyond what frame numbers can index is refused by `Pool::new`.
        let frames = bytes / PAGE_SIZE as u64 / nodes as u64;
        PoolConfig {
            nodes: vec![
                NodeConfig {
                    frames,
                    host_node: None,
                };
                nodes
            ],
            allocator,
        }
    }
}

/// One node: a memfd of frames, its direct map, descriptors and allocator.
#[derive(Debug)]
pub struct Node {
    /// Fault injection: when set, backing frames with host memory fails as if the host
    /// were out of memory (tests only; see [`Pool::inject_host_memory_failure`]).
    fail_backing: std::sync::atomic::AtomicBool,
    id: NodeId,
    base: Pfn,
    frames: Box<[Frame]>,
    alloc: Allocator,
    map: DirectMap,
    memfd: Memfd,
    host_node: Option<u32>,
}

impl Node {
    fn new(
        id: NodeId,
        base: Pfn,
        frames: u32,
        cfg: &NodeConfig,
        kind: AllocatorKind,
    ) -> Result<Node, PoolError> {
        let bytes = u64::from(frames) * PAGE_SIZE as u64;
        let memfd = Memfd::create(&format!("guestmem-node{}", id.0), bytes)?;
        let map = DirectMap::new(&memfd)?;
        if let Some(h) = cfg.host_node {
            map.bind_to_host_node(h)?;
        }
        let count = frames;
        let frames: Box<[Frame]> = (0..count).map(|_| Frame::default()).collect();
        for f in frames.iter() {
            f.set(FrameFlags::KNOWN_ZERO | FrameFlags::UNBACKED);
        }
        Ok(Node {
            fail_backing: std::sync::atomic::AtomicBool::new(false),
            id,
            base,
            frames,
            alloc: Allocator::new(kind, count, cpu_count()),
            map,
            memfd,
            host_node: cfg.host_node,
        })
    }

    /// The host NUMA node its memory is bound to, if any.
    pub fn host_node(&self) -> Option<u32> {
        self.host_node
    }

    /// The node's id.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The node's first frame.
    pub fn base(&self) -> Pfn {
        self.base
    }

    /// Frames in the node.
    pub fn frames(&self) -> u32 {
        self.frames.len() as u32
    }

    /// Whether `pfn` belongs to this node.
    pub fn contains(&self, pfn: Pfn) -> bool {
        pfn.0.wrapping_sub(self.base.0) < self.frames()
    }

    /// The node's memfd (for mapping frames into guest windows).
    pub fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    /// Byte offset of `pfn` in the node's memfd.
    pub fn file_offset(&self, pfn: Pfn) -> u64 {
        debug_assert!(self.contains(pfn));
        u64::from(pfn.0 - self.base.0) * PAGE_SIZE as u64
    }

    #[inline]
    fn local(&self, pfn: Pfn) -> u32 {
        debug_assert!(self.contains(pfn), "{pfn:?} is not on {:?}", self.id);
        pfn.0 - self.base.0
    }

    /// Allocates `2^order` contiguous frames on this node; `Ok(None)` when the node has no
    /// free run that large.
    ///
    /// Frames without host memory behind them (`UNBACKED`) are backed first, with one
    /// `fallocate` for the run, before they are published to their owner: a host view
    /// could not map a memfd hole, and a copy into one could fail with SIGBUS under host
    /// memory pressure. If the host refuses, the frames go back untouched.
    #[inline]
    pub fn alloc(&self, order: Order, init: FrameInit) -> Result<Option<Pfn>, AllocError> {
        let Some(first) = self.alloc.alloc(order.get(), current_cpu()) else {
            return Ok(None);
        };
        let run = first..first + order.frames();
        // The frames are free (refcount 0) and ours: no one else reads their flags' meaning.
        if run.clone().any(|i| {
            self.frames[i as usize]
                .flags()
                .contains(FrameFlags::UNBACKED)
        }) {
            let len = u64::from(order.frames()) * PAGE_SIZE as u64;
            let offset = u64::from(first) * PAGE_SIZE as u64;
            let backed = if self.fail_backing.load(std::sync::atomic::Ordering::Relaxed) {
                Err(HostError::Allocate {
                    offset,
                    bytes: len,
                    source: std::io::Error::from_raw_os_error(libc::ENOMEM),
                })
            } else {
                self.memfd.allocate(offset, len)
            };
            if let Err(e) = backed {
                self.alloc.free(first, order.get(), current_cpu());
                return Err(AllocError::HostMemory {
                    frames: order.frames(),
                    reason: e.to_string(),
                });
            }
            for i in run.clone() {
                self.frames[i as usize].clear(FrameFlags::UNBACKED);
            }
        }
        for i in run {
            let was = self.frames[i as usize].prep_new();
            if init == FrameInit::Zeroed && !was.contains(FrameFlags::KNOWN_ZERO) {
                // SAFETY: frame `i` was just handed to us by the allocator, so no one
                // else reads or writes its bytes; the pointer is in the direct map.
                unsafe { std::ptr::write_bytes(self.page_ptr_local(i), 0, PAGE_SIZE) };
            }
        }
        Ok(Some(Pfn(self.base.0 + first)))
    }

    /// Frees `2^order` frames starting at `pfn`. The caller gives up every reference.
    #[inline]
    pub fn free(&self, pfn: Pfn, order: Order) {
        let first = self.local(pfn);
        for i in first..first + order.frames() {
            self.frames[i as usize].prep_free();
        }
        self.alloc.free(first, order.get(), current_cpu());
    }

    /// Frees many single frames of this node, one allocator lock per batch.
    pub fn free_batch(&self, pfns: &[Pfn]) {
        let mut local = Vec::with_capacity(pfns.len());
        for &p in pfns {
            let i = self.local(p);
            self.frames[i as usize].prep_free();
            local.push(i);
        }
        self.alloc.free_batch(&local);
    }

    /// [`Node::free_batch`] past the allocator's caches, into the zone (see
    /// `Allocator::free_batch_to_zone`).
    pub fn free_batch_to_zone(&self, pfns: &[Pfn]) {
        let mut local = Vec::with_capacity(pfns.len());
        for &p in pfns {
            let i = self.local(p);
            self.frames[i as usize].prep_free();
            local.push(i);
        }
        self.alloc.free_batch_to_zone(&local);
    }

    /// Free frames (zone and caches).
    pub fn free_frames(&self) -> u64 {
        self.alloc.free_frames()
    }

    /// Zone lock acquisitions so far.
    pub fn zone_lock_acquisitions(&self) -> u64 {
        self.alloc.zone_acquisitions()
    }

    fn page_ptr_local(&self, i: u32) -> *mut u8 {
        // The node's mapping covers `frames * PAGE_SIZE` bytes and `i < frames`.
        self.map.base().wrapping_add(i as usize * PAGE_SIZE)
    }

    /// Returns the zone's free frames to the host (they read as zero and cost no host
    /// memory afterwards). Caches are drained first.
    pub fn release_free_memory(&self) -> Result<u64, HostError> {
        self.alloc.drain();
        self.release_blocks(0)
    }

    /// Returns the host memory of the zone's free blocks of at least `min_order` that
    /// still have some (a block whose frames are all unbacked costs no syscall). The
    /// allocators' caches are left as they are. Returns the frames released.
    pub fn release_idle_memory(&self, min_order: u32) -> Result<u64, HostError> {
        self.release_blocks(min_order)
    }

    /// Gives every frame the allocator caches (CPU slots, the depot) back to the zone,
    /// where free frames merge into blocks.
    pub fn drain_caches(&self) {
        self.alloc.drain();
    }

    fn release_blocks(&self, min_order: u32) -> Result<u64, HostError> {
        // Hold no lock while punching: take each block out of the zone, punch, put back.
        // Blocks are taken one order-sized run at a time so other allocations go on.
        let mut released = 0;
        for (first, order) in self.alloc.zone_free_blocks() {
            if order < min_order {
                continue;
            }
            let frames = &self.frames[first as usize..(first + (1 << order)) as usize];
            if frames
                .iter()
                .all(|f| f.flags().contains(FrameFlags::UNBACKED))
            {
                continue;
            }
            // The block may have been allocated since the listing; take it only if the
            // zone still has a block of this order there.
            let got = self.take_exact(first, order);
            if !got {
                continue;
            }
            let len = (1u64 << order) * PAGE_SIZE as u64;
            let res = self
                .memfd
                .punch_hole(u64::from(first) * PAGE_SIZE as u64, len);
            for i in first..first + (1 << order) {
                let f = &self.frames[i as usize];
                if res.is_ok() {
                    f.set(FrameFlags::KNOWN_ZERO | FrameFlags::UNBACKED);
                }
            }
            self.alloc.free(first, order, current_cpu());
            res?;
            released += 1u64 << order;
        }
        Ok(released)
    }

    /// Takes the free block `first` of `order` out of the zone if it is still there.
    fn take_exact(&self, first: u32, order: u32) -> bool {
        self.alloc.take_exact(first, order)
    }

    /// Host memory this node's memfd holds now, in bytes.
    pub fn resident_bytes(&self) -> Result<u64, HostError> {
        self.memfd.allocated_bytes()
    }
}

/// All the host frames the manager owns (see the module docs).
#[derive(Debug)]
pub struct Pool {
    nodes: Vec<Node>,
    kind: AllocatorKind,
}

impl Pool {
    /// Builds a pool.
    pub fn new(cfg: &PoolConfig) -> Result<Pool, PoolError> {
        let mut nodes = Vec::with_capacity(cfg.nodes.len());
        let mut base: u64 = 0;
        if cfg.nodes.is_empty() {
            return Err(PoolError::TooSmall {
                node: 0,
                frames: 0,
                min: 1,
            });
        }
        let total = cfg
            .nodes
            .iter()
            .try_fold(0u64, |sum, n| sum.checked_add(n.frames))
            .unwrap_or(u64::MAX);
        let max_nodes = usize::from(u16::MAX) + 1;
        let too_large = || PoolError::TooLarge {
            frames: total,
            nodes: cfg.nodes.len(),
            max_frames: u64::from(u32::MAX),
            max_nodes,
        };
        if total > u64::from(u32::MAX) || cfg.nodes.len() > max_nodes {
            return Err(too_large());
        }
        for (i, n) in cfg.nodes.iter().enumerate() {
            if n.frames == 0 {
                return Err(PoolError::TooSmall {
                    node: i,
                    frames: 0,
                    min: 1,
                });
            }
            // Descriptors and buddy lists cost about 48 bytes per frame, allocated now.
            let meta = (base + n.frames) * DESCRIPTOR_BYTES;
            if let Some(total) = host_memory_bytes() {
                if meta > total / 4 {
                    return Err(PoolError::TooLargeForHost {
                        pool: (base + n.frames) * PAGE_SIZE as u64,
                        meta,
                        host: total,
                    });
                }
            }
            let frames = u32::try_from(n.frames).map_err(|_| too_large())?;
            let first = u32::try_from(base).map_err(|_| too_large())?;
            let id = u16::try_from(i).map_err(|_| too_large())?;
            nodes.push(Node::new(NodeId(id), Pfn(first), frames, n, cfg.allocator)?);
            base += n.frames;
        }
        Ok(Pool {
            nodes,
            kind: cfg.allocator,
        })
    }

    /// The allocator design.
    pub fn allocator(&self) -> AllocatorKind {
        self.kind
    }

    /// The nodes.
    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// Node `id`. Panics if there is no such node (ids come from this pool).
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[usize::from(id.0)]
    }

    /// The node owning `pfn`. Panics if `pfn` is not in this pool (pfns come from it).
    #[inline]
    pub fn node_of(&self, pfn: Pfn) -> &Node {
        if let [only] = self.nodes.as_slice() {
            debug_assert!(only.contains(pfn));
            return only;
        }
        self.nodes
            .iter()
            .find(|n| n.contains(pfn))
            .unwrap_or_else(|| panic!("{pfn:?} is not in this pool"))
    }

    /// The descriptor of `pfn`.
    #[inline]
    pub fn frame(&self, pfn: Pfn) -> &Frame {
        let n = self.node_of(pfn);
        &n.frames[n.local(pfn) as usize]
    }

    /// Allocates `2^order` contiguous frames, from `preferred` if it can, else from the
    /// other nodes in order.
    #[inline]
    pub fn alloc(
        &self,
        preferred: NodeId,
        order: Order,
        init: FrameInit,
    ) -> Result<Pfn, AllocError> {
        self.alloc_policy(preferred, false, order, init)
    }

    /// Allocates `2^order` contiguous frames from `first`, and if it cannot (and `only` is
    /// false) from the nodes after it in turn, wrapping around.
    ///
    /// A node that still has `2^order` free frames, only not contiguous (or in the
    /// allocators' caches), fails the call instead of passing it on: a caller that asked
    /// for a run tries a smaller one next, so the node a policy names keeps being used
    /// until it is really full, while a full node's faults still get runs elsewhere (not
    /// single frames, which would cost a host mapping each).
    #[inline]
    pub fn alloc_policy(
        &self,
        first: NodeId,
        only: bool,
        order: Order,
        init: FrameInit,
    ) -> Result<Pfn, AllocError> {
        let n = self.nodes.len();
        let first = usize::from(first.0).min(n - 1);
        let tries = if only { 1 } else { n };
        for k in 0..tries {
            if k == 1
                && order.get() > 0
                && self.nodes[first].free_frames() >= u64::from(order.frames())
            {
                break;
            }
            if let Some(p) = self.nodes[(first + k) % n].alloc(order, init)? {
                return Ok(p);
            }
        }
        Err(AllocError::Exhausted {
            frames: order.frames(),
            free: if only {
                self.nodes[first].free_frames()
            } else {
                self.free_frames()
            },
        })
    }

    /// Frees `2^order` frames starting at `pfn`.
    #[inline]
    pub fn free(&self, pfn: Pfn, order: Order) {
        self.node_of(pfn).free(pfn, order);
    }

    /// Frees many single frames, grouped by node, one allocator lock per batch.
    pub fn free_batch(&self, pfns: &[Pfn]) {
        if let [only] = self.nodes.as_slice() {
            only.free_batch(pfns);
            return;
        }
        for n in &self.nodes {
            let mine: Vec<Pfn> = pfns.iter().copied().filter(|&p| n.contains(p)).collect();
            if !mine.is_empty() {
                n.free_batch(&mine);
            }
        }
    }

    /// [`Pool::free_batch`] into the zones, past the allocators' caches: for frames freed
    /// together whose neighbours are likely free too (reclaim frees whole blocks), so that
    /// they merge into runs.
    pub fn free_batch_to_zone(&self, pfns: &[Pfn]) {
        for n in &self.nodes {
            let mine: Vec<Pfn> = pfns.iter().copied().filter(|&p| n.contains(p)).collect();
            if !mine.is_empty() {
                n.free_batch_to_zone(&mine);
            }
        }
    }

    /// A pointer to the first byte of `pfn` in its node's direct map.
    ///
    /// The pointer is valid for `PAGE_SIZE` bytes for as long as the pool lives; who may
    /// read or write through it is decided by frame ownership (see the crate's lock tree).
    #[inline]
    pub fn page_ptr(&self, pfn: Pfn) -> *mut u8 {
        let n = self.node_of(pfn);
        n.page_ptr_local(n.local(pfn))
    }

    /// Copies frame `src`'s bytes into frame `dst`.
    ///
    /// # Safety
    /// The caller owns `dst` exclusively and no one writes `src` during the copy (it is
    /// write-protected everywhere or locked).
    pub unsafe fn copy_frame(&self, dst: Pfn, src: Pfn) {
        // SAFETY: both pointers are valid for PAGE_SIZE bytes (see `page_ptr`), distinct
        // frames do not overlap, and the caller guarantees no concurrent writers.
        unsafe { std::ptr::copy_nonoverlapping(self.page_ptr(src), self.page_ptr(dst), PAGE_SIZE) };
    }

    /// Frames in the pool.
    pub fn total_frames(&self) -> u64 {
        self.nodes.iter().map(|n| u64::from(n.frames())).sum()
    }

    /// Free frames in the pool (zones and caches). Takes every allocator lock in turn.
    pub fn free_frames(&self) -> u64 {
        self.nodes.iter().map(Node::free_frames).sum()
    }

    /// Host memory the pool's frames hold now, in bytes.
    pub fn resident_bytes(&self) -> Result<u64, HostError> {
        self.nodes.iter().map(Node::resident_bytes).sum()
    }

    /// Backs every frame with host memory now and fills the direct maps' page tables, so
    /// that experiments measure the manager rather than the host's first-touch cost.
    /// Call it before the pool is used: it must not run beside `release_free_memory`.
    pub fn prefault(&self) -> Result<(), HostError> {
        for n in &self.nodes {
            n.memfd.allocate_all()?;
            n.map.populate();
            for f in n.frames.iter() {
                f.clear(FrameFlags::UNBACKED);
            }
        }
        Ok(())
    }

    /// Fault injection for tests: while `on`, backing frames with host memory fails as if
    /// the host were out of memory.
    #[doc(hidden)]
    pub fn inject_host_memory_failure(&self, on: bool) {
        for n in &self.nodes {
            n.fail_backing
                .store(on, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Returns every free frame's memory to the host; returns the frames released.
    pub fn release_free_memory(&self) -> Result<u64, HostError> {
        self.nodes.iter().map(Node::release_free_memory).sum()
    }

    /// Returns the host memory of every node's free blocks of at least `min_order` that
    /// still have some (see [`Node::release_idle_memory`]); returns the frames released.
    pub fn release_idle_memory(&self, min_order: u32) -> Result<u64, HostError> {
        self.nodes
            .iter()
            .map(|n| n.release_idle_memory(min_order))
            .sum()
    }

    /// [`Node::drain_caches`] for every node.
    pub fn drain_caches(&self) {
        self.nodes.iter().for_each(Node::drain_caches);
    }

    /// Returns the host memory of frames about to be freed (reclaim): one hole punch per
    /// run of consecutive frames. The caller owns the frames: no mapping of any VM names
    /// them and no host view maps them. Frames whose punch failed keep their memory (and
    /// are freed as usual); returns the frames whose memory went back.
    pub fn punch_frames(&self, pfns: &mut [Pfn]) -> u64 {
        pfns.sort_unstable();
        let mut released = 0;
        let mut i = 0;
        while i < pfns.len() {
            let node = self.node_of(pfns[i]);
            let mut j = i + 1;
            while j < pfns.len() && pfns[j].0 == pfns[j - 1].0 + 1 && node.contains(pfns[j]) {
                j += 1;
            }
            let len = (j - i) as u64 * PAGE_SIZE as u64;
            if node
                .memfd
                .punch_hole(node.file_offset(pfns[i]), len)
                .is_ok()
            {
                for &p in &pfns[i..j] {
                    node.frames[node.local(p) as usize]
                        .set(FrameFlags::KNOWN_ZERO | FrameFlags::UNBACKED);
                }
                released += (j - i) as u64;
            }
            i = j;
        }
        released
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    fn pool(frames: u32, nodes: usize, kind: AllocatorKind) -> Pool {
        Pool::new(&PoolConfig {
            nodes: vec![
                NodeConfig {
                    frames: frames.into(),
                    host_node: None
                };
                nodes
            ],
            allocator: kind,
        })
        .unwrap()
    }

    fn fill(pool: &Pool, pfn: Pfn, byte: u8) {
        // SAFETY: the test owns `pfn`.
        unsafe { std::ptr::write_bytes(pool.page_ptr(pfn), byte, PAGE_SIZE) };
    }

    fn all_bytes_are(pool: &Pool, pfn: Pfn, byte: u8) -> bool {
        // SAFETY: the test owns `pfn`; the pointer is valid for PAGE_SIZE bytes.
        let s = unsafe { std::slice::from_raw_parts(pool.page_ptr(pfn), PAGE_SIZE) };
        s.iter().all(|&b| b == byte)
    }

    #[test]
    fn a_freed_frame_reaches_its_next_owner_zeroed() {
        for kind in AllocatorKind::ALL {
            let p = pool(64, 1, kind);
            let pfns: Vec<Pfn> = (0..64)
                .map(|_| p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed).unwrap())
                .collect();
            for &f in &pfns {
                fill(&p, f, 0xEE);
                p.free(f, Order::ZERO);
            }
            for _ in 0..64 {
                let f = p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed).unwrap();
                assert!(
                    all_bytes_are(&p, f, 0),
                    "{kind:?}: old bytes leaked into {f:?}"
                );
            }
        }
    }

    #[test]
    fn exhaustion_is_an_error_and_pool_keeps_working() {
        let p = pool(16, 1, AllocatorKind::Magazine);
        let got: Vec<Pfn> = (0..16)
            .map(|_| p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed).unwrap())
            .collect();
        let err = p
            .alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed)
            .unwrap_err();
        assert_eq!(err, AllocError::Exhausted { frames: 1, free: 0 });
        assert!(err.to_string().contains("exhausted"));
        p.free(got[3], Order::ZERO);
        assert_eq!(
            p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed),
            Ok(got[3])
        );
    }

    #[test]
    fn allocation_falls_back_to_other_nodes_and_pfns_do_not_overlap() {
        let p = pool(8, 2, AllocatorKind::PerCpuLists);
        let got: Vec<Pfn> = (0..16)
            .map(|_| p.alloc(NodeId(1), Order::ZERO, FrameInit::Zeroed).unwrap())
            .collect();
        let on1 = got
            .iter()
            .filter(|&&f| p.node(NodeId(1)).contains(f))
            .count();
        assert_eq!(on1, 8);
        let mut s = got.clone();
        s.sort();
        s.dedup();
        assert_eq!(s.len(), 16);
        assert_eq!(p.node_of(Pfn(9)).id(), NodeId(1));
    }

    #[test]
    fn release_free_memory_returns_host_memory_and_frames_read_zero() {
        let p = pool(1024, 1, AllocatorKind::Magazine);
        let got: Vec<Pfn> = (0..1024)
            .map(|_| p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed).unwrap())
            .collect();
        for &f in &got {
            fill(&p, f, 0x5A);
        }
        assert!(p.resident_bytes().unwrap() >= 1024 * PAGE_SIZE as u64);
        p.free_batch(&got);
        assert_eq!(p.release_free_memory().unwrap(), 1024);
        assert_eq!(p.resident_bytes().unwrap(), 0);
        assert_eq!(p.free_frames(), 1024);
        let f = p.alloc(NodeId(0), Order::ZERO, FrameInit::Zeroed).unwrap();
        assert_eq!(
            p.resident_bytes().unwrap(),
            PAGE_SIZE as u64,
            "only the frame handed out is backed again, without being rewritten"
        );
        assert!(all_bytes_are(&p, f, 0));
    }

    #[test]
    fn a_host_that_cannot_back_frames_fails_the_allocation_and_keeps_them_free() {
        let p = pool(64, 1, AllocatorKind::Magazine);
        p.inject_host_memory_failure(true);
        let err = p
            .alloc(NodeId(0), Order::new(2).unwrap(), FrameInit::Zeroed)
            .unwrap_err();
        assert!(
            matches!(err, AllocError::HostMemory { frames: 4, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("host"));
        assert_eq!(p.free_frames(), 64);
        for i in 0..64 {
            let f = p.frame(Pfn(i));
            assert_eq!(f.refcount(), 0, "a free frame holds no reference");
            assert!(!f.get_unless_zero(), "no walker can pin a free frame");
        }
        p.inject_host_memory_failure(false);
        let got = p
            .alloc(NodeId(0), Order::new(2).unwrap(), FrameInit::Zeroed)
            .unwrap();
        assert_eq!(p.frame(got).refcount(), 1);
    }

    #[test]
    fn a_pool_whose_bookkeeping_outgrows_the_host_is_refused() {
        let e = Pool::new(&PoolConfig::uniform(
            u64::from(u32::MAX) * PAGE_SIZE as u64,
            1,
            AllocatorKind::Magazine,
        ))
        .unwrap_err();
        assert!(matches!(e, PoolError::TooLargeForHost { .. }), "{e}");
        assert!(e.to_string().contains("smaller pool"));
    }

    #[test]
    fn a_pool_beyond_what_frame_numbers_index_is_refused_not_clamped() {
        // 16 TiB + one page: one frame more than a 32-bit frame number can name.
        let bytes = (u64::from(u32::MAX) + 1) * PAGE_SIZE as u64;
        let e = Pool::new(&PoolConfig::uniform(bytes, 1, AllocatorKind::Magazine)).unwrap_err();
        assert!(
            matches!(e, PoolError::TooLarge { frames, .. } if frames == u64::from(u32::MAX) + 1),
            "{e}"
        );
        // Two nodes whose sum, not either alone, is too many.
        let half = NodeConfig {
            frames: u64::from(u32::MAX / 2 + 1),
            host_node: None,
        };
        let e = Pool::new(&PoolConfig {
            nodes: vec![half.clone(), half],
            allocator: AllocatorKind::Magazine,
        })
        .unwrap_err();
        assert!(matches!(e, PoolError::TooLarge { .. }), "{e}");
        // A size whose frame count wraps a u32 is not mistaken for a small pool.
        let bytes = (u64::from(u32::MAX) + 2) * 4 * PAGE_SIZE as u64;
        let e = Pool::new(&PoolConfig::uniform(bytes, 4, AllocatorKind::Magazine)).unwrap_err();
        assert!(matches!(e, PoolError::TooLarge { .. }), "{e}");
    }

    #[test]
    fn empty_or_zero_sized_pools_are_rejected() {
        let e = Pool::new(&PoolConfig {
            nodes: vec![],
            allocator: AllocatorKind::GlobalLock,
        })
        .unwrap_err();
        assert!(matches!(e, PoolError::TooSmall { .. }));
        let e = Pool::new(&PoolConfig::uniform(0, 1, AllocatorKind::GlobalLock)).unwrap_err();
        assert!(e.to_string().contains("at least"));
    }
}
