//! A read-only run is never writable, even while it is being made: `Window::map_run` maps
//! it `PROT_READ` until userfaultfd write-protection is in place, and a guest write in
//! that moment gets `EFAULT` from `KVM_RUN`, which the vCPU retries while
//! `window::ro_map_state` shows such a change in flight.
//!
//! The test drives that real path: a vCPU writes one page again and again while another
//! thread keeps calling `map_run` on it with `writable: false`, over a frame whose bytes
//! are fixed. Every guest write must then fault to the resolver, whose copy-on-write
//! gives the page a private frame again; the fixed frame must never change (no write
//! through a read-only run, not even mid-`map_run`), and the vCPU must never fail with
//! `EFAULT`. The resolver is the test's own (frames from one memfd), because `HostMmu`
//! calls on one run must be serialised (the manager holds the page-table lock around
//! them): the mapper thread takes the resolver's lock around each `map_run`.
//! Needs /dev/kvm; fails saying so unless SKIP_KVM=1.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use guestmem::mmu::{HostMmu, MapRun};
use guestmem::types::{Gfn, NodeId, Pfn};
use vmm::guest::{DATA_START, pattern};
use vmm::sys::mman;
use vmm::{Command, FaultError, FaultKind, FaultResolver, Op, VcpuError, Vm, VmConfig, Window};

mod common;
use common::hypervisor;

const PAGE: u64 = 4096;
/// Frame 0 of the resolver's memfd: fixed bytes, only ever mapped read-only.
const FROZEN: u64 = 0;
/// The seed of the frozen frame's bytes.
const FROZEN_SEED: u64 = 0xF0F0;
/// Guest writes that must meet a read-only run (each costs a copy) before the test ends.
/// Each adds at most one to the fault handler's count of one fault repeating back to back
/// (a freeze no write meets raises no fault), so this stays below its limit of 10,000.
const COPIES: u64 = 1000;
/// Copies that prove the race happened when the time (10 s) ran out before [`COPIES`]:
/// between 0.05% and 0.5% of freezes meet a write on this 2-CPU host, depending on load.
const MIN_COPIES: u64 = 20;
/// The page the test writes.
const TARGET: Gfn = Gfn(DATA_START / PAGE);

#[derive(Debug, Default)]
struct Pages {
    /// Guest page -> (frame, mapped writable).
    mapped: HashMap<u64, (u64, bool)>,
    /// Guest page -> its private frame, kept for the next copy-on-write.
    own: HashMap<u64, u64>,
    next: u64,
    copies: u64,
}

/// Zero-fills first touches; a write to the frozen frame copies it into the page's private
/// frame and maps that writable. Every mapping change happens under `pages`' lock.
#[derive(Debug)]
struct Remapper {
    window: Arc<Window>,
    memfd: File,
    frames: u64,
    pages: Mutex<Pages>,
}

