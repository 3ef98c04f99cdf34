//! Automatic NUMA balancing: pages a VM's vCPUs keep touching from another node move to
//! the VM's home node (Linux's `task_numa_work` and `numa_migrate_prep`, on the access
//! information this manager has).
//!
//! A scan asks each VM's host view which pages the guest touched since the last scan
//! (the same harvest reclaim uses: the view drops them, so the next access is a *hinting
//! fault*, a host minor fault here). A touched page whose frame is on another node than
//! the VM's home node ([`AddressSpace::set_home_node`], where its vCPUs run) is marked; a
//! marked page seen touched from away again, at any later scan, moves home (Linux's
//! two-stage filter: two touches from the same node in a row, so one stray access moves
//! nothing). A touch from the page's own node clears its mark. Each scan moves at most
//! [`BalanceConfig::scan_pages`] pages (Linux: 256 MiB). The period adapts between
//! [`BalanceConfig::period_min`] and [`BalanceConfig::period_max`] (Linux: 1 s to 60 s):
//! halved after a scan that found pages touched from away, doubled after one that found
//! every touch local (as Linux lengthens the period of a task whose faults are local). A VM with a
//! `Bind` policy is left where it is bound.
//!
//! # vCPUs on several nodes
//!
//! A harvest says that a page was touched, not by whom. A VM whose vCPUs live on
//! different nodes turns on touch records ([`AddressSpace::record_touches`]): its host
//! view then makes the first access after a harvest a hinting fault that names the
//! touching thread ([`AddressSpace::hint_fault`], a userfaultfd MINOR fault in the VMM),
//! resolved as a thread of that vCPU's node, which is recorded for the page (so is the
//! node of every ordinary fault). A scan then moves a page to the node that made its
//! last two touches seen (Linux's `last_cpupid` check), and ignores touched pages
//! whose toucher it does not know (mapped without a fault since the last scan).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU8, AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, Weak};
use std::thread::JoinHandle;
use std::time::Duration;

use super::migrate::{MigrateStats, MigrateWalk};
use super::{Access, AddressSpace, Manager, SpaceError};
use crate::types::{Gfn, NodeId};

/// How the balancer scans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct BalanceConfig {
    /// Most pages moved per scan (all VMs together).
    pub scan_pages: u64,
    /// Shortest time between scans.
    pub period_min: Duration,
    /// Longest time between scans.
    pub period_max: Duration,
    /// The moves' reverse-map walks.
    pub walk: MigrateWalk,
}

impl Default for BalanceConfig {
    /// Linux's defaults: 256 MiB per scan, every 1 s to 60 s; shared walks.
    fn default() -> BalanceConfig {
        BalanceConfig {
            scan_pages: 256 << 8,
            period_min: Duration::from_secs(1),
            period_max: Duration::from_secs(60),
            walk: MigrateWalk::Shared,
        }
    }
}

/// What balancing did (Linux's `numa_hint_faults`, `numa_pages_migrated`, ...).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct BalanceStats {
    /// Scans run.
    pub scans: u64,
    /// Pages found touched (each a hinting fault on its next access).
    pub hinting_faults: u64,
    /// Of those, touched from a node other than their frame's.
    pub remote: u64,
    /// Pages moved to their VM's home node (or to the node of the vCPU touching them).
    pub pages_migrated: u64,
    /// Pages that should have moved but could not (busy, the home node full, a failed
    /// mapping), or were left for a later scan by the rate limit.
    pub failed: u64,
}

impl BalanceStats {
    fn add(&mut self, o: &BalanceStats) {
        self.scans += o.scans;
        self.hinting_faults += o.hinting_faults;
        self.remote += o.remote;
        self.pages_migrated += o.pages_migrated;
        self.failed += o.failed;
    }
}

/// A VM's balancing state: its home node, the pages last seen touched from away (with
/// the node they would move to), and the touch records.
#[derive(Debug, Default)]
pub(super) struct NumaState {
    home: AtomicU16,
    marked: Mutex<HashMap<u64, u16>>,
    migrated: AtomicU64,
    /// Per gfn: 0, or 1 + the node of the last thread that touched the page through a
    /// fault since the last scan ([`AddressSpace::record_touches`]).
    touches: OnceLock<Box<[AtomicU8]>>,
    hint_faults: AtomicU64,
}

/// Nodes a touch record can name (one byte, 0 meaning none).
const RECORDABLE_NODES: u16 = 255;

impl AddressSpace {
    /// Sets the node the VM's vCPUs run on: where balancing moves the pages they touch.
    pub fn set_home_node(&self, node: NodeId) {
        self.numa.home.store(node.0, Ordering::Relaxed);
    }

