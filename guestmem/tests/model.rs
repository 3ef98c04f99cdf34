//! Model-based tests of address spaces: random sequences of create, write, read, fork
//! and exit, run against a reference model that holds every VM's bytes.
//!
//! Invariants checked:
//! 1. Every read returns exactly the bytes the model holds for that VM (so a fork child
//!    never sees its parent's later writes, nor the parent the child's, and untouched
//!    memory reads as zero).
//! 2. Every frame's mapcount equals the number of page-table blocks naming it across all
//!    live VMs (blocks are shared by fork), its refcount equals its mapcount (no
//!    transient holders at rest), and a walk of its reverse map finds every VM mapping it.
//! 3. No frame is writable in an entry while another entry maps it.
//! 4. After every VM exits, the pool's free count is back to its total.
//!
//! The multi-thread run gives each thread its own family of VMs over one shared pool,
//! manager and reverse-map context, so allocator, rmap and counter paths run concurrently
//! while each thread checks its own model. The shared-tree run has all threads fork,
//! write, copy-on-write fault and exit VMs of *one* fork tree (1500 pages, three blocks),
//! so that blocks shared between relatives are copied, reused and released under
//! concurrent forks and exits; it checks invariant 1 for every VM at every checkpoint
//! (all threads stopped), invariants 2 and 3 over the whole tree, and invariant 4.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use guestmem::mmu::NoopMmu;
use guestmem::pagetable::PteKind;
use guestmem::{
    Access, AddressSpace, AllocatorKind, CowRun, Gfn, Gpa, Manager, ManagerConfig, Order,
    PAGE_SIZE, Pool, PoolConfig, RegionSpec,
};
use proptest::prelude::*;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

/// Two regions with a hole between them: gfn 0..24 and 32..64.
const REGIONS: [RegionSpec; 2] = [
    RegionSpec {
        start: Gfn(0),
        pages: 24,
    },
    RegionSpec {
        start: Gfn(32),
        pages: 32,
    },
];
const SPAN: u64 = 64 * PAGE_SIZE as u64;

fn in_ram(gpa: u64) -> bool {
    let g = gpa / PAGE_SIZE as u64;
    REGIONS
        .iter()
        .any(|r| g >= r.start.0 && g < r.start.0 + r.pages)
}

fn manager(frames: u32, design: rmap::Design, kind: AllocatorKind, around: u32) -> Arc<Manager> {
    manager_cow(frames, design, kind, around, 0, CowRun::Adaptive)
}

fn manager_cow(
    frames: u32,
    design: rmap::Design,
    kind: AllocatorKind,
    around: u32,
    cow_around: u32,
    cow_run: CowRun,
) -> Arc<Manager> {
    let pool = Arc::new(
        Pool::new(&PoolConfig {
            nodes: vec![guestmem::NodeConfig {
                frames: u64::from(frames),
                host_node: None,
            }],
            allocator: kind,
        })
        .unwrap(),
    );
    Manager::new(
        pool,
        ManagerConfig {
            fault_around: Order::new(around).unwrap(),
            cow_around: Order::new(cow_around).unwrap(),
            cow_run,
            rmap: rmap::RmapConfig {
                design,
                ..Default::default()
            },
        },
    )
}

#[derive(Debug, Clone)]
enum Op {
    Create,
    Write {
        vm: usize,
        gpa: u64,
        len: usize,
        byte: u8,
    },
    Read {
        vm: usize,
        gpa: u64,
        len: usize,
    },
    Fork {
        vm: usize,
    },
    Exit {
        vm: usize,
    },
    Check,
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        1 => Just(Op::Create),
        8 => (any::<usize>(), 0..SPAN, 1..3 * PAGE_SIZE, any::<u8>())
            .prop_map(|(vm, gpa, len, byte)| Op::Write { vm, gpa, len, byte }),
        6 => (any::<usize>(), 0..SPAN, 1..3 * PAGE_SIZE).prop_map(|(vm, gpa, len)| Op::Read { vm, gpa, len }),
        2 => any::<usize>().prop_map(|vm| Op::Fork { vm }),
        1 => any::<usize>().prop_map(|vm| Op::Exit { vm }),
        1 => Just(Op::Check),
    ]
}

fn random_op(rng: &mut SmallRng) -> Op {
    match rng.random_range(0..19) {
        0 => Op::Create,
        1..=8 => Op::Write {
            vm: rng.random::<u32>() as usize,
            gpa: rng.random_range(0..SPAN),
            len: rng.random_range(1..3 * PAGE_SIZE),
            byte: rng.random(),
        },
        9..=14 => Op::Read {
            vm: rng.random::<u32>() as usize,
            gpa: rng.random_range(0..SPAN),
            len: rng.random_range(1..3 * PAGE_SIZE),
        },
        15 | 16 => Op::Fork {
            vm: rng.random::<u32>() as usize,
        },
        17 => Op::Exit {
            vm: rng.random::<u32>() as usize,
        },
        _ => Op::Check,
    }
}

/// One family of VMs and their model.
struct Family {
    mm: Arc<Manager>,
    vms: Vec<(Arc<AddressSpace>, Vec<u8>)>,
    max_vms: usize,
}

