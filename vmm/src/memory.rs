//! A VM's guest RAM as rust-vmm's `vm-memory` sees it: [`GuestRam`], a snapshot of the
//! [`Window`] that implements vm-memory's [`GuestMemoryBackend`] (and so `GuestMemory` and
//! [`Bytes<GuestAddress>`](vm_memory::Bytes)) over one region, [`RamRegion`], covering the
//! window's host range `[base, base + size)` at guest-physical 0.
//!
//! It exists so that the VMM's own host-side accesses ([`Window::read_u64`],
//! [`Window::write_bytes`], [`Window::write_u64s`], the boot-region loader) and any
//! rust-vmm consumer (`linux-loader`, virtio queues) go through one checked, volatile
//! implementation instead of hand-written pointer loops. vm-memory's own mmap backend is
//! not used: the window already owns its mapping, whose pages the memory manager maps and
//! unmaps behind vm-memory's back, so the region is a view of that range, not an owner.
//!
//! # The snapshot guard
//!
//! A fork may give the window a fresh host range (`Window::commit_fresh`). A `GuestRam`
//! holds the window's [`BaseGuard`] (a read guard on the base, [`Window::pin`]) for its
//! whole life, so every address it hands out (slices, host addresses) stays inside the
//! window's current range, and no access ever straddles a swap: a fork that would swap the
//! range waits until every view is gone (vm-memory's `GuestMemoryAtomic::memory()`
//! snapshot, with a lock instead of an `ArcSwap`, because the old range is unmapped once
//! the swap is done).
//!
//! # Rules
//!
//! - **Keep it short.** A fork of this VM on another thread waits for every view. Do not
//!   hold one while waiting for the VM's vCPUs (`Vm::run`, `Vcpu::wait`): the fork holds
//!   them while it waits for the view, and the view would wait for them.
//! - **Holding it across a fork on the same thread is detected, not a deadlock.** The
//!   swap would wait for the view for ever, so `Vm::rebirth` refuses with
//!   [`WindowError::PinnedByForkingThread`] and `ManagedVm::fork` falls back to
//!   write-protecting the window in place: the view stays valid, and a write through it
//!   after the fork faults copy-on-write like a guest write.
//! - **Not on the VM's fault-handler thread**, nor inside a `FaultResolver`: an access to
//!   a hole raises a userfaultfd fault (MISSING, or WP on a shared page) that blocks the
//!   calling thread until that handler resolves it, like a vCPU's access.
//! - A view is not `Send`: it is dropped on the thread that made it (the detection above
//!   counts per thread).
//! - vm-memory's trait methods keep vm-memory's contract: an access that runs past the end
//!   of guest RAM copies the part inside before it fails (`read` returns the count,
//!   `read_slice` fails with `PartialBuffer`). The checked accessors here
//!   ([`GuestRam::read_u64`], [`GuestRam::write_bytes`], [`GuestRam::write_u64s`]) check
//!   the whole range first and touch nothing when it is out of range.
//!
//! # Lock order
//!
//! A view holds `Window.base` for reading: under the VM's vCPU control mutex and above the
//! address space's mmap_lock (docs/ARCHITECTURE.md, "Locking"). The fault handler that
//! resolves a view's fault takes the mmap_lock and its own recursive read guard on the base,
//! which a waiting fork's writer does not block.

use std::iter;

use vm_memory::bitmap::BS;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion,
    GuestMemoryRegionBytes, GuestUsize, MemoryRegionAddress, VolatileMemory, VolatileSlice,
};

use guestmem::types::Gpa;

use crate::window::{BaseGuard, Window, WindowError};

/// Guest RAM of one VM pinned at its current host range: a vm-memory `GuestMemoryBackend`
/// of one region (see the module docs for its rules). Made by [`Window::guest_memory`].
#[derive(Debug)]
pub struct GuestRam<'a> {
    region: RamRegion,
    window: &'a Window,
    /// The snapshot guard: the window's base cannot change while it lives, so `region`
    /// stays the window's range and stays mapped (the window unmaps a range only after
    /// swapping it out, which needs the write lock, or when dropped, which the borrow of
    /// `window` rules out).
    _pin: BaseGuard<'a>,
}

