//! Shadow-window model: every VM gets a host view that records, gfn by gfn, what a KVM
//! guest window would map (frame and write permission), following `map_run`,
//! `unmap_run`, `protect_run` and `protect_for_fork` exactly as `mmu.rs` documents them.
//! Random sequences of fork, software write and read, host faults (`handle_fault`) and
//! exit run over spaces of several 512-entry blocks, with fault-around and
//! copy-on-write runs off and at their defaults, and both fork behaviours a view may
//! choose (the default write-protect, or dropping the whole run).
//!
//! Invariants checked after every step, over the views of live *and* exited VMs (a stale
//! mapping in an exited VM's window is still a mapping a guest could use):
//! - (a) a frame mapped writable by a view is mapped by no other view, nor twice by one;
//! - (b) no view maps a frame the pool considers free (refcount 0 or `ALLOCATED` clear);
//!   each view also checks this for its own mappings on entry to every call, so a frame
//!   freed before the host was told to drop it is caught even if the call comes later;
//! - (c) every mapping of a live VM's view names the frame the VM's page table has for
//!   that gfn, and is writable only if the entry is;
//! - (d) an exited VM's view is empty: exit told the host to drop every region;
//! - (e) a fault that succeeded left its page mapped in the view (writable for a write),
//!   except that a copy-on-write reuse may leave an absent page absent (the ignored
//!   `a_reuse_fault_maps_an_absent_page_into_the_host_view` states the contract);
//! - (f) when a fork downgrades the parent's view, no frame it still maps writable is
//!   already shared with the child (checked in the dedicated fork test only: it walks the
//!   reverse map from inside the call).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use guestmem::frame::FrameFlags;
use guestmem::mmu::{HostMmu, HostMmuError, MapRun};
use guestmem::{
    Access, AddressSpace, AllocatorKind, FaultOutcome, Gfn, Gpa, Manager, ManagerConfig,
    NodeConfig, Order, PAGE_SIZE, Pfn, Pool, PoolConfig, RegionSpec,
};
use proptest::prelude::*;

/// Two regions of more than one block each, both with a partial last block, and a hole
/// between them: gfn 0..700 (blocks 0..512, 512..700) and 1024..1624.
const REGIONS: [RegionSpec; 2] = [
    RegionSpec {
        start: Gfn(0),
        pages: 700,
    },
    RegionSpec {
        start: Gfn(1024),
        pages: 600,
    },
];

/// Pages where blocks, runs and regions begin and end, plus two holes: most random
/// accesses land here so that VMs of one fork tree touch the same pages.
const HOT: [u64; 22] = [
    0, 1, 2, 3, 62, 63, 64, 65, 510, 511, 512, 513, 698, 699, 700, 1024, 1025, 1535, 1536, 1537,
    1623, 1624,
];

/// Pages a random access may hit, holes included.
const SPAN_PAGES: u64 = 1700;

fn in_ram(gfn: u64) -> bool {
    REGIONS
        .iter()
        .any(|r| gfn >= r.start.0 && gfn < r.start.0 + r.pages)
}

/// What a view remembers of one gfn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Mapping {
    pfn: Pfn,
    writable: bool,
}

/// One VM's host view (the model of its KVM guest window), shared by the `HostMmu` the
/// address space calls and the test that inspects it.
#[derive(Debug)]
struct View {
    pool: Arc<Pool>,
    map: Mutex<BTreeMap<u64, Mapping>>,
    /// Broken invariants seen inside calls, asserted empty by the test after each step
    /// (a panic inside a call would unwind through the manager's locks).
    violations: Mutex<Vec<String>>,
    /// Set by the fork test: the manager whose reverse maps invariant (f) walks.
    fork_probe: Mutex<Option<Weak<Manager>>>,
    /// Times invariant (f) was checked, so that its test cannot pass vacuously.
    fork_probes: Mutex<u64>,
}

impl View {
    fn new(pool: &Arc<Pool>) -> Arc<View> {
        Arc::new(View {
            pool: Arc::clone(pool),
            map: Mutex::new(BTreeMap::new()),
            violations: Mutex::new(Vec::new()),
            fork_probe: Mutex::new(None),
            fork_probes: Mutex::new(0),
        })
    }