impl Family {
    fn new(mm: Arc<Manager>, max_vms: usize) -> Family {
        Family {
            mm,
            vms: Vec::new(),
            max_vms,
        }
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Create if self.vms.len() < self.max_vms => {
                let vm = self.mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
                self.vms.push((vm, vec![0; SPAN as usize]));
            }
            Op::Write { vm, gpa, len, byte } if !self.vms.is_empty() => {
                let n = self.vms.len();
                let (space, model) = &mut self.vms[vm % n];
                let len = len.min((SPAN - gpa) as usize);
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                let fits = (gpa..gpa + len as u64).step_by(1).all(in_ram);
                match space.write(Gpa(gpa), &data) {
                    Ok(()) => {
                        assert!(fits, "write to a hole succeeded");
                        model[gpa as usize..gpa as usize + len].copy_from_slice(&data);
                    }
                    Err(e) => {
                        assert!(!fits, "write failed: {e}");
                        // Bytes before the hole were written; mirror them.
                        let mut at = gpa;
                        while at < gpa + len as u64 && in_ram(at) {
                            model[at as usize] = data[(at - gpa) as usize];
                            at += 1;
                        }
                    }
                }
            }
            Op::Read { vm, gpa, len } if !self.vms.is_empty() => {
                let (space, model) = &self.vms[vm % self.vms.len()];
                let len = len.min((SPAN - gpa) as usize);
                let mut buf = vec![0xA5; len];
                let fits = (gpa..gpa + len as u64).all(in_ram);
                match space.read(Gpa(gpa), &mut buf) {
                    Ok(()) => {
                        assert!(fits);
                        assert!(
                            buf == model[gpa as usize..gpa as usize + len],
                            "{:?} read back wrong bytes at {gpa:#x}",
                            space.id()
                        );
                    }
                    Err(e) => assert!(!fits, "read failed: {e}"),
                }
            }
            Op::Fork { vm } if !self.vms.is_empty() && self.vms.len() < self.max_vms => {
                let i = vm % self.vms.len();
                let child = self.vms[i].0.fork(Arc::new(NoopMmu)).unwrap();
                let bytes = self.vms[i].1.clone();
                self.vms.push((child, bytes));
            }
            Op::Exit { vm } if !self.vms.is_empty() => {
                let (space, _) = self.vms.swap_remove(vm % self.vms.len());
                space.exit();
                assert!(space.read(Gpa(0), &mut [0]).is_err());
            }
            Op::Check => self.check_mappings(),
            _ => {}
        }
    }

    /// Invariants 2 and 3 over this family (its frames are mapped by no one else).
    fn check_mappings(&self) {
        let spaces: Vec<&AddressSpace> = self.vms.iter().map(|(s, _)| &**s).collect();
        check_mappings(&self.mm, &spaces, &REGIONS);
    }

    fn finish(mut self) {
        self.check_mappings();
        for (space, model) in self.vms.drain(..) {
            let mut buf = vec![0; SPAN as usize];
            for r in REGIONS {
                let (a, b) = (
                    r.start.0 as usize * PAGE_SIZE,
                    (r.start.0 + r.pages) as usize * PAGE_SIZE,
                );
                space.read(Gpa(a as u64), &mut buf[a..b]).unwrap();
                assert!(buf[a..b] == model[a..b], "final check of {:?}", space.id());
            }
            space.exit();
        }
    }
}

/// Invariants 2 and 3 over `spaces`, which must be every VM mapping their frames, at
/// rest (no fault or access in flight).
///
/// Page-table blocks are shared after a fork (read-only for all sharers), so a frame's
/// mapcount counts the distinct blocks naming it, and the VMs mapping it are the sum of
/// those blocks' sharers.
fn check_mappings(mm: &Manager, spaces: &[&AddressSpace], regions: &[RegionSpec]) {
    /// What the page tables say about one frame.
    #[derive(Default)]
    struct Seen {
        /// Distinct (block, slot) pairs naming it.
        entries: HashSet<(usize, u64)>,
        /// VMs mapping it.
        vms: usize,
        /// Some entry is writable.
        writable: bool,
    }
    let mut maps: HashMap<u32, Seen> = HashMap::new();
    for space in spaces {
        for r in regions {
            for g in r.start.0..r.start.0 + r.pages {
                let e = space.entry(Gfn(g)).unwrap();
                if let PteKind::Present { pfn, writable } = e.pte.kind() {
                    let m = maps.entry(pfn.0).or_default();
                    if m.entries.insert((e.block, g % 512)) {
                        m.vms += e.sharers;
                    }
                    m.writable |= writable;
                }
            }
        }
    }
    let pool = mm.pool();
    for (&pfn, seen) in &maps {
        let (vms, writable) = (&seen.vms, &seen.writable);
        let f = pool.frame(guestmem::Pfn(pfn));
        let n = seen.entries.len() as u32;
        assert_eq!(f.mapcount(), n, "mapcount of pfn {pfn:#x}");
        assert_eq!(f.refcount(), n, "refcount of pfn {pfn:#x}");
        assert!(
            !(*writable && *vms > 1),
            "pfn {pfn:#x} writable while mapped by {vms} VMs"
        );
        assert_eq!(
            mm.mappers(guestmem::Pfn(pfn)) as usize,
            *vms,
            "rmap finds every VM mapping pfn {pfn:#x}"
        );
    }
}