/// The one region of a [`GuestRam`]: the window's host range at guest-physical 0. It only
/// exists inside a `GuestRam` and is only reached through a borrow of it, so the slices
/// and addresses it gives out cannot outlive the pin.
#[derive(Debug)]
pub struct RamRegion {
    /// Host address of guest-physical 0 (page aligned, pinned by the owning view).
    host: u64,
    /// Bytes of guest RAM.
    len: u64,
}

impl<'a> GuestRam<'a> {
    /// Pins `window` and views its current range.
    pub(crate) fn new(window: &'a Window) -> GuestRam<'a> {
        let pin = window.pin();
        GuestRam {
            region: RamRegion {
                host: pin.base(),
                len: window.size(),
            },
            window,
            _pin: pin,
        }
    }

    /// The window viewed.
    pub fn window(&self) -> &'a Window {
        self.window
    }

    /// Host address of guest-physical 0, stable while the view lives.
    pub fn host_base(&self) -> u64 {
        self.region.host
    }

    /// Bytes of guest RAM.
    pub fn size(&self) -> u64 {
        self.region.len
    }

    /// `gpa .. gpa + len` as a vm-memory address, if inside guest RAM.
    fn check(&self, what: &'static str, gpa: Gpa, len: u64) -> Result<GuestAddress, WindowError> {
        match gpa.0.checked_add(len) {
            Some(end) if end <= self.region.len => Ok(GuestAddress(gpa.0)),
            _ => Err(WindowError::OutOfRange {
                what,
                gpa,
                len,
                size: self.region.len,
            }),
        }
    }

    /// Reads the 8-byte word at `gpa` rounded down to 8 (one aligned 8-byte load, as a
    /// vCPU would see it). A hole faults on the calling thread, resolved by the VM's
    /// fault handler.
    pub fn read_u64(&self, gpa: Gpa) -> Result<u64, WindowError> {
        let at = self.check("read", Gpa(gpa.0 & !7), 8)?;
        // Relaxed: a plain word read; ordering with the guest comes from the vCPU protocol
        // (a command's results are read after its doorbell exit).
        self.load::<u64>(at, std::sync::atomic::Ordering::Relaxed)
            .map_err(|source| access_err("read", at, 8, source))
    }

    /// Writes `bytes` at `gpa` (vm-memory's volatile copy; any alignment).
    pub fn write_bytes(&self, gpa: Gpa, bytes: &[u8]) -> Result<(), WindowError> {
        let len = bytes.len() as u64;
        let at = self.check("write", gpa, len)?;
        if bytes.is_empty() {
            return Ok(());
        }
        self.write_slice(bytes, at)
            .map_err(|source| access_err("write", at, len, source))
    }

    /// Writes the 8-byte words `words` starting at `gpa` rounded down to 8, one aligned
    /// 8-byte store each.
    pub fn write_u64s(&self, gpa: Gpa, words: &[u64]) -> Result<(), WindowError> {
        let len = (words.len() as u64).saturating_mul(8);
        let at = self.check("write", Gpa(gpa.0 & !7), len)?;
        if words.is_empty() {
            return Ok(());
        }
        let err = |source| access_err("write", at, len, source);
        let slice = self.get_slice(at, len as usize).map_err(err)?;
        let words_ref = slice
            .get_array_ref::<u64>(0, words.len())
            .map_err(|e| err(e.into()))?;
        words_ref.copy_from(words);
        Ok(())
    }
}

fn access_err(
    what: &'static str,
    at: GuestAddress,
    len: u64,
    source: GuestMemoryError,
) -> WindowError {
    WindowError::Access {
        what,
        gpa: Gpa(at.raw_value()),
        len,
        source,
    }
}