    fn snapshot(&self) -> BTreeMap<u64, Mapping> {
        self.map.lock().unwrap().clone()
    }

    fn violate(&self, what: String) {
        self.violations.lock().unwrap().push(what);
    }

    fn take_violations(&self) -> Vec<String> {
        std::mem::take(&mut *self.violations.lock().unwrap())
    }

    /// Whether the pool considers `pfn` free.
    fn is_free(&self, pfn: Pfn) -> bool {
        let f = self.pool.frame(pfn);
        f.refcount() == 0 || !f.flags().contains(FrameFlags::ALLOCATED)
    }

    /// Invariant (b) at the entry of a call: nothing this view maps is free already.
    fn check_still_allocated(&self, call: &str) {
        let map = self.map.lock().unwrap();
        let bad: Vec<String> = map
            .iter()
            .filter(|(_, m)| self.is_free(m.pfn))
            .map(|(g, m)| format!("gfn {g:#x} -> {:?}", m.pfn))
            .collect();
        drop(map);
        if !bad.is_empty() {
            self.violate(format!(
                "(b) on entry to {call}, the view still maps {} freed frame(s): {}",
                bad.len(),
                bad.join(", ")
            ));
        }
    }

    fn map_run(&self, run: MapRun<'_>) {
        self.check_still_allocated("map_run");
        let node = self.pool.node_of(run.pfn);
        if node.id() != run.node || node.file_offset(run.pfn) != run.file_offset {
            self.violate(format!(
                "map_run of {:?} names {:?} at offset {:#x}; the frame is in {:?} at {:#x}",
                run.pfn,
                run.node,
                run.file_offset,
                node.id(),
                node.file_offset(run.pfn)
            ));
        }
        let mut map = self.map.lock().unwrap();
        for i in 0..run.pages {
            let pfn = run.pfn.offset(i as u32);
            if self.is_free(pfn) {
                self.violate(format!(
                    "map_run maps free {pfn:?} at gfn {:#x}",
                    run.gfn.0 + i
                ));
            }
            map.insert(
                run.gfn.0 + i,
                Mapping {
                    pfn,
                    writable: run.writable,
                },
            );
        }
    }

    fn unmap_run(&self, gfn: Gfn, pages: u64) {
        self.check_still_allocated("unmap_run");
        let mut map = self.map.lock().unwrap();
        let gone: Vec<u64> = map.range(gfn.0..gfn.0 + pages).map(|(&g, _)| g).collect();
        for g in gone {
            map.remove(&g);
        }
    }

    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) {
        self.check_still_allocated("protect_run");
        if !writable {
            // Only a fork write-protects a run (the default `protect_for_fork`).
            self.probe_fork(gfn, pages);
        }
        let mut map = self.map.lock().unwrap();
        // Absent pages stay absent: protection changes only what is mapped.
        for (_, m) in map.range_mut(gfn.0..gfn.0 + pages) {
            m.writable = writable;
        }
    }

    /// Invariant (f), when the fork test asked for it: the frames this view still maps
    /// writable at `gfn .. gfn + pages` have one mapper (the parent) only. The reverse-map
    /// walk runs on a helper thread with a deadline, so that a fork calling the view with
    /// page-table locks held makes this check fail instead of hanging.
    fn probe_fork(&self, gfn: Gfn, pages: u64) {
        let Some(mm) = self.fork_probe.lock().unwrap().clone() else {
            return;
        };
        let Some(mm) = mm.upgrade() else { return };
        let writable: Vec<(u64, Pfn)> = self
            .map
            .lock()
            .unwrap()
            .range(gfn.0..gfn.0 + pages)
            .filter(|(_, m)| m.writable)
            .map(|(&g, m)| (g, m.pfn))
            .collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let pfns: Vec<Pfn> = writable.iter().map(|&(_, p)| p).collect();
        std::thread::spawn(move || {
            let n: Vec<u32> = pfns.iter().map(|&p| mm.mappers(p)).collect();
            let _ = tx.send(n);
        });
        *self.fork_probes.lock().unwrap() += 1;
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(counts) => {
                for (&(g, pfn), n) in writable.iter().zip(counts) {
                    if n != 1 {
                        self.violate(format!(
                            "(f) fork shared {pfn:?} (gfn {g:#x}) with {} other VM(s) while \
                             the parent's host view still mapped it writable",
                            n.saturating_sub(1)
                        ));
                    }
                }
            }
            Err(_) => self.violate(
                "(f) could not walk the reverse maps from inside the fork's view call \
                 (page-table locks held?): this check needs another way to observe the order"
                    .to_string(),
            ),
        }
    }
}