fn run_sequence(
    ops: &[Op],
    design: rmap::Design,
    kind: AllocatorKind,
    cow_around: u32,
    cow_run: CowRun,
) {
    let mm = manager_cow(8192, design, kind, 2, cow_around, cow_run);
    let total = mm.pool().total_frames();
    let mut fam = Family::new(Arc::clone(&mm), 8);
    for op in ops {
        fam.apply(op);
    }
    fam.finish();
    assert_eq!(mm.pool().free_frames(), total, "frames leaked");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn random_sequences_match_the_model_chain(ops in prop::collection::vec(op_strategy(), 1..200)) {
        run_sequence(&ops, rmap::Design::Chain, AllocatorKind::Magazine, 0, CowRun::Adaptive);
    }

    #[test]
    fn random_sequences_match_the_model_adaptive_cow(ops in prop::collection::vec(op_strategy(), 1..200)) {
        run_sequence(&ops, rmap::Design::Chain, AllocatorKind::Magazine, 3, CowRun::Adaptive);
    }

    #[test]
    fn random_sequences_match_the_model_flat(ops in prop::collection::vec(op_strategy(), 1..200)) {
        run_sequence(&ops, rmap::Design::Flat, AllocatorKind::PerCpuLists, 2, CowRun::Fixed);
    }
}

fn threaded(total_ops: usize, threads: usize, seed: u64) {
    let mm = manager_cow(
        16384,
        rmap::Design::Chain,
        AllocatorKind::Magazine,
        3,
        2,
        CowRun::Adaptive,
    );
    let total = mm.pool().total_frames();
    std::thread::scope(|s| {
        for t in 0..threads {
            let mm = Arc::clone(&mm);
            s.spawn(move || {
                let mut rng = SmallRng::seed_from_u64(seed + t as u64);
                let mut fam = Family::new(mm, 6);
                for _ in 0..total_ops / threads {
                    let op = random_op(&mut rng);
                    fam.apply(&op);
                }
                fam.finish();
            });
        }
    });
    assert_eq!(mm.pool().free_frames(), total, "frames leaked");
    let c = mm.counters();
    assert!(
        c.forks > 0 && c.cow_copies > 0 && c.zero_fill_faults > 0,
        "{c:?}"
    );
}

#[test]
fn hundred_thousand_operations_on_four_threads_match_the_model() {
    threaded(100_000, 4, 42);
}

#[test]
#[ignore = "soak: cargo test -p guestmem --release --test model -- --ignored"]
fn soak_two_million_operations() {
    threaded(2_000_000, 4, 7);
}

/// The shared fork tree's one region: three blocks, the last one partial.
const TREE: [RegionSpec; 1] = [RegionSpec {
    start: Gfn(0),
    pages: 1500,
}];
const TREE_BYTES: usize = 1500 * PAGE_SIZE;

/// One VM of the shared tree and the bytes it must hold.
struct TreeVm {
    space: Arc<AddressSpace>,
    model: Vec<u8>,
    /// Distinct for every VM: what it writes is its own.
    seed: u64,
    writes: u64,
}

impl TreeVm {
    fn verify(&self, what: &str) {
        let mut buf = vec![0; TREE_BYTES];
        self.space.read(Gpa(0), &mut buf).unwrap();
        if buf != self.model {
            let at = buf.iter().zip(&self.model).position(|(a, b)| a != b);
            panic!(
                "{what}: {:?} (seed {}) differs from its model first at byte {at:?}",
                self.space.id(),
                self.seed
            );
        }
    }
}

/// The VMs of the tree that no thread is using, and how many exist in all.
struct TreeState {
    idle: Vec<TreeVm>,
    live: usize,
    next_seed: u64,
}

/// A barrier that a panicking thread breaks, so that the other threads fail at their next
/// checkpoint (or while waiting for a VM) instead of waiting forever.
struct Checkpoint {
    /// Threads arrived, generation, broken.
    state: std::sync::Mutex<(usize, u64, bool)>,
    cv: std::sync::Condvar,
    threads: usize,
}

impl Checkpoint {
    fn new(threads: usize) -> Checkpoint {
        Checkpoint {
            state: std::sync::Mutex::new((0, 0, false)),
            cv: std::sync::Condvar::new(),
            threads,
        }
    }

    /// Waits for every thread; true for exactly one of them (the last to arrive).
    fn wait(&self) -> bool {
        let mut g = self.state.lock().unwrap_or_else(|e| e.into_inner());
        assert!(!g.2, "another thread failed");
        let generation = g.1;
        g.0 += 1;
        let leader = g.0 == self.threads;
        if leader {
            g.0 = 0;
            g.1 += 1;
            self.cv.notify_all();
        } else {
            while g.1 == generation && !g.2 {
                g = self.cv.wait(g).unwrap_or_else(|e| e.into_inner());
            }
        }
        assert!(!g.2, "another thread failed");
        leader
    }

    fn is_broken(&self) -> bool {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).2
    }
}

/// Breaks the checkpoint if its thread unwinds.
struct BreakOnPanic<'a>(&'a Checkpoint);

impl Drop for BreakOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.state.lock().unwrap_or_else(|e| e.into_inner()).2 = true;
            self.0.cv.notify_all();
        }
    }
}

/// A page to touch: mostly where blocks and runs begin and end, so that VMs of the tree
/// keep meeting in the same shared blocks.
fn tree_gfn(rng: &mut SmallRng) -> u64 {
    const HOT: [u64; 10] = [0, 1, 7, 8, 511, 512, 513, 1023, 1024, 1499];
    if rng.random_bool(0.5) {
        HOT[rng.random_range(0..HOT.len())]
    } else {
        rng.random_range(0..1500)
    }
}