impl GuestMemoryRegion for RamRegion {
    /// No dirty bitmap: the memory manager tracks dirtiness in its page tables.
    type B = ();

    fn len(&self) -> GuestUsize {
        self.len
    }

    fn start_addr(&self) -> GuestAddress {
        GuestAddress(0)
    }

    fn bitmap(&self) -> BS<'_, Self::B> {}

    fn get_host_address(&self, addr: MemoryRegionAddress) -> Result<*mut u8, GuestMemoryError> {
        self.check_address(addr)
            .map(|a| (self.host + a.raw_value()) as *mut u8)
            .ok_or(GuestMemoryError::InvalidBackendAddress)
    }

    fn get_slice(
        &self,
        offset: MemoryRegionAddress,
        count: usize,
    ) -> Result<VolatileSlice<'_, BS<'_, Self::B>>, GuestMemoryError> {
        match offset.raw_value().checked_add(count as u64) {
            Some(end) if end <= self.len => {}
            _ => return Err(GuestMemoryError::InvalidBackendAddress),
        }
        // SAFETY: `offset .. offset + count` is inside the region (checked above), which is
        // the window's current host range: mapped (frames or userfaultfd-registered holes)
        // for as long as the window's base is pinned, and the owning `GuestRam` holds that
        // pin for at least the slice's lifetime (the slice borrows the region, which only
        // exists inside the view). Every other user of guest RAM (vCPUs, the memory
        // manager's direct map, other views) accesses it through raw pointers or volatile
        // copies: no Rust reference points into it.
        Ok(unsafe { VolatileSlice::new((self.host + offset.raw_value()) as *mut u8, count) })
    }

    #[cfg(target_os = "linux")]
    fn is_hugetlbfs(&self) -> Option<bool> {
        // Node memfds and anonymous holes: never hugetlbfs.
        Some(false)
    }
}

/// vm-memory's default `Bytes<MemoryRegionAddress>` over [`RamRegion::get_slice`]: the
/// region is plain RAM with no special access rules.
impl GuestMemoryRegionBytes for RamRegion {}