/// How a view handles `protect_for_fork`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ForkView {
    /// The trait's default: write-protect the run.
    Protect,
    /// The documented alternative: drop the whole run.
    Drop,
}

/// A view, with the `protect_for_fork` that `ForkView` names.
#[derive(Debug)]
struct ViewMmu(Arc<View>, ForkView);

impl HostMmu for ViewMmu {
    fn map_run(&self, run: MapRun<'_>) -> Result<(), HostMmuError> {
        self.0.map_run(run);
        Ok(())
    }
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        self.0.unmap_run(gfn, pages);
        Ok(())
    }
    fn protect_run(&self, gfn: Gfn, pages: u64, writable: bool) -> Result<(), HostMmuError> {
        self.0.protect_run(gfn, pages, writable);
        Ok(())
    }
    fn protect_for_fork(&self, gfn: Gfn, pages: u64) -> Result<(), HostMmuError> {
        match self.1 {
            // What the trait's default does.
            ForkView::Protect => self.protect_run(gfn, pages, false),
            ForkView::Drop => {
                self.0.check_still_allocated("protect_for_fork");
                self.0.probe_fork(gfn, pages);
                self.0.unmap_run(gfn, pages);
                Ok(())
            }
        }
    }
}

fn host_mmu(view: &Arc<View>, mode: ForkView) -> Arc<dyn HostMmu> {
    Arc::new(ViewMmu(Arc::clone(view), mode))
}

/// One model configuration.
#[derive(Debug, Clone, Copy)]
struct Config {
    /// Fault-around and copy-on-write runs at their defaults (else both 0).
    around: bool,
    fork_view: ForkView,
    design: rmap::Design,
}

fn manager(cfg: Config) -> Arc<Manager> {
    let pool = Arc::new(
        Pool::new(&PoolConfig {
            nodes: vec![NodeConfig {
                frames: 16384,
                host_node: None,
            }],
            allocator: AllocatorKind::Magazine,
        })
        .unwrap(),
    );
    let (fault_around, cow_around) = if cfg.around {
        let d = ManagerConfig::default();
        (d.fault_around, d.cow_around)
    } else {
        (Order::ZERO, Order::ZERO)
    };
    Manager::new(
        pool,
        ManagerConfig {
            fault_around,
            cow_around,
            cow_run: guestmem::CowRun::default(),
            rmap: rmap::RmapConfig {
                design: cfg.design,
                ..Default::default()
            },
        },
    )
}

#[derive(Debug, Clone)]
enum Op {
    Fork {
        vm: usize,
    },
    Write {
        vm: usize,
        gfn: u64,
        off: usize,
        len: usize,
        byte: u8,
    },
    Read {
        vm: usize,
        gfn: u64,
        off: usize,
        len: usize,
    },
    Fault {
        vm: usize,
        gfn: u64,
        write: bool,
    },
    Exit {
        vm: usize,
    },
}

fn gfn_strategy() -> impl Strategy<Value = u64> {
    prop_oneof![3 => prop::sample::select(&HOT[..]), 1 => 0..SPAN_PAGES]
}

fn op_strategy(exit_weight: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => any::<usize>().prop_map(|vm| Op::Fork { vm }),
        6 => (any::<usize>(), gfn_strategy(), 0..PAGE_SIZE, 1..2 * PAGE_SIZE, any::<u8>())
            .prop_map(|(vm, gfn, off, len, byte)| Op::Write { vm, gfn, off, len, byte }),
        3 => (any::<usize>(), gfn_strategy(), 0..PAGE_SIZE, 1..2 * PAGE_SIZE)
            .prop_map(|(vm, gfn, off, len)| Op::Read { vm, gfn, off, len }),
        5 => (any::<usize>(), gfn_strategy(), any::<bool>())
            .prop_map(|(vm, gfn, write)| Op::Fault { vm, gfn, write }),
        exit_weight => any::<usize>().prop_map(|vm| Op::Exit { vm }),
    ]
}

