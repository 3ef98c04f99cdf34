//! rust-vmm interop (issue 13): a KVM guest on guestmem-managed memory, its RAM seen
//! through `vm-memory` (`Vm::guest_memory`), loaded by `linux-loader` (an ELF kernel
//! image, a kernel command line), and what the host wrote checked from inside the guest
//! (its verify and checksum commands) as well as through `Vm::read_u64`. Host writes to
//! untouched pages fault through userfaultfd to the VM's handler; out-of-range accesses
//! and loads are errors; a view held across a fork keeps its snapshot. Needs /dev/kvm
//! (fails saying so unless SKIP_KVM=1).

use std::io::Cursor;
use std::sync::Arc;
use std::sync::mpsc;

use guestmem::types::{Gfn, Gpa};
use guestmem::{AllocatorKind, Manager, ManagerConfig, Order, Pool, PoolConfig};
use linux_loader::cmdline::Cmdline;
use linux_loader::loader::{KernelLoader, elf::Elf, load_cmdline};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm::guest::{DATA_START, pattern};
use vmm::{Command, ForkOptions, ManagedVm, Op, VmConfig, VmError, WindowError};

mod common;
use common::hypervisor;

const MIB: u64 = 1 << 20;
const PAGE: u64 = 4096;
/// Guest RAM of every test VM.
const MEM: u64 = 16 * MIB;

/// A manager whose first touches map one page each (no fault-around), so that a host
/// write to `n` fresh pages takes exactly `n` faults.
fn manager() -> (Arc<Pool>, Arc<Manager>) {
    let pool = Arc::new(
        Pool::new(&PoolConfig::uniform(32 * MIB, 1, AllocatorKind::Magazine)).expect("pool"),
    );
    let cfg = ManagerConfig {
        fault_around: Order::ZERO,
        cow_around: Order::ZERO,
        ..ManagerConfig::default()
    };
    let mm = Manager::new(pool.clone(), cfg);
    (pool, mm)
}

fn data(page: u64) -> Gfn {
    Gfn(DATA_START / PAGE + page)
}

fn run(vm: &ManagedVm, cmd: Command) -> vmm::CmdResult {
    vm.vm()
        .run(0, cmd)
        .unwrap_or_else(|e| panic!("{cmd:?}: {e}"))
}

/// A minimal ELF64 x86-64 executable: the header, one program header, and one `PT_LOAD`
/// segment of `payload` to be loaded at `paddr` (also the entry point).
fn elf_image(paddr: u64, payload: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    const SEGMENT_OFFSET: u64 = 0x1000;
    let mut img = Vec::new();
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT, System V ABI, padding.
    img.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    img.extend_from_slice(&[0; 8]);
    img.extend_from_slice(&2u16.to_le_bytes()); // e_type: ET_EXEC
    img.extend_from_slice(&62u16.to_le_bytes()); // e_machine: EM_X86_64
    img.extend_from_slice(&1u32.to_le_bytes()); // e_version
    img.extend_from_slice(&paddr.to_le_bytes()); // e_entry
    img.extend_from_slice(&EHDR.to_le_bytes()); // e_phoff
    img.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    img.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    img.extend_from_slice(&(EHDR as u16).to_le_bytes()); // e_ehsize
    img.extend_from_slice(&(PHDR as u16).to_le_bytes()); // e_phentsize
    img.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    img.extend_from_slice(&0u16.to_le_bytes()); // e_shentsize
    img.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    img.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(img.len() as u64, EHDR);
    img.extend_from_slice(&1u32.to_le_bytes()); // p_type: PT_LOAD
    img.extend_from_slice(&5u32.to_le_bytes()); // p_flags: R+X
    img.extend_from_slice(&SEGMENT_OFFSET.to_le_bytes()); // p_offset
    img.extend_from_slice(&paddr.to_le_bytes()); // p_vaddr
    img.extend_from_slice(&paddr.to_le_bytes()); // p_paddr
    img.extend_from_slice(&(payload.len() as u64).to_le_bytes()); // p_filesz
    img.extend_from_slice(&(payload.len() as u64).to_le_bytes()); // p_memsz
    img.extend_from_slice(&PAGE.to_le_bytes()); // p_align
    assert_eq!(img.len() as u64, EHDR + PHDR);
    img.resize(SEGMENT_OFFSET as usize, 0);
    img.extend_from_slice(payload);
    img
}

/// `pages` pages starting at `start` holding the guest's fill pattern for `seed`.
fn pattern_bytes(start: Gfn, pages: u64, seed: u64) -> Vec<u8> {
    let first = start.gpa().0;
    (0..pages * PAGE / 8)
        .flat_map(|i| pattern(seed, first + i * 8).to_le_bytes())
        .collect()
}

