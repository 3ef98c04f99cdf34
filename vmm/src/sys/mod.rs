//! The thin typed layer over the host calls the VMM makes outside KVM: userfaultfd
//! ([`uffd`]), the mmap/memfd calls behind guest RAM windows ([`mman`]), the pagemap scan
//! and page-table zap behind guest access harvesting ([`pagemap`]) and the file-mode
//! creation mask for the control socket ([`umask`]).
//!
//! Everything above this module works with typed values and `Result`s; every raw syscall
//! and its `// SAFETY:` argument lives here (KVM's own ioctls go through kvm-ioctls).

pub mod ipc;
pub mod mman;
pub mod pagemap;
pub mod uffd;
pub mod umask;