fn config_strategy() -> impl Strategy<Value = Config> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(around, drop, flat)| Config {
        around,
        fork_view: if drop {
            ForkView::Drop
        } else {
            ForkView::Protect
        },
        design: if flat {
            rmap::Design::Flat
        } else {
            rmap::Design::Chain
        },
    })
}

struct Vm {
    space: Arc<AddressSpace>,
    view: Arc<View>,
}

/// A fork tree (re-rooted when every VM has exited) with each VM's view, and the views
/// of the VMs that exited.
struct World {
    mm: Arc<Manager>,
    cfg: Config,
    live: Vec<Vm>,
    exited: Vec<(String, Arc<View>)>,
    max_vms: usize,
}

impl World {
    fn new(cfg: Config) -> World {
        World {
            mm: manager(cfg),
            cfg,
            live: Vec::new(),
            exited: Vec::new(),
            max_vms: 5,
        }
    }

    fn create(&mut self) {
        let view = View::new(self.mm.pool());
        let space = self
            .mm
            .create(&REGIONS, host_mmu(&view, self.cfg.fork_view))
            .unwrap();
        self.live.push(Vm { space, view });
    }

    fn apply(&mut self, op: &Op) {
        if self.live.is_empty() {
            self.create();
        }
        let n = self.live.len();
        match *op {
            Op::Fork { vm } => {
                if n >= self.max_vms {
                    return;
                }
                let view = View::new(self.mm.pool());
                let child = self.live[vm % n]
                    .space
                    .fork(host_mmu(&view, self.cfg.fork_view))
                    .unwrap();
                assert!(view.snapshot().is_empty(), "a child's view starts empty");
                self.live.push(Vm { space: child, view });
            }
            Op::Write {
                vm,
                gfn,
                off,
                len,
                byte,
            } => {
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                let gpa = gfn * PAGE_SIZE as u64 + off as u64;
                let fits = pages_of(gpa, len).all(in_ram);
                let r = self.live[vm % n].space.write(Gpa(gpa), &data);
                assert_eq!(r.is_ok(), fits, "write at {gpa:#x}+{len}: {r:?}");
            }
            Op::Read { vm, gfn, off, len } => {
                let mut buf = vec![0; len];
                let gpa = gfn * PAGE_SIZE as u64 + off as u64;
                let fits = pages_of(gpa, len).all(in_ram);
                let r = self.live[vm % n].space.read(Gpa(gpa), &mut buf);
                assert_eq!(r.is_ok(), fits, "read at {gpa:#x}+{len}: {r:?}");
            }
            Op::Fault { vm, gfn, write } => {
                let access = if write { Access::Write } else { Access::Read };
                let v = &self.live[vm % n];
                let r = v.space.handle_fault(Gfn(gfn), access);
                assert_eq!(r.is_ok(), in_ram(gfn), "fault at {gfn:#x}: {r:?}");
                if let Ok(outcome) = r {
                    // (e), except that a reuse may leave an absent page absent (see
                    // `a_reuse_fault_maps_an_absent_page_into_the_host_view`).
                    let m = v.view.snapshot().get(&gfn).copied();
                    let reused_absent =
                        matches!(outcome, FaultOutcome::CowReuse { .. }) && m.is_none();
                    assert!(
                        reused_absent || m.is_some_and(|m| m.writable || !write),
                        "(e) {:?}: a {access:?} fault at gfn {gfn:#x} ({r:?}) left {m:?} in \
                         the host view",
                        v.space.id()
                    );
                }
            }
            Op::Exit { vm } => {
                let v = self.live.swap_remove(vm % n);
                v.space.exit();
                self.exited.push((format!("{:?}", v.space.id()), v.view));
            }
        }
    }

