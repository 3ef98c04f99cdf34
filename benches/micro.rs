//! `micro`: the hot paths under criterion, with confidence intervals (issue 12). Each
//! benchmark measures one operation; the `harness = false` experiments in `benches/`
//! measure whole workloads and compare designs in one run.
//!
//! 1. `alloc_free/<design>`: alloc + free of one order-0 frame
//!    (`FrameInit::Overwritten`: the allocator alone, no zeroing), on a prefaulted one-node
//!    `Pool` per `AllocatorKind` (magazine, percpu, global).
//! 2. `rmap_walk/<design>/<frame>`: one reverse-map walk (`WalkMode::TryShared`, a visitor
//!    that does nothing) in a fork tree of a parent and 100 children that each filed a
//!    private page under their own `anon_vma_prepare`: `child` walks a child's private
//!    frame, `shared` a parent frame all 101 regions map; `Design::Chain` against
//!    `Design::Flat`.
//! 3. `fault/zero_fill`: the first write of a page of a fresh address space (software
//!    path, `NoopMmu` host view, `fault_around` off: one fault maps one zeroed page).
//! 4. `fault/cow_copy`: a fork child's first write to a page it shares with its parent
//!    (one copy-on-write fault, `cow_around` off: it copies one page).
//!
//! Setup (fresh spaces, forks) is outside the measured time (`iter_batched`); so is
//! tearing them down. `cargo bench --bench micro` (under a minute on 2 vCPUs);
//! `cargo test --release --bench micro` runs each benchmark once (smoke).

use std::hint::black_box;
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::Duration;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use guestmem::mmu::NoopMmu;
use guestmem::{
    AddressSpace, AllocatorKind, FrameInit, Gfn, Gpa, Manager, ManagerConfig, NodeId, Order, Pool,
    PoolConfig, RegionSpec,
};
use kvmm::setup;
use rmap::{Design, RegionRmap, Rmap, RmapConfig, WalkMode, WalkOutcome, rmap_walk};

/// Children in the rmap fork tree.
const CHILDREN: u32 = 100;

/// Pages per region of the rmap fork tree.
const TREE_PAGES: u64 = 16;

/// Criterion's defaults (100 samples, 5 s each, 3 s warm-up) would take twice as long
/// for these nine; the fault group measures longer (below), its spread is wider.
fn config() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
}

fn alloc_free(c: &mut Criterion) {
    let mut g = c.benchmark_group("alloc_free");
    for kind in AllocatorKind::ALL {
        let pool = Pool::new(&PoolConfig::uniform(16 << 20, 1, kind))
            .expect("a 16 MiB benchmark pool fits in this machine's memory");
        pool.prefault().expect("the host backs the benchmark pool");
        g.bench_function(kind.name(), |b| {
            b.iter(|| {
                let pfn = pool
                    .alloc(NodeId(0), Order::ZERO, FrameInit::Overwritten)
                    .expect("a 16 MiB pool has a free frame");
                pool.free(black_box(pfn), Order::ZERO);
            })
        });
    }
    g.finish();
}

fn design_name(d: Design) -> &'static str {
    match d {
        Design::Chain => "chain",
        Design::Flat => "flat",
    }
}

/// A parent region and `CHILDREN` fork children, each child with its own anon_vma
/// prepared (its private pages' home).
struct Tree {
    parent_av: Arc<rmap::AnonVma<u32>>,
    child_av: Arc<rmap::AnonVma<u32>>,
    // Kept alive for the walks: dropping a region unlinks it from the tree.
    _regions: Vec<RegionRmap<u32>>,
    _rmap: Rmap,
}

