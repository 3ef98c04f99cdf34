//! A VM's fault-handler loop: reading its userfaultfd, resolving each fault as a thread
//! of the faulting vCPU's node, and containing a failure to the VM (its later faults
//! released, its vCPUs kicked).

use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use super::PAGE;
use crate::fault::{FaultError, FaultResolver, FaultStats, handle_event};
use crate::sys::uffd::{Uffd, UffdError, UffdEvent};
use crate::vcpu::VmLink;
use crate::window::Window;

pub(super) fn fault_loop(
    window: &Window,
    resolver: &dyn FaultResolver,
    stats: &FaultStats,
    link: &VmLink,
    stop: &OwnedFd,
    kick: &Mutex<Vec<libc::pthread_t>>,
    (home, per_vcpu): (guestmem::NodeId, bool),
) {
    let uffd = window.uffd().clone();
    let mut repeats = Repeats::default();
    let mut fds = [
        libc::pollfd {
            fd: uffd.as_fd().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // After a failure the VM is dead but threads may still fault on its RAM (vCPUs until
    // their next exit, the VMM writing the boot region): each later fault is let through
    // (`release`), so the thread reaches its failure check instead of hanging.
    let mut failed = false;
    loop {
        // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EINTR) {
                continue;
            }
            // Anything else will not go away by polling again: stop the VM, don't spin.
            tracing::error!("polling the guest's userfaultfd failed: {e}");
            fail(link, FaultError::Uffd(UffdError::Read(e)), kick);
            return;
        }
        if fds[1].revents != 0 {
            return;
        }
        // SeqCst: see VmLink::handlers_busy.
        link.handlers_busy.fetch_add(1, Ordering::SeqCst);
        loop {
            let ev = match uffd.read_event() {
                Ok(Some(ev)) => ev,
                Ok(None) => {
                    link.handlers_busy.fetch_sub(1, Ordering::SeqCst);
                    break;
                }
                Err(e) => {
                    tracing::error!("reading guest faults failed: {e}");
                    fail(link, FaultError::Uffd(e), kick);
                    link.handlers_busy.fetch_sub(1, Ordering::SeqCst);
                    return;
                }
            };
            // Another handler of the VM may have failed it.
            if failed || link.failure.lock().is_ok_and(|f| f.is_some()) {
                release(window, &uffd, ev);
                continue;
            }
            // A panic in the resolver (a bug, or a poisoned lock it refuses to use) fails
            // this VM only; the handler goes on letting its threads through.
            // The fault is resolved as a thread of the faulting vCPU's node (first touch
            // allocates there; a hinting fault records it), or of the VM's home for the
            // VMM's own threads. Without per-vCPU homes every fault is the home's (set
            // when the thread started).
            if per_vcpu {
                guestmem::set_home_node(link.node_of_thread(ev.tid()).unwrap_or(home));
            }
            let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                repeats
                    .check(ev)
                    .and_then(|()| handle_event(window, &uffd, resolver, stats, ev))
            }))
            .unwrap_or_else(|p| Err(FaultError::Panicked(panic_message(&p))));
            if let Err(e) = r {
                tracing::error!("guest fault failed: {e}");
                fail(link, e, kick);
                failed = true;
                release(window, &uffd, ev);
            }
        }
    }
}

/// The text of a panic payload.
fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| (*s).to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

/// Lets the access behind `ev` complete without the resolver (the VM has failed).
///
/// Never by removing write-protection: the page may be a frame other VMs share. A page
/// of the VM's *current* window is replaced by private anonymous memory outside
/// userfaultfd, so the access completes on memory no one else sees and the thread
/// reaches its failure check. An address outside the current window (a retired or fresh
/// range the userfaultfd still covers) is only woken, never mapped over: that range may
/// already be on its way back to the host, and its addresses reused by another mapping.
fn release(window: &Window, uffd: &Uffd, ev: UffdEvent) {
    if let UffdEvent::Missing { addr, .. }
    | UffdEvent::WriteProtect { addr, .. }
    | UffdEvent::Minor { addr, .. } = ev
    {
        let page = addr & !(PAGE - 1);
        let _ = window.release_page(page);
        let _ = uffd.wake(page, PAGE);
    }
}

/// Detects a fault that comes back forever: the resolver says the page is mapped but the
/// host still reports it missing (e.g. a frame whose memfd page was never populated).
#[derive(Debug, Default)]
struct Repeats {
    last: Option<UffdEvent>,
    count: u32,
}

impl Repeats {
    /// Consecutive identical faults tolerated (two vCPUs racing on one page repeat a few).
    const LIMIT: u32 = 10_000;

    fn check(&mut self, ev: UffdEvent) -> Result<(), FaultError> {
        if self.last == Some(ev) {
            self.count += 1;
            if self.count >= Self::LIMIT {
                return Err(FaultError::Repeating {
                    event: ev,
                    count: self.count,
                });
            }
        } else {
            self.last = Some(ev);
            self.count = 0;
        }
        Ok(())
    }
}

/// Records the VM's failure (the first reason wins) and kicks its vCPUs.
pub(super) fn fail(link: &VmLink, reason: FaultError, kick: &Mutex<Vec<libc::pthread_t>>) {
    link.failure
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get_or_insert_with(|| Arc::new(reason));
    let threads = kick.lock().unwrap_or_else(|e| e.into_inner());
    for &t in threads.iter() {
        // SAFETY: the list holds only live vCPU threads: Vm::drop empties it (under this
        // lock) before it ends them.
        unsafe { libc::pthread_kill(t, crate::vcpu::kick_signal()) };
    }
}