/// Threads share one fork tree: each takes a random idle VM, writes it (bytes drawn from
/// the VM's own seed), reads and checks it, write-faults it (copy-on-write against its
/// relatives), forks it or exits it, and puts it back. At every checkpoint all threads
/// stop and every VM is checked against its model and invariants 2 and 3; at the end
/// every VM exits and every frame must be back in the pool.
fn shared_tree(
    threads: usize,
    rounds: usize,
    ops_per_round: usize,
    seed: u64,
    design: rmap::Design,
    around: (u32, u32),
    cow_run: CowRun,
) {
    const MAX_VMS: usize = 7;
    let mm = manager_cow(
        16384,
        design,
        AllocatorKind::Magazine,
        around.0,
        around.1,
        cow_run,
    );
    let total = mm.pool().total_frames();
    let root = mm.create(&TREE, Arc::new(NoopMmu)).unwrap();
    let mut root = TreeVm {
        space: root,
        model: vec![0; TREE_BYTES],
        seed: 0,
        writes: 0,
    };
    // The root touches every block before the first fork, so the children start out
    // sharing all of them.
    for g in [0u64, 600, 1200, 1499] {
        let data = [0xC3; 100];
        root.space.write(Gpa(g * PAGE_SIZE as u64), &data).unwrap();
        root.model[g as usize * PAGE_SIZE..][..100].copy_from_slice(&data);
    }
    let state = std::sync::Mutex::new(TreeState {
        idle: vec![root],
        live: 1,
        next_seed: 1,
    });
    let barrier = Checkpoint::new(threads);
    std::thread::scope(|s| {
        for t in 0..threads {
            let (state, barrier, mm) = (&state, &barrier, &mm);
            s.spawn(move || {
                let _guard = BreakOnPanic(barrier);
                let mut rng = SmallRng::seed_from_u64(seed + t as u64);
                for round in 0..rounds {
                    for _ in 0..ops_per_round {
                        let mut vm = loop {
                            let mut st = state.lock().unwrap();
                            if !st.idle.is_empty() {
                                let i = rng.random_range(0..st.idle.len());
                                break st.idle.swap_remove(i);
                            }
                            drop(st);
                            assert!(!barrier.is_broken(), "another thread failed");
                            std::thread::yield_now();
                        };
                        if tree_op(&mut rng, &mut vm, state, MAX_VMS) {
                            state.lock().unwrap().idle.push(vm);
                        }
                    }
                    // Checkpoint: everyone is at rest, every VM idle.
                    if barrier.wait() {
                        let st = state.lock().unwrap();
                        assert_eq!(st.idle.len(), st.live);
                        for vm in &st.idle {
                            vm.verify(&format!("checkpoint {round}"));
                        }
                        let spaces: Vec<&AddressSpace> =
                            st.idle.iter().map(|v| &*v.space).collect();
                        check_mappings(mm, &spaces, &TREE);
                    }
                    barrier.wait();
                }
            });
        }
    });
    let st = state.into_inner().unwrap();
    for vm in &st.idle {
        vm.verify("the end");
    }
    for vm in st.idle {
        vm.space.exit();
    }
    assert_eq!(mm.pool().free_frames(), total, "frames leaked");
    let c = mm.counters();
    assert!(c.forks > 3 && c.exits > 3 && c.cow_copies > 0, "{c:?}");
}

/// One operation of [`shared_tree`] on `vm`; returns false when `vm` exited (and was
/// counted out of `state.live`).
fn tree_op(
    rng: &mut SmallRng,
    vm: &mut TreeVm,
    state: &std::sync::Mutex<TreeState>,
    max_vms: usize,
) -> bool {
    match rng.random_range(0..12) {
        0..=4 => {
            let gpa = tree_gfn(rng) * PAGE_SIZE as u64 + rng.random_range(0..PAGE_SIZE as u64);
            let len = rng
                .random_range(1..2 * PAGE_SIZE)
                .min(TREE_BYTES - gpa as usize);
            vm.writes += 1;
            let (s, w) = (vm.seed, vm.writes);
            let data: Vec<u8> = (0..len)
                .map(|i| match i % 4 {
                    0 => s as u8,
                    1 => (s >> 8) as u8,
                    2 => w as u8,
                    _ => (i as u8) ^ 0x5A,
                })
                .collect();
            vm.space.write(Gpa(gpa), &data).unwrap();
            vm.model[gpa as usize..][..len].copy_from_slice(&data);
        }
        5..=6 => {
            let gpa = tree_gfn(rng) * PAGE_SIZE as u64;
            let len = (2 * PAGE_SIZE).min(TREE_BYTES - gpa as usize);
            let mut buf = vec![0; len];
            vm.space.read(Gpa(gpa), &mut buf).unwrap();
            assert!(
                buf == vm.model[gpa as usize..][..len],
                "{:?} read wrong bytes at {gpa:#x}",
                vm.space.id()
            );
        }
        7..=8 => {
            // A write fault without a write: copies or reuses, and changes no byte.
            let g = tree_gfn(rng);
            vm.space.handle_fault(Gfn(g), Access::Write).unwrap();
            let mut buf = vec![0; PAGE_SIZE];
            vm.space.read(Gfn(g).gpa(), &mut buf).unwrap();
            assert!(
                buf == vm.model[g as usize * PAGE_SIZE..][..PAGE_SIZE],
                "{:?}: a write fault at gfn {g:#x} changed its bytes",
                vm.space.id()
            );
        }
        9 => {
            let mut st = state.lock().unwrap();
            if st.live < max_vms {
                st.live += 1;
                let seed = st.next_seed;
                st.next_seed += 1;
                drop(st);
                let child = vm.space.fork(Arc::new(NoopMmu)).unwrap();
                let child = TreeVm {
                    space: child,
                    model: vm.model.clone(),
                    seed,
                    writes: 0,
                };
                state.lock().unwrap().idle.push(child);
            }
        }
        10 => {
            let mut st = state.lock().unwrap();
            if st.live > 2 {
                // Counted out now, so no other thread exits the last VMs meanwhile.
                st.live -= 1;
                drop(st);
                vm.verify("exit");
                vm.space.exit();
                assert!(vm.space.read(Gpa(0), &mut [0]).is_err());
                return false;
            }
        }
        _ => vm.verify("a full check"),
    }
    true
}

