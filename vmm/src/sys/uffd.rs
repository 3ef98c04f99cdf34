//! userfaultfd: one [`Uffd`] per guest RAM window, owning the fd and the API handshake.
//!
//! The `userfaultfd` crate needs libclang to build, so this is a small raw-ioctl layer:
//! the kernel ABI structs from `<linux/userfaultfd.h>`, the ioctls the VMM uses (register,
//! unregister, write-protect, wake, copy, zeropage, continue), and fault messages read as
//! a typed [`UffdEvent`]. Features are negotiated once: [`UFFD_FEATURE_WP_HUGETLBFS_SHMEM`]
//! is required (write-protecting memfd-backed guest pages); [`UFFD_FEATURE_WP_UNPOPULATED`],
//! [`UFFD_FEATURE_THREAD_ID`] and [`UFFD_FEATURE_MINOR_SHMEM`] (minor faults on memfd
//! pages whose host entry was dropped: NUMA hinting faults that say which thread touched
//! a page) are taken when the kernel has them.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref};
use vmm_sys_util::{ioctl_ior_nr, ioctl_iowr_nr};

/// Kernel ABI version of the userfaultfd API.
const UFFD_API: u64 = 0xAA;
const UFFDIO: u32 = 0xAA;

/// Fault messages carry write-protect faults (`UFFD_FEATURE_PAGEFAULT_FLAG_WP`).
pub const UFFD_FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Fault messages carry the faulting thread's id.
pub const UFFD_FEATURE_THREAD_ID: u64 = 1 << 8;
/// MINOR faults on shmem (memfd) mappings: an access to a page that is in its memfd but
/// has no host page-table entry (dropped by a harvest) faults to the handler.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// Write-protect works on shmem (memfd) and hugetlbfs mappings.
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protecting never-touched pages installs markers (cheap protect of fresh windows).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
const UFFDIO_COPY_MODE_WP: u64 = 1 << 1;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_copy`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}

/// `struct uffdio_zeropage`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioZeropage {
    range: UffdioRange,
    mode: u64,
    zeropage: i64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// `struct uffd_msg` (32 bytes); only the pagefault arm of its union is decoded.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdMsg {
    event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    /// pagefault.flags
    flags: u64,
    /// pagefault.address
    address: u64,
    /// pagefault.feat.ptid (u32) and padding
    ptid: u64,
}

const _: () = assert!(std::mem::size_of::<UffdMsg>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioApi>() == 24);
const _: () = assert!(std::mem::size_of::<UffdioRegister>() == 32);
const _: () = assert!(std::mem::size_of::<UffdioCopy>() == 40);
const _: () = assert!(std::mem::size_of::<UffdioContinue>() == 32);

/// The ioctl numbers (generated functions).
#[allow(missing_docs)]
mod nr {
    use super::*;
    ioctl_iowr_nr!(UFFDIO_API_IOCTL, UFFDIO, 0x3F, UffdioApi);
    ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
    ioctl_ior_nr!(UFFDIO_UNREGISTER, UFFDIO, 0x01, UffdioRange);
    ioctl_ior_nr!(UFFDIO_WAKE, UFFDIO, 0x02, UffdioRange);
    ioctl_iowr_nr!(UFFDIO_COPY, UFFDIO, 0x03, UffdioCopy);
    ioctl_iowr_nr!(UFFDIO_ZEROPAGE, UFFDIO, 0x04, UffdioZeropage);
    ioctl_iowr_nr!(UFFDIO_WRITEPROTECT, UFFDIO, 0x06, UffdioWriteprotect);
    ioctl_iowr_nr!(UFFDIO_CONTINUE, UFFDIO, 0x07, UffdioContinue);
}
use nr::*;

/// A userfaultfd call failed.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The `userfaultfd` syscall failed.
    #[error(
        "cannot open a userfaultfd: {0}; if this is EPERM, set `sysctl -w vm.unprivileged_userfaultfd=1` or run with CAP_SYS_PTRACE"
    )]
    Open(#[source] io::Error),
    /// The kernel lacks a feature the VMM needs.
    #[error(
        "the kernel's userfaultfd lacks required features {missing:#x} (it offers {offered:#x}); write-protecting memfd-backed guest memory needs Linux 5.19 or newer"
    )]
    MissingFeatures {
        /// Required feature bits the kernel did not offer.
        missing: u64,
        /// Feature bits the kernel offered.
        offered: u64,
    },
    /// An ioctl on the userfaultfd failed.
    #[error("{op} of {len:#x} bytes at host address {start:#x} failed: {source}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// Start of the host range.
        start: u64,
        /// Length of the host range.
        len: u64,
        /// The host error.
        #[source]
        source: io::Error,
    },
    /// Reading a fault message failed.
    #[error("reading a userfaultfd message failed: {0}")]
    Read(#[source] io::Error),
}

/// One message read from a userfaultfd.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    /// An access to a missing page (an anonymous hole, or an unpopulated shmem page).
    Missing {
        /// Host address of the access (page aligned).
        addr: u64,
        /// The access was a write.
        write: bool,
        /// Faulting thread id, when `UFFD_FEATURE_THREAD_ID` was negotiated (else 0).
        tid: u32,
    },
    /// A write to a write-protected page.
    WriteProtect {
        /// Host address of the access (page aligned).
        addr: u64,
        /// Faulting thread id, when `UFFD_FEATURE_THREAD_ID` was negotiated (else 0).
        tid: u32,
    },
    /// An access to a memfd page whose host entry was dropped, in a range registered
    /// with [`Uffd::register_minor`] (a hinting fault).
    Minor {
        /// Host address of the access (page aligned).
        addr: u64,
        /// The access was a write.
        write: bool,
        /// Faulting thread id, when `UFFD_FEATURE_THREAD_ID` was negotiated (else 0).
        tid: u32,
    },
    /// Another event this layer does not decode (none is requested).
    Other(u8),
}

impl UffdEvent {
    /// The faulting thread's id (0: not a fault, or the kernel gave none).
    pub fn tid(&self) -> u32 {
        match *self {
            UffdEvent::Missing { tid, .. }
            | UffdEvent::WriteProtect { tid, .. }
            | UffdEvent::Minor { tid, .. } => tid,
            UffdEvent::Other(_) => 0,
        }
    }
}

/// A userfaultfd with its negotiated features.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn open_raw() -> Result<OwnedFd, UffdError> {
    // SAFETY: the userfaultfd syscall takes only a flags argument and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
    if fd < 0 {
        return Err(UffdError::Open(io::Error::last_os_error()));
    }
    // SAFETY: `fd` is a freshly created fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

fn api(fd: &OwnedFd, features: u64) -> io::Result<u64> {
    let mut api = UffdioApi {
        api: UFFD_API,
        features,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which `api` is (repr(C),
    // size asserted above); the fd is a userfaultfd.
    let ret = unsafe { ioctl_with_mut_ref(fd, UFFDIO_API_IOCTL(), &mut api) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(api.features)
}

impl Uffd {
    /// Features the VMM cannot work without.
    pub const REQUIRED: u64 = UFFD_FEATURE_PAGEFAULT_FLAG_WP | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
    /// Features taken when offered.
    pub const OPTIONAL: u64 =
        UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_THREAD_ID | UFFD_FEATURE_MINOR_SHMEM;

    /// Opens a non-blocking userfaultfd and negotiates [`Self::REQUIRED`] plus whatever of
    /// [`Self::OPTIONAL`] the kernel offers.
    pub fn new() -> Result<Uffd, UffdError> {
        let offered = Self::offered()?;
        if offered & Self::REQUIRED != Self::REQUIRED {
            return Err(UffdError::MissingFeatures {
                missing: Self::REQUIRED & !offered,
                offered,
            });
        }
        let want = Self::REQUIRED | (Self::OPTIONAL & offered);
        let fd = open_raw()?;
        api(&fd, want).map_err(|source| UffdError::Ioctl {
            op: "UFFDIO_API",
            start: 0,
            len: 0,
            source,
        })?;
        Ok(Uffd { fd, features: want })
    }

    /// The features the kernel offers, asked once per process: the API handshake may be
    /// done once per fd, so a throwaway fd is asked, and closing a userfaultfd walks every
    /// mapping of the process (`userfaultfd_release`), which grows with the VMs it runs.
    fn offered() -> Result<u64, UffdError> {
        static OFFERED: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
        if let Some(&f) = OFFERED.get() {
            return Ok(f);
        }
        let probe = open_raw()?;
        let offered = api(&probe, 0).map_err(|source| UffdError::Ioctl {
            op: "UFFDIO_API",
            start: 0,
            len: 0,
            source,
        })?;
        drop(probe);
        Ok(*OFFERED.get_or_init(|| offered))
    }

    /// The negotiated feature bits.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Whether MINOR faults ([`Uffd::register_minor`]) and thread ids were negotiated:
    /// what hinting faults that name the touching thread need.
    pub fn has_minor_hints(&self) -> bool {
        let want = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_THREAD_ID;
        self.features & want == want
    }

    fn call<T>(
        &self,
        op: &'static str,
        req: libc::c_ulong,
        arg: &mut T,
        range: (u64, u64),
    ) -> Result<(), UffdError> {
        // SAFETY: every caller passes the ioctl number matching `T`'s kernel struct (see the
        // ioctl_*_nr! definitions above); the kernel only reads/writes that struct, and the
        // host ranges it acts on are checked by the kernel against this process's mappings.
        let ret = unsafe { ioctl_with_mut_ref(&self.fd, req, arg) };
        if ret < 0 {
            return Err(UffdError::Ioctl {
                op,
                start: range.0,
                len: range.1,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Registers `start .. start + len` for MISSING and WP faults. Every new mapping in a
    /// window needs this again: mmap drops the registration.
    pub fn register(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_WP,
            ioctls: 0,
        };
        self.call("UFFDIO_REGISTER", UFFDIO_REGISTER(), &mut reg, (start, len))
    }

    /// Registers a memfd mapping `start .. start + len` for MISSING, WP and MINOR faults:
    /// an access to a page whose host entry was dropped raises [`UffdEvent::Minor`],
    /// resolved with [`Uffd::continue_range`]. Needs [`Uffd::has_minor_hints`]; anonymous
    /// ranges cannot take MINOR (the kernel refuses).
    pub fn register_minor(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut reg = UffdioRegister {
            range: UffdioRange { start, len },
            mode: UFFDIO_REGISTER_MODE_MISSING
                | UFFDIO_REGISTER_MODE_WP
                | UFFDIO_REGISTER_MODE_MINOR,
            ioctls: 0,
        };
        self.call("UFFDIO_REGISTER", UFFDIO_REGISTER(), &mut reg, (start, len))
    }

    /// Maps the memfd pages of `start .. start + len` (a [`Uffd::register_minor`] range)
    /// again from their memfd and wakes the threads waiting on them; `write_protect`
    /// leaves them write-protected. Pages already mapped are left as they are (the kernel
    /// reports `EEXIST`, returned as `Ok(false)`).
    pub fn continue_range(
        &self,
        start: u64,
        len: u64,
        write_protect: bool,
    ) -> Result<bool, UffdError> {
        let mut c = UffdioContinue {
            range: UffdioRange { start, len },
            mode: if write_protect {
                UFFDIO_CONTINUE_MODE_WP
            } else {
                0
            },
            mapped: 0,
        };
        match self.call("UFFDIO_CONTINUE", UFFDIO_CONTINUE(), &mut c, (start, len)) {
            Err(UffdError::Ioctl { source, .. }) if source.raw_os_error() == Some(libc::EEXIST) => {
                Ok(false)
            }
            r => r.map(|()| true),
        }
    }

    /// Unregisters `start .. start + len` (wakes any thread waiting on it).
    pub fn unregister(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`, which `range` is.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_UNREGISTER(), &range) };
        if ret < 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_UNREGISTER",
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Write-protects (`protect = true`) or unprotects a registered range. Unprotecting
    /// wakes the threads waiting on a WP fault in the range.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> Result<(), UffdError> {
        let mut wp = UffdioWriteprotect {
            range: UffdioRange { start, len },
            mode: if protect {
                UFFDIO_WRITEPROTECT_MODE_WP
            } else {
                0
            },
        };
        self.call(
            "UFFDIO_WRITEPROTECT",
            UFFDIO_WRITEPROTECT(),
            &mut wp,
            (start, len),
        )
    }

    /// Wakes the threads waiting on a fault in `start .. start + len`.
    pub fn wake(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let range = UffdioRange { start, len };
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range` is.
        let ret = unsafe { ioctl_with_ref(&self.fd, UFFDIO_WAKE(), &range) };
        if ret < 0 {
            return Err(UffdError::Ioctl {
                op: "UFFDIO_WAKE",
                start,
                len,
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Atomically fills an anonymous hole `dst .. dst + len` with a copy of `src` and wakes
    /// (optionally leaving it write-protected).
    ///
    /// # Safety
    ///
    /// `src .. src + len` must be readable memory of this process, and `dst .. dst + len`
    /// a hole the caller owns (guest RAM): the copy makes bytes appear there.
    pub unsafe fn copy(
        &self,
        dst: u64,
        src: *const u8,
        len: u64,
        write_protect: bool,
    ) -> Result<(), UffdError> {
        let mut c = UffdioCopy {
            dst,
            src: src as u64,
            len,
            mode: if write_protect {
                UFFDIO_COPY_MODE_WP
            } else {
                0
            },
            copy: 0,
        };
        self.call("UFFDIO_COPY", UFFDIO_COPY(), &mut c, (dst, len))
    }

    /// Fills an anonymous hole with zero pages and wakes.
    pub fn zeropage(&self, start: u64, len: u64) -> Result<(), UffdError> {
        let mut z = UffdioZeropage {
            range: UffdioRange { start, len },
            mode: 0,
            zeropage: 0,
        };
        self.call("UFFDIO_ZEROPAGE", UFFDIO_ZEROPAGE(), &mut z, (start, len))
    }

    /// Reads one message; `Ok(None)` when none is pending (the fd is non-blocking: wait
    /// with `poll` on [`AsFd::as_fd`] first).
    pub fn read_event(&self) -> Result<Option<UffdEvent>, UffdError> {
        let mut msg = UffdMsg::default();
        // SAFETY: reads at most size_of::<UffdMsg>() bytes into `msg`, a plain repr(C) struct
        // every bit pattern of which is valid.
        let n = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                (&mut msg as *mut UffdMsg).cast(),
                std::mem::size_of::<UffdMsg>(),
            )
        };
        if n < 0 {
            let err = io::Error::last_os_error();
            return match err.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => Ok(None),
                _ => Err(UffdError::Read(err)),
            };
        }
        if n as usize != std::mem::size_of::<UffdMsg>() {
            return Err(UffdError::Read(io::Error::other(format!(
                "short userfaultfd read of {n} bytes"
            ))));
        }
        Ok(Some(decode(&msg)))
    }
}

fn decode(msg: &UffdMsg) -> UffdEvent {
    if msg.event != UFFD_EVENT_PAGEFAULT {
        return UffdEvent::Other(msg.event);
    }
    let addr = msg.address & !(crate::PAGE_SIZE_U64 - 1);
    let tid = msg.ptid as u32;
    let write = msg.flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
    if msg.flags & UFFD_PAGEFAULT_FLAG_WP != 0 {
        UffdEvent::WriteProtect { addr, tid }
    } else if msg.flags & UFFD_PAGEFAULT_FLAG_MINOR != 0 {
        UffdEvent::Minor { addr, write, tid }
    } else {
        UffdEvent::Missing { addr, write, tid }
    }
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_minor_fault_reports_a_hint_with_its_thread() {
        let msg = UffdMsg {
            event: UFFD_EVENT_PAGEFAULT,
            flags: UFFD_PAGEFAULT_FLAG_MINOR | UFFD_PAGEFAULT_FLAG_WRITE,
            address: 0x2000_0123,
            ptid: 42,
            ..Default::default()
        };
        let ev = decode(&msg);
        assert_eq!(
            ev,
            UffdEvent::Minor {
                addr: 0x2000_0000,
                write: true,
                tid: 42
            }
        );
        assert_eq!(ev.tid(), 42);
    }

    #[test]
    fn decode_wp_fault_reports_write_protect() {
        let msg = UffdMsg {
            event: UFFD_EVENT_PAGEFAULT,
            flags: UFFD_PAGEFAULT_FLAG_WP | UFFD_PAGEFAULT_FLAG_WRITE,
            address: 0x1234_5678,
            ptid: 7,
            ..Default::default()
        };
        assert_eq!(
            decode(&msg),
            UffdEvent::WriteProtect {
                addr: 0x1234_5000,
                tid: 7
            }
        );
    }

    #[test]
    fn decode_missing_read_fault_is_not_write() {
        let msg = UffdMsg {
            event: UFFD_EVENT_PAGEFAULT,
            address: 0x2000,
            ..Default::default()
        };
        assert_eq!(
            decode(&msg),
            UffdEvent::Missing {
                addr: 0x2000,
                write: false,
                tid: 0
            }
        );
    }

    #[test]
    fn new_negotiates_shmem_write_protect() {
        let uffd = Uffd::new().expect("userfaultfd with WP on shmem");
        assert_ne!(uffd.features() & UFFD_FEATURE_WP_HUGETLBFS_SHMEM, 0);
    }
}