#[test]
fn linux_loader_loads_an_elf_kernel_that_the_guest_then_verifies() {
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager();
    let vm = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("VM");
    let (start, pages, seed) = (data(16), 32, 0x5eed);
    let payload = pattern_bytes(start, pages, seed);
    let image = elf_image(start.gpa().0, &payload);
    let before = vm.fault_counts();

    let loaded = Elf::load(
        &vm.vm().guest_memory(),
        None,
        &mut Cursor::new(&image),
        None,
    )
    .expect("linux-loader loads the image through the vm-memory view");

    // The loader reports where the kernel went.
    assert_eq!(loaded.kernel_load, GuestAddress(start.gpa().0));
    assert_eq!(loaded.kernel_end, start.gpa().0 + pages * PAGE);
    // Every page it wrote was a hole: one MISSING write fault each, resolved by the VM's
    // fault handler while this thread waited.
    let after = vm.fault_counts();
    assert_eq!(after.missing_write - before.missing_write, pages);
    assert_eq!(after.total() - before.total(), pages);
    // The host reads the bytes back...
    let probe = start.gpa().0 + 5 * PAGE + 8 * 77;
    assert_eq!(
        vm.vm().read_u64(Gpa(probe)).expect("read"),
        pattern(seed, probe)
    );
    // ...and so does the guest: every word matches the pattern, and the checksum is the
    // sum of the payload's words, with no further fault.
    let v = run(&vm, Command::new(Op::Verify, start, pages, seed));
    assert_eq!(v.mismatches(), 0, "first bad {:?}", v.first_bad());
    let sum = run(&vm, Command::new(Op::Checksum, start, pages, 0));
    let expect = payload
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add);
    assert_eq!((sum.r0, sum.r1), (expect, pages * PAGE / 8));
    assert_eq!(vm.fault_counts().total(), after.total());
    drop(vm);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn an_elf_segment_beyond_guest_ram_is_refused() {
    let Some(hv) = hypervisor() else { return };
    let (_pool, mm) = manager();
    let vm = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("VM");
    let before = vm.fault_counts();
    let load = |paddr: u64| {
        let image = elf_image(paddr, &[0xab; 2 * PAGE as usize]);
        Elf::load(
            &vm.vm().guest_memory(),
            None,
            &mut Cursor::new(&image),
            None,
        )
    };
    // Wholly past the end: refused, nothing touched.
    let r = load(MEM);
    assert!(r.is_err(), "a segment past guest RAM must not load: {r:?}");
    assert_eq!(vm.fault_counts().total(), before.total());
    // Straddling the end: refused too, after vm-memory's partial copy of the part inside
    // (one page, one fault): a loader error does not undo what it wrote.
    let r = load(MEM - PAGE);
    assert!(
        r.is_err(),
        "a segment straddling the end must not load: {r:?}"
    );
    assert_eq!(vm.fault_counts().missing_write - before.missing_write, 1);
}

#[test]
fn load_cmdline_writes_a_command_line_the_guest_sees() {
    let Some(hv) = hypervisor() else { return };
    let (_pool, mm) = manager();
    let vm = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("VM");
    let page = data(3);
    let mut cmdline = Cmdline::new(256).expect("cmdline capacity");
    cmdline
        .insert_str("console=ttyS0 panic=1")
        .expect("cmdline");
    cmdline.insert("root", "/dev/vda").expect("cmdline");
    let text = b"console=ttyS0 panic=1 root=/dev/vda\0";
    let before = vm.fault_counts();

    load_cmdline(
        &vm.vm().guest_memory(),
        GuestAddress(page.gpa().0),
        &cmdline,
    )
    .expect("load the command line");

    assert_eq!(vm.fault_counts().missing_write - before.missing_write, 1);
    // The host reads it back through the view.
    let mut back = vec![0u8; text.len()];
    vm.vm()
        .guest_memory()
        .read_slice(&mut back, GuestAddress(page.gpa().0))
        .expect("read back");
    assert_eq!(back, text);
    // The guest sums the page's words: the command line, NUL and zero fill.
    let mut words = text.to_vec();
    words.resize(PAGE as usize, 0);
    let expect = words
        .chunks_exact(8)
        .map(|w| u64::from_le_bytes(w.try_into().expect("8 bytes")))
        .fold(0u64, u64::wrapping_add);
    assert_eq!(
        vm.vm().read_u64(page.gpa()).expect("read"),
        u64::from_le_bytes(text[..8].try_into().expect("8 bytes"))
    );
    assert_eq!(run(&vm, Command::new(Op::Checksum, page, 1, 0)).r0, expect);
    // A command line that would end past guest RAM is refused.
    assert!(load_cmdline(&vm.vm().guest_memory(), GuestAddress(MEM - 4), &cmdline).is_err());
}