#[test]
fn threads_sharing_one_fork_tree_keep_every_vm_its_own_bytes() {
    shared_tree(3, 8, 200, 1, rmap::Design::Chain, (3, 2), CowRun::Adaptive);
    shared_tree(2, 6, 150, 2, rmap::Design::Flat, (0, 0), CowRun::Adaptive);
    shared_tree(2, 6, 150, 3, rmap::Design::Chain, (3, 3), CowRun::Fixed);
}

#[test]
fn several_threads_on_one_vm_write_disjoint_pages() {
    let mm = manager(4096, rmap::Design::Chain, AllocatorKind::Magazine, 4);
    let vm = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages: 1024,
            }],
            Arc::new(NoopMmu),
        )
        .unwrap();
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let vm = &vm;
            s.spawn(move || {
                for round in 0..3u8 {
                    for p in (t..1024).step_by(4) {
                        let v = [(p as u8) ^ round; 64];
                        vm.write(Gpa(p * PAGE_SIZE as u64 + 8), &v).unwrap();
                    }
                    if t == 0 && round == 1 {
                        // A fork in the middle write-protects everything under the others.
                        let child = vm.fork(Arc::new(NoopMmu)).unwrap();
                        child.exit();
                    }
                }
            });
        }
    });
    for p in 0..1024u64 {
        let mut b = [0u8; 64];
        vm.read(Gpa(p * PAGE_SIZE as u64 + 8), &mut b).unwrap();
        assert_eq!(b, [(p as u8) ^ 2; 64]);
    }
}

#[test]
fn a_new_vm_reads_zeros_after_many_vms_wrote_and_exited() {
    let mm = manager(512, rmap::Design::Chain, AllocatorKind::Magazine, 0);
    for i in 0..20u8 {
        let vm = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
        let junk = vec![i | 1; 24 * PAGE_SIZE];
        vm.write(Gpa(0), &junk).unwrap();
        let child = vm.fork(Arc::new(NoopMmu)).unwrap();
        child.write(Gpa(0), &junk[..PAGE_SIZE * 8]).unwrap();
        drop(vm);
        drop(child);
    }
    let fresh = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    let mut buf = vec![0xFF; 24 * PAGE_SIZE];
    fresh.read(Gpa(0), &mut buf).unwrap();
    assert!(buf.iter().all(|&b| b == 0), "a new VM saw old bytes");
}

#[test]
fn exhaustion_fails_only_the_faulting_vm_and_leaks_nothing() {
    let mm = manager(20, rmap::Design::Chain, AllocatorKind::Magazine, 0);
    let a = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    let b = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    b.write(Gpa(0), &[7; 4 * PAGE_SIZE]).unwrap();
    // `a` eats the rest of the pool, then fails cleanly.
    let mut written = 0;
    let err = loop {
        match a.write(Gpa(written * PAGE_SIZE as u64), &[1; PAGE_SIZE]) {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written <= 24);
    };
    assert!(err.to_string().contains("exhausted"), "{err}");
    // A fork needs no frames; the child's first write needs one and fails alone.
    let child = a.fork(Arc::new(NoopMmu)).unwrap();
    assert!(child.write(Gpa(0), &[9; 8]).is_err());
    let mut buf = vec![0; 4 * PAGE_SIZE];
    b.read(Gpa(0), &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 7), "another VM's bytes changed");
    let mut one = [0u8; PAGE_SIZE];
    child.read(Gpa(0), &mut one).unwrap();
    assert!(one.iter().all(|&x| x == 1));
    drop((a, b, child));
    assert_eq!(mm.pool().free_frames(), 20);
}

#[test]
fn fork_failing_in_rmap_leaves_the_parent_intact() {
    let mm = manager(256, rmap::Design::Chain, AllocatorKind::Magazine, 0);
    let vm = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    vm.write(Gpa(0), &[3; 2 * PAGE_SIZE]).unwrap();
    let before = vm.memory();
    mm.rmap().fail_allocations_after(1);
    let err = vm.fork(Arc::new(NoopMmu)).unwrap_err();
    mm.rmap().clear_failpoint();
    assert!(err.to_string().contains("reverse maps"), "{err}");
    assert_eq!(vm.memory(), before);
    vm.write(Gpa(0), &[4; 8]).unwrap();
    let c = vm.counters();
    assert_eq!(c.cow_copies, 0, "no fork happened, so no copy");
    drop(vm);
    assert_eq!(mm.pool().free_frames(), 256);
}