    /// The node the VM's vCPUs run on (node 0 unless set).
    pub fn home_node(&self) -> NodeId {
        NodeId(self.numa.home.load(Ordering::Relaxed))
    }

    /// Turns on touch records (see the module docs): from now on each fault of this VM,
    /// and each [`AddressSpace::hint_fault`], records the node of the thread resolving
    /// it ([`crate::set_home_node`]), and balancing moves pages to the node that touched
    /// them rather than to the VM's home. Forks inherit it. The host view should take
    /// hinting faults, or a page harvested once is not recorded again until it faults.
    pub fn record_touches(&self) {
        let regions = self.regions.read().unwrap_or_else(|e| e.into_inner());
        let end = regions
            .list
            .iter()
            .map(|r| r.pt.start.0 + r.pt.table.pages())
            .max()
            .unwrap_or(0);
        drop(regions);
        self.numa
            .touches
            .get_or_init(|| (0..end).map(|_| AtomicU8::new(0)).collect());
    }

    /// Whether touch records are on.
    pub fn records_touches(&self) -> bool {
        self.numa.touches.get().is_some()
    }

    /// Records that the calling thread's node touched `gfn` (if records are on).
    pub(super) fn record_touch(&self, gfn: Gfn) {
        let Some(t) = self.numa.touches.get().and_then(|t| t.get(gfn.0 as usize)) else {
            return;
        };
        let node = crate::home_node().0;
        if node < RECORDABLE_NODES {
            // Relaxed: a hint for the next scan.
            t.store(node as u8 + 1, Ordering::Relaxed);
        }
    }

    /// The node that last touched `gfn` through a fault since the last call, if known;
    /// forgets it.
    fn take_touch(&self, gfn: Gfn) -> Option<NodeId> {
        let t = self.numa.touches.get()?.get(gfn.0 as usize)?;
        match t.swap(0, Ordering::Relaxed) {
            0 => None,
            n => Some(NodeId(u16::from(n) - 1)),
        }
    }

    /// A hinting fault: the guest touched `gfn` after a harvest dropped its host entry.
    /// Records the toucher (the calling thread's node), counts the access, and has the
    /// host view restore the entry as the manager maps the page
    /// ([`crate::mmu::HostMmu::restore_run`]: writable only if the entry is). `Ok(false)`
    /// when the page is not present any more (reclaimed or being moved: the host view
    /// has a hole there, so the access faults again and is resolved as a fault), when
    /// the view could not restore it (its range changed since the fault: the access
    /// faults again), or when the view takes no hinting faults.
    pub fn hint_fault(&self, gfn: Gfn, access: Access) -> Result<bool, SpaceError> {
        let regions = self.read_regions()?;
        let region = self.find(&regions, gfn)?;
        let index = gfn.0 - region.pt.start.0;
        let (mut slot, s) = self.lock_entry(region, index)?;
        let pte = slot.effective(s);
        if pte.pfn().is_none() {
            return Ok(false);
        }
        let writable = pte.is_writable();
        slot.mark_accessed(s, access == Access::Write && writable);
        self.record_touch(gfn);
        self.numa.hint_faults.fetch_add(1, Ordering::Relaxed);
        region
            .pt
            .mmu
            .restore_run(gfn, 1, writable)
            .map_err(|e| self.host_err(e))
    }

    /// Hinting faults resolved for this VM so far.
    pub fn hint_faults(&self) -> u64 {
        self.numa.hint_faults.load(Ordering::Relaxed)
    }