impl GuestMemoryBackend for GuestRam<'_> {
    type R = RamRegion;

    fn num_regions(&self) -> usize {
        1
    }

    fn find_region(&self, addr: GuestAddress) -> Option<&RamRegion> {
        (addr.raw_value() < self.region.len).then_some(&self.region)
    }

    fn iter(&self) -> impl Iterator<Item = &RamRegion> {
        iter::once(&self.region)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{GuestMemory, Permissions};

    use super::*;
    use crate::sys::mman;
    use crate::sys::uffd::Uffd;

    const SIZE: u64 = 64 << 10;

    /// A window backed by a memfd, userfaultfd unregistered: accesses need no fault
    /// handler.
    fn window() -> (Window, std::os::fd::OwnedFd) {
        let w = Window::new(Arc::new(Uffd::new().expect("userfaultfd")), SIZE).expect("window");
        let fd = mman::memfd("guest-ram-test", SIZE).expect("memfd");
        use std::os::fd::AsFd;
        w.map_host_backed(fd.as_fd(), false).expect("back window");
        (w, fd)
    }

    #[test]
    fn view_is_one_region_at_zero_over_the_window() {
        let (w, _fd) = window();
        let mem = w.guest_memory();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(mem.last_addr(), GuestAddress(SIZE - 1));
        assert_eq!(mem.host_base(), w.host_base());
        assert!(mem.address_in_range(GuestAddress(SIZE - 1)));
        assert!(!mem.address_in_range(GuestAddress(SIZE)));
        assert!(GuestMemory::check_range(
            &mem,
            GuestAddress(0),
            SIZE as usize,
            Permissions::ReadWrite
        ));
        assert_eq!(
            mem.get_host_address(GuestAddress(0x1000))
                .expect("host address") as u64,
            w.host_base() + 0x1000
        );
    }

    #[test]
    fn bytes_written_through_the_view_read_back_through_the_accessors() {
        let (w, _fd) = window();
        let mem = w.guest_memory();
        mem.write_obj(0x1122_3344_5566_7788u64, GuestAddress(0x2000))
            .expect("write_obj");
        // Unaligned bytes across a page boundary.
        mem.write_slice(&[1, 2, 3, 4, 5], GuestAddress(0x2ffe))
            .expect("write_slice");
        drop(mem);
        assert_eq!(
            w.read_u64(Gpa(0x2000)).expect("read"),
            0x1122_3344_5566_7788
        );
        // read_u64 rounds down to the word.
        assert_eq!(
            w.read_u64(Gpa(0x2005)).expect("read"),
            0x1122_3344_5566_7788
        );
        let mut buf = [0u8; 5];
        w.guest_memory()
            .read_slice(&mut buf, GuestAddress(0x2ffe))
            .expect("read_slice");
        assert_eq!(buf, [1, 2, 3, 4, 5]);
    }

    #[test]
    fn word_writes_round_down_and_byte_writes_keep_their_address() {
        let (w, _fd) = window();
        w.write_u64s(Gpa(0x3003), &[7, 8]).expect("write words");
        assert_eq!(w.read_u64(Gpa(0x3000)).expect("read"), 7);
        assert_eq!(w.read_u64(Gpa(0x3008)).expect("read"), 8);
        w.write_bytes(Gpa(0x3001), &[0xaa]).expect("write byte");
        assert_eq!(w.read_u64(Gpa(0x3000)).expect("read"), 7 | 0xaa00);
        // Empty writes are checked but do nothing, up to the very end.
        w.write_bytes(Gpa(SIZE), &[])
            .expect("empty write at the end");
        w.write_u64s(Gpa(SIZE), &[])
            .expect("empty word write at the end");
    }

    #[test]
    fn accesses_past_the_end_are_out_of_range_errors() {
        let (w, _fd) = window();
        assert!(matches!(
            w.read_u64(Gpa(SIZE)),
            Err(WindowError::OutOfRange { what: "read", .. })
        ));
        assert!(matches!(
            w.write_bytes(Gpa(SIZE - 2), &[0; 3]),
            Err(WindowError::OutOfRange { what: "write", .. })
        ));
        assert!(matches!(
            w.write_u64s(Gpa(SIZE - 8), &[0, 0]),
            Err(WindowError::OutOfRange { .. })
        ));
        assert!(matches!(
            w.write_bytes(Gpa(u64::MAX), &[0]),
            Err(WindowError::OutOfRange { .. })
        ));
        // vm-memory's own checks refuse the same through the traits.
        let mem = w.guest_memory();
        assert!(mem.read_obj::<u64>(GuestAddress(SIZE - 4)).is_err());
        assert!(mem.write_slice(&[0; 2], GuestAddress(SIZE)).is_err());
        assert!(mem.get_slice(GuestAddress(SIZE - 1), 2).is_err());
        assert!(
            mem.find_region(GuestAddress(0))
                .expect("region")
                .get_slice(MemoryRegionAddress(1), SIZE as usize)
                .is_err()
        );
    }

    #[test]
    fn a_view_pins_the_base_for_its_life_on_its_thread() {
        let (w, _fd) = window();
        assert!(!w.pinned_here());
        let mem = w.guest_memory();
        assert!(w.pinned_here());
        assert!(w.base_is_pinned(), "a swap must wait for the view");
        // Another thread holds no pin of its own.
        std::thread::scope(|s| {
            s.spawn(|| assert!(!w.pinned_here()));
        });
        // Nested pins (an accessor under a view) count separately.
        assert_eq!(w.read_u64(Gpa(0)).expect("read"), 0);
        assert!(w.pinned_here());
        drop(mem);
        assert!(!w.pinned_here());
        assert!(!w.base_is_pinned());
    }
}