    /// Invariants (a) to (d) (see the module docs).
    fn check(&self, step: &str) {
        let pool = self.mm.pool();
        let mut views: Vec<(String, bool, &Arc<View>)> = self
            .live
            .iter()
            .map(|v| (format!("{:?}", v.space.id()), true, &v.view))
            .collect();
        views.extend(self.exited.iter().map(|(id, v)| (id.clone(), false, v)));
        for (id, _, view) in &views {
            let v = view.take_violations();
            assert!(v.is_empty(), "after {step}: {id}'s view saw: {v:#?}");
        }
        // (d)
        for (id, view) in &self.exited {
            let left = view.snapshot();
            assert!(
                left.is_empty(),
                "(d) after {step}: exited {id}'s host view still maps {} page(s), e.g. {:?}",
                left.len(),
                left.iter().next()
            );
        }
        let mut by_frame: HashMap<Pfn, Vec<(&str, u64, bool)>> = HashMap::new();
        for (id, _, view) in &views {
            for (g, m) in view.snapshot() {
                // (b)
                let f = pool.frame(m.pfn);
                assert!(
                    f.refcount() > 0 && f.flags().contains(FrameFlags::ALLOCATED),
                    "(b) after {step}: {id}'s host view maps free {:?} at gfn {g:#x} \
                     (refcount {}, {:?})",
                    m.pfn,
                    f.refcount(),
                    f.flags()
                );
                by_frame
                    .entry(m.pfn)
                    .or_default()
                    .push((id.as_str(), g, m.writable));
            }
        }
        // (a)
        for (pfn, maps) in &by_frame {
            assert!(
                maps.len() == 1 || maps.iter().all(|m| !m.2),
                "(a) after {step}: {pfn:?} is mapped writable while mapped elsewhere: \
                 {maps:?} (vm, gfn, writable)"
            );
        }
        // (c)
        for v in &self.live {
            for (g, m) in v.view.snapshot() {
                let pte = v.space.pte(Gfn(g)).unwrap();
                assert!(
                    pte.pfn() == Some(m.pfn) && (pte.is_writable() || !m.writable),
                    "(c) after {step}: {:?}'s host view maps gfn {g:#x} to {m:?}; its page \
                     table says {pte:?}",
                    v.space.id()
                );
            }
        }
    }

    /// Checks the last state, then exits every VM (checking after each exit if
    /// `check_exits`) and checks that every frame is back in the pool.
    fn finish(mut self, check_exits: bool) {
        self.check("the last step");
        for v in std::mem::take(&mut self.live) {
            v.space.exit();
            if check_exits {
                self.exited.push((format!("{:?}", v.space.id()), v.view));
                self.check("exiting every VM");
            }
        }
        let pool = self.mm.pool();
        assert_eq!(pool.free_frames(), pool.total_frames(), "frames leaked");
    }
}

/// The pages `len` bytes from `gpa` touch.
fn pages_of(gpa: u64, len: usize) -> impl Iterator<Item = u64> {
    let ps = PAGE_SIZE as u64;
    gpa / ps..(gpa + len as u64).div_ceil(ps)
}

fn run(cfg: Config, ops: &[Op], check_exits: bool) {
    let mut w = World::new(cfg);
    w.create();
    w.check("create");
    for (i, op) in ops.iter().enumerate() {
        w.apply(op);
        w.check(&format!("step {i} ({op:?}, {cfg:?})"));
    }
    w.finish(check_exits);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 40,
        max_shrink_iters: 256,
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    /// Every step, exits included.
    #[test]
    fn random_sequences_keep_host_views_isolated_and_in_step(
        cfg in config_strategy(),
        ops in prop::collection::vec(op_strategy(1), 1..120),
    ) {
        run(cfg, &ops, true);
    }

    /// Forks, accesses and faults only; the exits at the end are not checked.
    #[test]
    fn random_sequences_without_exits_keep_host_views_isolated_and_in_step(
        cfg in config_strategy(),
        ops in prop::collection::vec(op_strategy(0), 1..120),
    ) {
        run(cfg, &ops, false);
    }
}

fn both_fork_views(around: bool) -> [Config; 2] {
    [ForkView::Protect, ForkView::Drop].map(|fork_view| Config {
        around,
        fork_view,
        design: rmap::Design::Chain,
    })
}