#[test]
fn a_view_write_to_an_untouched_page_faults_once_and_reads_past_the_end_fail() {
    let Some(hv) = hypervisor() else { return };
    let (_pool, mm) = manager();
    let vm = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("VM");
    let mem = vm.vm().guest_memory();
    assert_eq!(mem.num_regions(), 1);
    assert_eq!(mem.last_addr(), GuestAddress(MEM - 1));
    let at = GuestAddress(data(40).gpa().0 + 24);
    let before = vm.fault_counts();

    mem.write_obj(0xfeed_f00d_u64, at).expect("write_obj");
    let second = mem.read_obj::<u64>(at).expect("read_obj");

    let after = vm.fault_counts();
    assert_eq!(second, 0xfeed_f00d);
    assert_eq!(
        (
            after.missing_write - before.missing_write,
            after.total() - before.total()
        ),
        (1, 1),
        "one MISSING write fault, and the read after it none"
    );
    // Past the end: the typed window error through the VMM's accessors, which check the
    // whole range first and touch nothing...
    assert!(matches!(
        vm.vm().read_u64(Gpa(MEM)),
        Err(VmError::Window(WindowError::OutOfRange { .. }))
    ));
    assert!(matches!(
        vm.vm().window().write_bytes(Gpa(MEM - 1), &[1, 2]),
        Err(WindowError::OutOfRange { .. })
    ));
    assert!(mem.read_obj::<u64>(GuestAddress(MEM)).is_err());
    assert_eq!(vm.fault_counts().total(), after.total());
    // ...and vm-memory's error through the traits; a straddling access is vm-memory's
    // partial access: the part inside RAM is read (faulting its page in) before it fails.
    assert!(mem.read_obj::<u64>(GuestAddress(MEM - 4)).is_err());
    assert_eq!(vm.fault_counts().missing_read - after.missing_read, 1);
    drop(mem);
    // The guest sees the host's word.
    let v = run(&vm, Command::new(Op::Checksum, data(40), 1, 0));
    assert_eq!(v.r0, 0xfeed_f00d);
}

#[test]
fn a_view_held_across_a_fork_on_its_thread_keeps_its_snapshot() {
    let Some(hv) = hypervisor() else { return };
    let (pool, mm) = manager();
    let parent = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), 64, 1));
    let swaps = parent.vm().window().swaps();
    let mem = parent.vm().guest_memory();
    let base = mem.host_base();

    // Moving the parent to a fresh window would wait for this thread's view for ever:
    // the fork detects it and write-protects the window in place instead.
    let (mut clones, _) = parent
        .fork(&hv, &ForkOptions::new(1))
        .expect("fork with a view held");
    let clone = clones.pop().expect("clone");
    assert_eq!(
        parent.vm().window().swaps(),
        swaps,
        "no swap under the view"
    );
    assert_eq!(parent.vm().window().host_base(), base);
    // A write through the view after the fork breaks copy-on-write: the parent sees it,
    // the clone keeps the snapshot.
    let at = data(10).gpa().0;
    let before = parent.fault_counts();
    mem.write_obj(0x1234_u64, GuestAddress(at))
        .expect("write after fork");
    assert_eq!(
        parent.fault_counts().write_protect - before.write_protect,
        1
    );
    drop(mem);
    assert_eq!(parent.vm().read_u64(Gpa(at)).expect("read"), 0x1234);
    assert_eq!(
        run(&clone, Command::new(Op::Verify, data(0), 64, 1)).mismatches(),
        0
    );
    assert_eq!(
        run(&parent, Command::new(Op::Verify, data(10), 1, 1)).mismatches(),
        1
    );
    drop(clone);
    drop(parent);
    assert_eq!(pool.free_frames(), pool.total_frames());
}

#[test]
fn a_fork_waits_for_a_view_on_another_thread_and_its_write_is_in_the_snapshot() {
    let Some(hv) = hypervisor() else { return };
    let (_pool, mm) = manager();
    let parent = ManagedVm::new(&hv, &VmConfig::new(MEM, 1), &mm).expect("parent");
    run(&parent, Command::new(Op::Fill, data(0), 64, 1));
    let swaps = parent.vm().window().swaps();
    let at = data(20).gpa().0 + 16;
    let (pinned_tx, pinned_rx) = mpsc::channel();
    let (forking_tx, forking_rx) = mpsc::channel::<()>();

    let clone = std::thread::scope(|s| {
        let viewer = &parent;
        s.spawn(move || {
            let mem = viewer.vm().guest_memory();
            pinned_tx.send(()).expect("signal");
            // Let the fork start and reach the swap (or not: the write is in the
            // snapshot either way, since the swap cannot happen before the view goes).
            forking_rx.recv().expect("fork started");
            std::thread::sleep(std::time::Duration::from_millis(50));
            mem.write_obj(0xabcd_u64, GuestAddress(at))
                .expect("write under the view");
        });
        pinned_rx.recv().expect("view taken");
        forking_tx.send(()).expect("signal");
        let (mut clones, _) = parent.fork(&hv, &ForkOptions::new(1)).expect("fork");
        clones.pop().expect("clone")
    });

    // The parent moved to a fresh window once the view was gone, and the write made
    // under the view landed before the snapshot: both VMs see it.
    assert_eq!(parent.vm().window().swaps(), swaps + 1);
    for vm in [&parent, &clone] {
        assert_eq!(vm.vm().read_u64(Gpa(at)).expect("read"), 0xabcd);
        assert_eq!(
            run(vm, Command::new(Op::Verify, data(20), 1, 1)).mismatches(),
            1
        );
    }
}