#[test]
fn accounting_follows_fork_and_cow() {
    let mm = manager(1024, rmap::Design::Chain, AllocatorKind::Magazine, 0);
    let vm = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    vm.write(Gpa(0), &vec![1; 16 * PAGE_SIZE]).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).unwrap();
    let m = child.memory();
    assert_eq!((m.resident, m.shared, m.private), (16, 16, 0));
    assert!((m.pss - 8.0).abs() < 1e-9);
    child.write(Gpa(0), &vec![2; 4 * PAGE_SIZE]).unwrap();
    let (p, c) = (vm.memory(), child.memory());
    assert_eq!((c.shared, c.private), (12, 4));
    assert_eq!((p.shared, p.private), (12, 4));
    assert!((p.pss - 10.0).abs() < 1e-9);
    assert_eq!(child.counters().cow_copies, 4);
    // The parent's writes to its now-private pages reuse them.
    vm.write(Gpa(0), &vec![3; 4 * PAGE_SIZE]).unwrap();
    assert_eq!(vm.counters().cow_reuses, 4);
    assert_eq!(vm.counters().cow_copies, 0);
}

#[test]
fn parent_and_child_unshare_and_exit_concurrently_without_leaks() {
    let mm = manager(8192, rmap::Design::Chain, AllocatorKind::Magazine, 4);
    let total = mm.pool().total_frames();
    let ram = [RegionSpec {
        start: Gfn(0),
        pages: 2048,
    }];
    for round in 0..30u8 {
        let parent = mm.create(&ram, Arc::new(NoopMmu)).unwrap();
        for p in (0..2048u64).step_by(3) {
            parent.write(Gpa(p * PAGE_SIZE as u64), &[round]).unwrap();
        }
        let child = parent.fork(Arc::new(NoopMmu)).unwrap();
        std::thread::scope(|s| {
            for (vm, mark) in [(&parent, 1u8), (&child, 2u8)] {
                s.spawn(move || {
                    for p in (0..2048u64).step_by(2) {
                        vm.write(Gpa(p * PAGE_SIZE as u64 + 1), &[mark]).unwrap();
                    }
                    for p in (0..2048u64).step_by(6) {
                        let mut b = [0u8; 2];
                        vm.read(Gpa(p * PAGE_SIZE as u64), &mut b).unwrap();
                        assert_eq!(b, [round, mark]);
                    }
                    vm.exit();
                });
            }
        });
        assert_eq!(
            mm.pool().free_frames(),
            total,
            "round {round} leaked frames"
        );
    }
}

#[test]
fn adaptive_copy_on_write_copies_what_is_written_and_grows_with_a_rewrite() {
    let mm = manager_cow(
        4096,
        rmap::Design::Chain,
        AllocatorKind::Magazine,
        4,
        6,
        CowRun::Adaptive,
    );
    // Three page-table blocks of 512 pages.
    let ram = [RegionSpec {
        start: Gfn(0),
        pages: 1536,
    }];
    let vm = mm.create(&ram, Arc::new(NoopMmu)).unwrap();
    vm.write(Gpa(0), &vec![5; 1536 * PAGE_SIZE]).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).unwrap();
    let page = |p: u64| Gpa(p * PAGE_SIZE as u64);
    // Sparse writes in block 0, no two neighbours: one page copied each.
    for p in (0..512u64).step_by(37) {
        child.write(Gpa(page(p).0 + 3), &[6]).unwrap();
    }
    let c = child.counters();
    assert_eq!((c.cow_copy_faults, c.cow_copies), (14, 14), "{c:?}");
    // A sequential rewrite of block 1 and on into block 2: the run doubles behind the
    // writes (1, 2, 4, 8, 16, 32 pages, then 1 to reach a multiple of 64), settles into
    // aligned 64-page runs, and keeps that size across the block boundary at 1024 (the
    // hint; without it the ramp would start again there: 7 more faults).
    let before = child.counters();
    for p in 512..1088u64 {
        child.write(page(p), &[7]).unwrap();
    }
    let c = child.counters();
    assert_eq!(
        c.cow_copies - before.cow_copies,
        576,
        "only what is written"
    );
    assert_eq!(
        c.cow_copy_faults - before.cow_copy_faults,
        7 + 7 + 1,
        "{c:?}"
    );
    // The parent is now the last sharer of pages 512..1088: it rewrites them by reuse,
    // a 64-page run per fault (9 faults) and no copy.
    let before = vm.counters();
    for p in 512..1088u64 {
        vm.write(page(p), &[8]).unwrap();
    }
    let c = vm.counters();
    assert_eq!(c.cow_copies, before.cow_copies, "{c:?}");
    assert_eq!(c.cow_reuses - before.cow_reuses, 576, "{c:?}");
    assert_eq!(c.cow_reuse_faults - before.cow_reuse_faults, 9, "{c:?}");
    let mut b = [0u8; 1];
    for (who, p, want) in [
        (&child, 600, 7),
        (&vm, 600, 8),
        (&child, 1087, 7),
        (&vm, 1087, 8),
        (&child, 1088, 5),
        (&vm, 37, 5),
    ] {
        who.read(page(p), &mut b).unwrap();
        assert_eq!(b, [want], "page {p}");
    }
    child.read(Gpa(page(37).0 + 3), &mut b).unwrap();
    assert_eq!(b, [6], "the child's sparse write");
}