#[test]
fn exit_drops_every_region_from_the_host_view_before_its_frames_go_back() {
    for cfg in both_fork_views(true)
        .into_iter()
        .chain(both_fork_views(false))
    {
        let mut w = World::new(cfg);
        w.create();
        let vm = &w.live[0];
        // Pages in both blocks of both regions; one mapped by a host fault only.
        for g in [0u64, 511, 512, 699, 1024, 1600] {
            vm.space
                .write(Gpa(g * PAGE_SIZE as u64), &[g as u8 | 1; 16])
                .unwrap();
        }
        vm.space.handle_fault(Gfn(300), Access::Read).unwrap();
        w.apply(&Op::Fork { vm: 0 });
        // The child maps shared frames through its own view; the parent re-maps some.
        for g in [0u64, 512, 1024] {
            w.apply(&Op::Fault {
                vm: 1,
                gfn: g,
                write: false,
            });
            w.apply(&Op::Fault {
                vm: 0,
                gfn: g + 1,
                write: false,
            });
        }
        w.apply(&Op::Fault {
            vm: 1,
            gfn: 699,
            write: true,
        });
        w.check(&format!("setup, {cfg:?}"));
        assert!(!w.live[0].view.snapshot().is_empty());
        assert!(!w.live[1].view.snapshot().is_empty());
        // The child exits first (its blocks stay with the parent), then the parent
        // (its frames go back to the pool).
        w.apply(&Op::Exit { vm: 1 });
        w.check(&format!("the child's exit, {cfg:?}"));
        w.apply(&Op::Exit { vm: 0 });
        w.check(&format!("the parent's exit, {cfg:?}"));
        w.finish(true);
    }
}

#[test]
fn fork_downgrades_the_parent_view_before_the_child_shares_its_frames() {
    for cfg in both_fork_views(false) {
        let mut w = World::new(cfg);
        w.create();
        let vm = &w.live[0];
        for g in [0u64, 5, 511, 512, 699, 1024, 1535, 1536] {
            vm.space.write(Gpa(g * PAGE_SIZE as u64), &[7; 8]).unwrap();
        }
        let writable = vm.view.snapshot().values().filter(|m| m.writable).count();
        assert_eq!(writable, 8, "{cfg:?}");
        *vm.view.fork_probe.lock().unwrap() = Some(Arc::downgrade(&w.mm));
        w.apply(&Op::Fork { vm: 0 });
        assert!(
            *w.live[0].view.fork_probes.lock().unwrap() > 0,
            "{cfg:?}: the fork never downgraded the parent's view"
        );
        w.check(&format!("the fork, {cfg:?}"));
        let left = w.live[0].view.snapshot();
        assert!(
            left.values().all(|m| !m.writable),
            "{cfg:?}: the parent's view keeps writable pages after the fork: {left:?}"
        );
        *w.live[0].view.fork_probe.lock().unwrap() = None;
        // Both write every page again: each gets its own copy, the views stay apart.
        for g in [0u64, 5, 511, 512, 699, 1024, 1535, 1536] {
            for vm in 0..2 {
                w.apply(&Op::Fault {
                    vm,
                    gfn: g,
                    write: true,
                });
                w.check(&format!("a write fault at gfn {g:#x} by VM {vm}, {cfg:?}"));
            }
        }
        w.finish(true);
    }
}

#[test]
#[ignore = "space.rs write_protect_fault: a copy-on-write reuse only calls protect_run(gfn, 1, \
            true), which leaves a page the host view does not map (a dropped or fresh fork \
            window, a child's lazily filled view) absent, so the guest faults again"]
fn a_reuse_fault_maps_an_absent_page_into_the_host_view() {
    // A parent whose fork dropped its view, once the child has exited; and a child whose
    // lazily filled view never mapped the page, once the parent has exited.
    for (fork_view, survivor) in [(ForkView::Drop, 0), (ForkView::Protect, 1)] {
        let mut w = World::new(Config {
            around: false,
            fork_view,
            design: rmap::Design::Chain,
        });
        w.create();
        w.live[0].space.write(Gpa(0), &[1; 8]).unwrap();
        w.apply(&Op::Fork { vm: 0 });
        w.apply(&Op::Exit { vm: 1 - survivor });
        let v = &w.live[0];
        assert!(!v.view.snapshot().contains_key(&0));
        let o = v.space.handle_fault(Gfn(0), Access::Write).unwrap();
        assert!(matches!(o, FaultOutcome::CowReuse { .. }), "{fork_view:?}");
        let m = v.view.snapshot().get(&0).copied();
        assert!(
            m.is_some_and(|m| m.writable),
            "{fork_view:?}: after a reuse write fault the view maps {m:?}"
        );
    }
}