fn tree(design: Design) -> Tree {
    let rmap = Rmap::new(RmapConfig {
        design,
        ..Default::default()
    });
    let mut parent = rmap.region(0u32, 0..TREE_PAGES).expect("non-empty range");
    let parent_av = rmap
        .anon_vma_prepare(&mut parent)
        .expect("no failpoint armed");
    let mut regions = Vec::with_capacity(CHILDREN as usize + 1);
    let mut child_av = None;
    for c in 1..=CHILDREN {
        let mut child = rmap.region(c, 0..TREE_PAGES).expect("non-empty range");
        rmap.anon_vma_fork(&mut child, &parent)
            .expect("no failpoint armed");
        child_av = Some(
            rmap.anon_vma_prepare(&mut child)
                .expect("no failpoint armed"),
        );
        regions.push(child);
    }
    regions.push(parent);
    Tree {
        parent_av,
        child_av: child_av.expect("CHILDREN > 0"),
        _regions: regions,
        _rmap: rmap,
    }
}

fn walk(av: &rmap::AnonVma<u32>, pgoff: u64) -> WalkOutcome {
    rmap_walk(av, pgoff, WalkMode::TryShared, |m, _| {
        black_box(m);
        ControlFlow::Continue(())
    })
    .expect("TryShared walks cannot fail")
}

fn rmap_walks(c: &mut Criterion) {
    let mut g = c.benchmark_group("rmap_walk");
    for design in [Design::Chain, Design::Flat] {
        let t = tree(design);
        for (frame, av) in [("child", &t.child_av), ("shared", &t.parent_av)] {
            // Nothing writes during the walks: never contended, every mapping examined.
            // The chain design files a child's private frame under that child alone; the
            // flat design and a parent frame reach every region.
            let expected = match (design, frame) {
                (Design::Chain, "child") => 1,
                _ => u64::from(CHILDREN) + 1,
            };
            assert_eq!(walk(av, 3), WalkOutcome::Completed { examined: expected });
            g.bench_function(format!("{}/{frame}", design_name(design)), |b| {
                b.iter(|| walk(av, black_box(3)))
            });
        }
    }
    g.finish();
}

/// A one-page VM at gfn 0.
fn one_page_vm(mm: &Arc<Manager>) -> Arc<AddressSpace> {
    mm.create(
        &[RegionSpec {
            start: Gfn(0),
            pages: 1,
        }],
        Arc::new(NoopMmu),
    )
    .expect("a one-page VM")
}

fn faults(c: &mut Criterion) {
    // Faults, not prefetch: one fault maps or copies exactly one page.
    let mm = setup::manager(
        256 << 20,
        ManagerConfig {
            fault_around: Order::ZERO,
            cow_around: Order::ZERO,
            ..Default::default()
        },
    );
    let mut g = c.benchmark_group("fault");
    g.sample_size(60).measurement_time(Duration::from_secs(6));

    let before = mm.counters();
    let vm = one_page_vm(&mm);
    vm.write(Gpa(0), &[1]).expect("a free frame");
    assert_eq!(mm.counters().zero_fill_faults - before.zero_fill_faults, 1);
    drop(vm);
    g.bench_function("zero_fill", |b| {
        b.iter_batched(
            || one_page_vm(&mm),
            |vm| {
                vm.write(Gpa(0), black_box(&[1]))
                    .expect("the benchmark pool was sized for every batch");
                vm
            },
            BatchSize::SmallInput,
        )
    });

    let forked = || {
        let parent = one_page_vm(&mm);
        parent.write(Gpa(0), &[1]).expect("a free frame");
        let child = parent.fork(Arc::new(NoopMmu)).expect("fork");
        (parent, child)
    };
    let before = mm.counters();
    let (parent, child) = forked();
    child.write(Gpa(0), &[2]).expect("a free frame");
    assert_eq!(mm.counters().cow_copies - before.cow_copies, 1);
    drop((child, parent));
    g.bench_function("cow_copy", |b| {
        b.iter_batched(
            forked,
            |(parent, child)| {
                child
                    .write(Gpa(0), black_box(&[2]))
                    .expect("the benchmark pool was sized for every batch");
                (parent, child)
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group! {
    name = micro;
    config = config();
    targets = alloc_free, rmap_walks, faults
}
criterion_main!(micro);