#[test]
fn copy_on_write_copies_a_whole_aligned_run_in_one_fault() {
    let mm = manager_cow(
        1024,
        rmap::Design::Chain,
        AllocatorKind::Magazine,
        4,
        3,
        CowRun::Fixed,
    );
    let vm = mm
        .create(&REGIONS, Arc::new(guestmem::mmu::RecordingMmu::default()))
        .unwrap();
    vm.write(Gpa(0), &vec![5; 16 * PAGE_SIZE]).unwrap();
    let rec = Arc::new(guestmem::mmu::RecordingMmu::default());
    let child = vm.fork(rec.clone()).unwrap();
    // One write in page 9 copies pages 8..16 (the aligned run of 8) in one fault.
    child.write(Gpa(9 * PAGE_SIZE as u64), &[6]).unwrap();
    let c = child.counters();
    assert_eq!((c.cow_copy_faults, c.cow_copies), (1, 8));
    let maps: Vec<_> = rec
        .take()
        .into_iter()
        .filter(|c| matches!(c, guestmem::mmu::MmuCall::Map { .. }))
        .collect();
    assert_eq!(maps.len(), 1, "one host mapping for the run: {maps:?}");
    assert!(matches!(
        maps[0],
        guestmem::mmu::MmuCall::Map {
            gfn: Gfn(8),
            pages: 8,
            writable: true,
            ..
        }
    ));
    // The copies hold the parent's bytes, except the one written.
    let mut b = [0u8; 2];
    child.read(Gpa(9 * PAGE_SIZE as u64), &mut b).unwrap();
    assert_eq!(b, [6, 5]);
    child.read(Gpa(15 * PAGE_SIZE as u64), &mut b).unwrap();
    assert_eq!(b, [5, 5]);
    vm.read(Gpa(9 * PAGE_SIZE as u64), &mut b).unwrap();
    assert_eq!(b, [5, 5]);
    let m = child.memory();
    assert_eq!((m.private, m.shared), (8, 8));
    drop((vm, child));
    assert_eq!(mm.pool().free_frames(), 1024);
}

#[test]
fn frames_are_backed_by_host_memory_before_they_are_mapped() {
    let pool =
        Arc::new(Pool::new(&PoolConfig::uniform(4 << 20, 1, AllocatorKind::Magazine)).unwrap());
    let mm = Manager::new(Arc::clone(&pool), ManagerConfig::default());
    let vm = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages: 256,
            }],
            Arc::new(NoopMmu),
        )
        .unwrap();
    assert_eq!(pool.resident_bytes().unwrap(), 0);
    vm.read(Gpa(0), &mut [0u8; 1]).unwrap();
    // A first touch maps a fault-around run: all of it must exist in the memfd, or a
    // userfaultfd-registered window would see MISSING faults for it forever.
    let run = vm.pte(Gfn(0)).unwrap();
    assert!(run.is_present());
    assert!(pool.resident_bytes().unwrap() >= 64 * PAGE_SIZE as u64);
    drop(vm);
    pool.release_free_memory().unwrap();
    assert_eq!(pool.resident_bytes().unwrap(), 0);
    let vm = mm
        .create(
            &[RegionSpec {
                start: Gfn(0),
                pages: 256,
            }],
            Arc::new(NoopMmu),
        )
        .unwrap();
    vm.read(Gpa(0), &mut [0u8; 1]).unwrap();
    assert!(
        pool.resident_bytes().unwrap() >= 64 * PAGE_SIZE as u64,
        "punched frames are backed again"
    );
}

#[test]
fn a_page_beyond_guest_physical_space_is_an_error_not_a_panic() {
    let mm = manager(64, rmap::Design::Chain, AllocatorKind::Magazine, 0);
    let vm = mm.create(&REGIONS, Arc::new(NoopMmu)).unwrap();
    for gfn in [
        Gfn(1 << 52),
        Gfn((1 << 52) + 3),
        Gfn(u64::MAX),
        Gfn(24),
        Gfn(64),
    ] {
        let e = vm.handle_fault(gfn, guestmem::Access::Write).unwrap_err();
        assert!(e.to_string().contains("outside every RAM region"), "{e}");
        assert!(vm.entry(gfn).is_err());
    }
    assert!(vm.write(Gpa(u64::MAX - 2), &[1; 8]).is_err());
    assert!(
        mm.frame_referenced(
            guestmem::Pfn(u32::MAX),
            guestmem::ReferencedLocking::Blocking
        ) == Default::default()
    );
}

/// A host view whose `map_run` starts failing after `ok` successful calls, recording
/// every unmap it is asked for.
#[derive(Debug, Default)]
struct FailingMmu {
    ok: std::sync::atomic::AtomicU64,
    unmaps: std::sync::Mutex<Vec<(Gfn, u64)>>,
}