impl Remapper {
    fn new(window: Arc<Window>, frames: u64) -> Result<Remapper, FaultError> {
        let memfd = File::from(mman::memfd("readonly-map-test", frames * PAGE)?);
        let frozen: Vec<u8> = (0..PAGE / 8)
            .flat_map(|w| pattern(FROZEN_SEED, TARGET.gpa().0 + 8 * w).to_le_bytes())
            .collect();
        memfd.write_all_at(&frozen, FROZEN * PAGE).map_err(io)?;
        Ok(Remapper {
            window,
            memfd,
            frames,
            pages: Mutex::new(Pages {
                next: FROZEN + 1,
                ..Pages::default()
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Pages> {
        self.pages.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn map(&self, gfn: Gfn, frame: u64, writable: bool) -> Result<(), FaultError> {
        self.window.map_run(MapRun {
            gfn,
            pages: 1,
            node: NodeId(0),
            pfn: Pfn(frame as u32),
            fd: self.memfd.as_fd(),
            file_offset: frame * PAGE,
            writable,
        })?;
        Ok(())
    }

    fn alloc(&self, p: &mut Pages, gfn: Gfn) -> Result<u64, FaultError> {
        if p.next == self.frames {
            return Err(FaultError::OutOfFrames(gfn));
        }
        p.next += 1;
        Ok(p.next - 1)
    }

    /// Maps the frozen frame read-only at `gfn` through the real `map_run`.
    fn freeze(&self, gfn: Gfn) -> Result<(), FaultError> {
        let mut p = self.lock();
        self.map(gfn, FROZEN, false)?;
        p.mapped.insert(gfn.0, (FROZEN, false));
        Ok(())
    }

    /// Words of the frozen frame that are no longer what it was made with.
    fn frozen_changes(&self) -> usize {
        let mut buf = vec![0u8; PAGE as usize];
        self.memfd
            .read_exact_at(&mut buf, FROZEN * PAGE)
            .expect("read the frozen frame");
        buf.chunks_exact(8)
            .enumerate()
            .filter(|&(w, b)| {
                let word = u64::from_le_bytes(b.try_into().expect("8 bytes"));
                word != pattern(FROZEN_SEED, TARGET.gpa().0 + 8 * w as u64)
            })
            .count()
    }

    fn copies(&self) -> u64 {
        self.lock().copies
    }
}

fn io(e: std::io::Error) -> FaultError {
    FaultError::Mman(mman::MmanError::Memfd {
        bytes: PAGE,
        source: e,
    })
}

impl FaultResolver for Remapper {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        let mut p = self.lock();
        match p.mapped.get(&gfn.0).copied() {
            // Raced with another fault, or a read of a read-only page: already mapped.
            Some((_, writable)) if writable || !kind.is_write() => Ok(()),
            Some((from, _)) => {
                let to = match p.own.get(&gfn.0) {
                    Some(&f) => f,
                    None => self.alloc(&mut p, gfn)?,
                };
                let mut buf = vec![0u8; PAGE as usize];
                self.memfd
                    .read_exact_at(&mut buf, from * PAGE)
                    .map_err(io)?;
                self.memfd.write_all_at(&buf, to * PAGE).map_err(io)?;
                self.map(gfn, to, true)?;
                p.own.insert(gfn.0, to);
                p.mapped.insert(gfn.0, (to, true));
                p.copies += 1;
                Ok(())
            }
            None => {
                let f = self.alloc(&mut p, gfn)?;
                // Populated, so that the mapping does not raise MISSING again.
                self.memfd
                    .write_all_at(&[0u8; PAGE as usize], f * PAGE)
                    .map_err(io)?;
                self.map(gfn, f, true)?;
                p.mapped.insert(gfn.0, (f, true));
                Ok(())
            }
        }
    }
}

#[test]
fn a_guest_writing_a_page_being_mapped_read_only_never_writes_through_it() {
    let Some(hv) = hypervisor() else { return };
    let mut resolver = None;
    let vm = Vm::new(&hv, &VmConfig::new(8 << 20, 1), |w| {
        let r = Arc::new(Remapper::new(w.clone(), 1024)?);
        resolver = Some(r.clone());
        Ok(r as Arc<dyn FaultResolver>)
    })
    .expect("create VM");
    let resolver = resolver.expect("the VM made its resolver");
    let fill = |seed| vm.run(0, Command::new(Op::Fill, TARGET, 1, seed));
    fill(1).expect("first fill");

    let stop = AtomicBool::new(false);
    let freezes = AtomicU64::new(0);
    let mut writes = 0u64;
    std::thread::scope(|s| {
        let mapper = s.spawn(|| {
            // Until enough writes met a read-only run, or time is up (a loaded machine
            // races less per freeze: the bound is time, not a count).
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if stop.load(Ordering::Relaxed)
                    || resolver.copies() >= COPIES
                    || Instant::now() > deadline
                {
                    break;
                }
                resolver.freeze(TARGET).expect("map_run read-only");
                freezes.fetch_add(1, Ordering::Relaxed);
                // A breath between freezes, as between two forks of one VM: back to back
                // with nothing between, the next freeze would begin before the vCPU's
                // retry of the last could write, again and again (a livelock no real
                // mapper makes), and the vCPU would report the EFAULT after 5 s.
                std::thread::sleep(Duration::from_micros(50));
                let changed = resolver.frozen_changes();
                if changed > 0 {
                    stop.store(true, Ordering::Relaxed);
                    panic!("the guest wrote {changed} words through a read-only run");
                }
            }
        });
        // The guest writes the page with a new seed each time while the mapper keeps
        // mapping it read-only under the vCPU.
        let until = Instant::now() + Duration::from_secs(60);
        while !mapper.is_finished() {
            assert!(Instant::now() < until, "the mapper did not finish");
            match fill(2 + writes) {
                Ok(_) => writes += 1,
                Err(e) => {
                    stop.store(true, Ordering::Relaxed);
                    match e {
                        VcpuError::GuestCrashed { .. } => {
                            panic!("the vCPU failed writing a page being mapped read-only: {e}")
                        }
                        e => panic!("fill: {e}"),
                    }
                }
            }
        }
        stop.store(true, Ordering::Relaxed);
    });
    let freezes = freezes.into_inner();
    let copies = resolver.copies();
    // Both sides really raced: many read-only runs mapped, many writes faulting on them.
    assert!(
        copies >= MIN_COPIES,
        "only {copies} writes met one of {freezes} read-only runs"
    );
    assert!(writes >= 1, "no fill completed");
    assert_eq!(vm.fault_counts().write_protect, copies);
    // The frozen frame never changed: the page's bytes changed only by copy-on-write.
    assert_eq!(resolver.frozen_changes(), 0);
    // The guest's own writes are all there once the mapper has stopped.
    let last = 2 + writes;
    fill(last).expect("a last fill");
    let r = vm
        .run(0, Command::new(Op::Verify, TARGET, 1, last))
        .expect("verify");
    assert_eq!(r.mismatches(), 0);
}