    /// One balancing scan of this VM: harvests what it touched, marks pages touched from
    /// away, moves those marked at the last scan too (at most `budget` pages). Returns
    /// what it did.
    pub fn balance_scan(&self, budget: u64, walk: MigrateWalk) -> BalanceStats {
        let mut st = BalanceStats {
            scans: 1,
            ..BalanceStats::default()
        };
        let home = self.home_node();
        let pool = &self.mm.pool;
        let nodes = pool.nodes().len();
        let by_toucher = self.records_touches();
        // A VM bound to a node stays there (Linux's balancing honours MPOL_BIND too).
        if (!by_toucher && usize::from(home.0) >= nodes)
            || matches!(self.policy(), super::NodePolicy::Bind(_))
        {
            return st;
        }
        let mut bits = Vec::new();
        // Pages touched from away, with the node they would move to.
        let mut remote: Vec<(Gfn, NodeId)> = Vec::new();
        // Pages touched from the node their frame is on.
        let mut local: Vec<Gfn> = Vec::new();
        self.harvest_with(&mut bits, |gfn, pfn| {
            st.hinting_faults += 1;
            let to = if by_toucher {
                match self.take_touch(gfn) {
                    Some(n) if usize::from(n.0) < nodes => n,
                    _ => return,
                }
            } else {
                home
            };
            if pool.node_of(pfn).id() != to {
                remote.push((gfn, to));
            } else {
                local.push(gfn);
            }
        });
        st.remote = remote.len() as u64;
        // A mark is the node a page was last seen touched from, if away: it lasts until
        // the page is seen touched again, however many scans later (Linux keeps
        // `last_cpupid` in the page until its next hinting fault), so how often the guest
        // comes back to a page against the scan period does not decide whether it moves.
        let mut marked = self.numa.marked.lock().unwrap_or_else(|e| e.into_inner());
        for gfn in local {
            marked.remove(&gfn.0);
        }
        let mut go: Vec<(NodeId, Gfn)> = Vec::new();
        for (gfn, to) in remote {
            // Touched from `to` the last time too: it moves. Its mark stays, so one that
            // could not move (busy, no memory, the budget spent) moves at its next touch
            // from there; once moved, its next touch is local and clears it.
            if marked.insert(gfn.0, to.0) == Some(to.0) {
                go.push((to, gfn));
            }
        }
        drop(marked);
        go.sort_unstable();
        let mut moved = MigrateStats::default();
        let mut left = budget;
        let mut i = 0;
        while i < go.len() {
            // Consecutive pages going to one node as one range: one walk of runs per range.
            let (to, first) = go[i];
            let mut j = i + 1;
            while j < go.len() && go[j].0 == to && go[j].1.0 == go[j - 1].1.0 + 1 {
                j += 1;
            }
            let n = ((j - i) as u64).min(left);
            if n == 0 {
                st.failed += (go.len() - i) as u64;
                break;
            }
            if let Ok(s) = self.migrate(first..first.offset(n), to, walk) {
                moved.pages += s.pages;
                st.failed += s.busy + s.no_memory + s.failed;
            }
            st.failed += (j - i) as u64 - n;
            left -= n;
            i = j;
        }
        st.pages_migrated = moved.pages;
        self.numa.migrated.fetch_add(moved.pages, Ordering::Relaxed);
        st
    }

    /// Pages balancing moved home for this VM so far.
    pub fn balance_migrated(&self) -> u64 {
        self.numa.migrated.load(Ordering::Relaxed)
    }
}

impl Manager {
    /// One balancing scan of every VM, `cfg.scan_pages` moved at most in all.
    pub fn balance_numa(&self, cfg: &BalanceConfig) -> BalanceStats {
        let mut st = BalanceStats::default();
        let mut left = cfg.scan_pages;
        for space in self.spaces() {
            let s = space.balance_scan(left, cfg.walk);
            left = left.saturating_sub(s.pages_migrated);
            st.add(&s);
        }
        st.scans = 1;
        st
    }
}

/// The background balancer: a thread that scans every VM of a manager, with the period
/// adapting to what it finds; stops when dropped.
#[derive(Debug)]
pub struct Balancer {
    stop: Arc<(Mutex<bool>, Condvar)>,
    stats: Arc<Mutex<BalanceStats>>,
    thread: Option<JoinHandle<()>>,
}

impl Balancer {
    /// Starts balancing `mm`'s VMs.
    pub fn start(mm: &Arc<Manager>, cfg: BalanceConfig) -> std::io::Result<Balancer> {
        let stop = Arc::new((Mutex::new(false), Condvar::new()));
        let stats = Arc::new(Mutex::new(BalanceStats::default()));
        let weak: Weak<Manager> = Arc::downgrade(mm);
        let thread = std::thread::Builder::new()
            .name("numa-balance".into())
            .spawn({
                let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
                move || {
                    let mut period = cfg.period_min;
                    loop {
                        {
                            let (lock, cv) = &*stop;
                            let g = lock.lock().unwrap_or_else(|e| e.into_inner());
                            let (g, _) = cv
                                .wait_timeout_while(g, period, |s| !*s)
                                .unwrap_or_else(|e| e.into_inner());
                            if *g {
                                return;
                            }
                        }
                        let Some(mm) = weak.upgrade() else {
                            return;
                        };
                        let s = mm.balance_numa(&cfg);
                        drop(mm);
                        period = if s.remote > 0 {
                            (period / 2).max(cfg.period_min)
                        } else {
                            (period * 2).min(cfg.period_max)
                        };
                        stats.lock().unwrap_or_else(|e| e.into_inner()).add(&s);
                    }
                }
            })?;
        Ok(Balancer {
            stop,
            stats,
            thread: Some(thread),
        })
    }

    /// What it did so far.
    pub fn stats(&self) -> BalanceStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let (lock, cv) = &*self.stop;
        *lock.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