impl guestmem::mmu::HostMmu for FailingMmu {
    fn map_run(&self, _run: guestmem::mmu::MapRun<'_>) -> Result<(), guestmem::mmu::HostMmuError> {
        let left = self.ok.load(std::sync::atomic::Ordering::Relaxed);
        if left == 0 {
            return Err(guestmem::mmu::HostMmuError {
                op: "map",
                gfn: Gfn(0),
                pages: 0,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        self.ok
            .store(left - 1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }
    fn unmap_run(&self, gfn: Gfn, pages: u64) -> Result<(), guestmem::mmu::HostMmuError> {
        self.unmaps.lock().unwrap().push((gfn, pages));
        Ok(())
    }
    fn protect_run(&self, _: Gfn, _: u64, _: bool) -> Result<(), guestmem::mmu::HostMmuError> {
        Ok(())
    }
}

#[test]
fn a_failed_host_mapping_leaves_no_mapping_and_returns_the_frames() {
    let mm = manager_cow(
        256,
        rmap::Design::Chain,
        AllocatorKind::Magazine,
        2,
        2,
        CowRun::Fixed,
    );
    let mmu = Arc::new(FailingMmu::default());
    mmu.ok.store(1, std::sync::atomic::Ordering::Relaxed);
    let vm = mm.create(&REGIONS, mmu.clone()).unwrap();
    vm.write(Gpa(0), &[1; 8]).unwrap();
    // The second first-touch run cannot be mapped: an error, its frames back, host told.
    let e = vm.write(Gpa(8 * PAGE_SIZE as u64), &[2; 8]).unwrap_err();
    assert!(e.to_string().contains("host mapping"), "{e}");
    assert_eq!(mmu.unmaps.lock().unwrap().as_slice(), &[(Gfn(8), 4)]);
    assert!(vm.pte(Gfn(8)).unwrap().is_empty());
    assert_eq!(mm.pool().free_frames(), 256 - 4);
    // A fork child whose copy-on-write run cannot be mapped keeps sharing, and the
    // parent's bytes are intact.
    let cmmu = Arc::new(FailingMmu::default());
    let child = vm.fork(cmmu.clone()).unwrap();
    assert!(child.write(Gpa(0), &[9; 8]).is_err());
    assert_eq!(cmmu.unmaps.lock().unwrap().as_slice(), &[(Gfn(0), 4)]);
    let mut b = [0u8; 8];
    vm.read(Gpa(0), &mut b).unwrap();
    assert_eq!(b, [1; 8]);
    assert_eq!(
        mm.pool().free_frames(),
        256 - 4,
        "the failed copies went back"
    );
    drop((vm, child));
    assert_eq!(mm.pool().free_frames(), 256);
}

/// A host view whose `protect_run(.., writable: true)` fails while `fail` is set,
/// recording every protect call.
#[derive(Debug, Default)]
struct UnprotectFails {
    fail: std::sync::atomic::AtomicBool,
    protects: std::sync::Mutex<Vec<(Gfn, u64, bool)>>,
}

impl guestmem::mmu::HostMmu for UnprotectFails {
    fn map_run(&self, _run: guestmem::mmu::MapRun<'_>) -> Result<(), guestmem::mmu::HostMmuError> {
        Ok(())
    }
    fn unmap_run(&self, _: Gfn, _: u64) -> Result<(), guestmem::mmu::HostMmuError> {
        Ok(())
    }
    fn protect_run(
        &self,
        gfn: Gfn,
        pages: u64,
        writable: bool,
    ) -> Result<(), guestmem::mmu::HostMmuError> {
        self.protects.lock().unwrap().push((gfn, pages, writable));
        if writable && self.fail.load(std::sync::atomic::Ordering::Relaxed) {
            return Err(guestmem::mmu::HostMmuError {
                op: "protect",
                gfn,
                pages,
                source: std::io::Error::from_raw_os_error(libc::ENOMEM),
            });
        }
        Ok(())
    }
}

#[test]
fn a_failed_reuse_leaves_the_run_write_protected_in_the_manager_and_the_host_view() {
    let mm = manager_cow(
        1024,
        rmap::Design::Chain,
        AllocatorKind::Magazine,
        4,
        6,
        CowRun::Adaptive,
    );
    let ram = [RegionSpec {
        start: Gfn(0),
        pages: 512,
    }];
    let mmu = Arc::new(UnprotectFails::default());
    let vm = mm.create(&ram, mmu.clone()).unwrap();
    vm.write(Gpa(0), &vec![1; 128 * PAGE_SIZE]).unwrap();
    let child = vm.fork(Arc::new(NoopMmu)).unwrap();
    // The child copies pages 0..128: the parent is their last sharer.
    child.write(Gpa(0), &vec![2; 128 * PAGE_SIZE]).unwrap();
    mmu.protects.lock().unwrap().clear();
    mmu.fail.store(true, std::sync::atomic::Ordering::Relaxed);
    // The parent's write would reuse 0..64 in one call; the call fails.
    assert!(vm.write(Gpa(0), &[3]).is_err());
    for g in 0..64 {
        let pte = vm.pte(Gfn(g)).unwrap();
        assert!(!pte.is_writable(), "gfn {g} writable after a failed reuse");
    }
    assert_eq!(
        mmu.protects.lock().unwrap().as_slice(),
        &[(Gfn(0), 64, true), (Gfn(0), 64, false)],
        "the host view is put back write-protected"
    );
    // Nothing written; once the host view cooperates, the write goes through.
    let mut b = [0u8; 1];
    vm.read(Gpa(0), &mut b).unwrap();
    assert_eq!(b, [1]);
    mmu.fail.store(false, std::sync::atomic::Ordering::Relaxed);
    vm.write(Gpa(0), &[3]).unwrap();
    vm.read(Gpa(0), &mut b).unwrap();
    assert_eq!(b, [3]);
    child.read(Gpa(0), &mut b).unwrap();
    assert_eq!(b, [2]);
}
