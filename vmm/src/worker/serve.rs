//! The worker process: holds VMs whose memory the VMM's process manages.
//!
//! Three threads serve the VMM besides the VMs' own: the control loop (this process's
//! main thread: shells, host-MMU calls from reclaim and forks, state restore, commands),
//! the waiter (collects command results, one at a time) and the reaper (drops VMs, whose
//! threads take a while to join, off the control loop). Every VM's fault handlers resolve
//! through [`RemoteResolver`], which asks the VMM over the VM's own fault socket and, while
//! it waits, applies the host-MMU calls the VMM sends back on it.

use std::collections::HashMap;
use std::ops::Range;
use std::os::fd::{AsFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};

use guestmem::mmu::{HostMmu, HostMmuError, MapRun};
use guestmem::types::{Gfn, NodeId};

use super::wire::{self, Dec, Enc, MmuOp};
use super::{CONTROL_FD, WAIT_FD, ctl, fault_msg};
use crate::fault::{FaultError, FaultKind, FaultResolver};
use crate::sys::ipc::Seqpacket;
use crate::vcpu::VcpuError;
use crate::vm::{Hypervisor, Vm, VmConfig};
use crate::window::Window;

/// The node memfds the VMM passed at start.
#[derive(Debug, Default)]
struct Nodes(HashMap<NodeId, OwnedFd>);

/// Resolves a worker VM's faults in the VMM's process (see the module docs).
#[derive(Debug)]
struct RemoteResolver {
    sock: Mutex<(Seqpacket, Vec<u8>)>,
    window: Arc<Window>,
    nodes: Arc<Nodes>,
}

fn remote(what: impl std::fmt::Display) -> FaultError {
    FaultError::Remote {
        what: what.to_string(),
        host_limit: false,
    }
}

impl FaultResolver for RemoteResolver {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        self.resolve_run(gfn, kind).map(|_| ())
    }

    fn resolve_run(&self, gfn: Gfn, kind: FaultKind) -> Result<Range<Gfn>, FaultError> {
        let mut g = self.sock.lock().unwrap_or_else(|e| e.into_inner());
        let (sock, buf) = &mut *g;
        let node = guestmem::home_node();
        let msg =
            wire::put_kind(Enc::new(fault_msg::RESOLVE).u64(gfn.0), kind).u32(u32::from(node.0));
        sock.send(&msg.0, &[]).map_err(remote)?;
        let mut fds = Vec::new();
        loop {
            if !sock.recv(buf, &mut fds).map_err(remote)? {
                return Err(remote("the VMM's process closed the VM's fault socket"));
            }
            let (tag, mut d) = Dec::new(buf).map_err(remote)?;
            match tag {
                fault_msg::MMU => {
                    let op = MmuOp::get(&mut d).map_err(remote)?;
                    let reply = apply(&self.window, &self.nodes, op);
                    sock.send(&reply.0, &[]).map_err(remote)?;
                }
                fault_msg::RESOLVED => {
                    let (a, b) = (d.u64().map_err(remote)?, d.u64().map_err(remote)?);
                    return Ok(Gfn(a)..Gfn(b));
                }
                fault_msg::FAILED => {
                    let host_limit = d.u8().map_err(remote)? != 0;
                    let what = d.string().map_err(remote)?;
                    return Err(FaultError::Remote { what, host_limit });
                }
                _ => return Err(remote("an unknown message on the fault socket")),
            }
        }
    }
}

/// Applies a host-MMU call to `window`; the reply to send back.
fn apply(window: &Window, nodes: &Nodes, op: MmuOp) -> Enc {
    let mut words = Vec::new();
    let r: Result<bool, HostMmuError> = match op {
        MmuOp::Map {
            gfn,
            pages,
            node,
            pfn,
            file_offset,
            writable,
        } => match nodes.0.get(&node) {
            Some(fd) => window
                .map_run(MapRun {
                    gfn,
                    pages,
                    node,
                    pfn,
                    fd: fd.as_fd(),
                    file_offset,
                    writable,
                })
                .map(|()| true),
            None => Err(HostMmuError {
                op: "map_run",
                gfn,
                pages,
                source: std::io::Error::other(format!("the worker has no memfd of {node:?}")),
            }),
        },
        MmuOp::Unmap(g, p) => window.unmap_run(g, p).map(|()| true),
        MmuOp::Protect(g, p, w) => window.protect_run(g, p, w).map(|()| true),
        MmuOp::ProtectForFork(g, p) => window.protect_for_fork(g, p).map(|()| true),
        MmuOp::Revoke(g, p) => window.revoke(g, p).map(|()| true),
        MmuOp::Restore(g, p, w) => window.restore_run(g, p, w),
        MmuOp::Harvest(g, p) => HostMmu::harvest_accessed(window, g, p, &mut words),
    };
    match r {
        Ok(b) => {
            let mut e = Enc::new(ctl::OK).u8(u8::from(b)).u32(words.len() as u32);
            for w in words {
                e = e.u64(w);
            }
            e
        }
        Err(e) => Enc::new(ctl::ERR)
            .u32(e.source.raw_os_error().unwrap_or(0) as u32)
            .bytes(e.to_string().as_bytes()),
    }
}

/// The worker's VMs.
#[derive(Debug, Default)]
struct State {
    vms: Mutex<HashMap<u32, Arc<Vm>>>,
    /// Windows of VMs being dropped, kept until the VMM has revoked them.
    retired: Mutex<HashMap<u32, Arc<Window>>>,
    next: std::sync::atomic::AtomicU32,
    /// Fault injection: the next reply's send fails ([`ctl::FAIL_NEXT_REPLY`]).
    #[cfg(feature = "failpoints")]
    fail_next_reply: std::sync::atomic::AtomicBool,
}

impl State {
    fn vm(&self, id: u32) -> Option<Arc<Vm>> {
        self.vms
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&id)
            .cloned()
    }

    fn window(&self, id: u32) -> Option<Arc<Window>> {
        self.vm(id).map(|v| v.window().clone()).or_else(|| {
            self.retired
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&id)
                .cloned()
        })
    }
}

/// Runs the worker (this process was started by [`super::WorkerPool::spawn`]); returns
/// its exit status.
pub(super) fn run() -> i32 {
    crate::sys::ipc::ignore_interrupts();
    // SAFETY: the VMM started this process with its ends of the two socket pairs at
    // these descriptors (`WorkerPool::spawn`), and nothing else in it owns them.
    let (control, waits) = unsafe {
        (
            Seqpacket::from_fd(OwnedFd::from_raw_fd(CONTROL_FD)),
            Seqpacket::from_fd(OwnedFd::from_raw_fd(WAIT_FD)),
        )
    };
    let hv = match Hypervisor::new() {
        Ok(hv) => hv,
        Err(e) => {
            let _ = control.send(&Enc::new(ctl::ERR).bytes(e.to_string().as_bytes()).0, &[]);
            return 2;
        }
    };
    // Hello, then the node memfds.
    if control
        .send(&Enc::new(ctl::OK).u32(std::process::id()).0, &[])
        .is_err()
    {
        return 1;
    }
    let mut buf = Vec::with_capacity(256 << 10);
    let mut fds = Vec::new();
    if !control.recv(&mut buf, &mut fds).unwrap_or(false) {
        return 1;
    }
    let nodes = {
        let Ok((_, mut d)) = Dec::new(&buf) else {
            return 1;
        };
        let mut nodes = Nodes::default();
        for fd in fds.drain(..) {
            let Some(id) = d.u32().ok().and_then(|id| u16::try_from(id).ok()) else {
                return 1;
            };
            nodes.0.insert(NodeId(id), fd);
        }
        Arc::new(nodes)
    };
    let state = Arc::new(State::default());
    let (reap_tx, reap_rx) = std::sync::mpsc::channel::<Arc<Vm>>();
    let reaper = std::thread::Builder::new()
        .name("worker-reaper".into())
        .spawn(move || reap_rx.into_iter().for_each(drop));
    let waiter = {
        let state = state.clone();
        std::thread::Builder::new()
            .name("worker-waiter".into())
            .spawn(move || serve_waits(&waits, &state))
    };
    if reaper.is_err() || waiter.is_err() {
        return 1;
    }
    // Until the VMM is gone (its end closed or broken): so are this worker's VMs.
    while let Ok(true) = control.recv(&mut buf, &mut fds) {
        let (tag, (reply, out_fds)) = match Dec::new(&buf) {
            Ok((tag, d)) => (tag, serve_control(tag, d, &hv, &state, &nodes, &reap_tx)),
            Err(e) => (ctl::ERR, (err(e), Vec::new())),
        };
        let borrowed: Vec<_> = out_fds.iter().map(AsFd::as_fd).collect();
        let sent = if injected_send_failure(&state, tag) {
            Err(std::io::Error::from_raw_os_error(libc::ENOMEM))
        } else {
            control.send(&reply.0, &borrowed)
        };
        if let Err(e) = sent {
            // A VMM that is gone ends the worker. Otherwise a request whose effect the
            // VMM need not know (counts) or that is undone here (a shell batch) fails,
            // and the worker serves on; any other (a mapping call, a state load, a
            // command) ends it as before, or the VMM would misread what it holds (a
            // run reported unmapped that is still mapped here).
            if super::link::peer_gone(&e) || !matches!(tag, ctl::SHELLS | ctl::COUNTS) {
                break;
            }
            drop(borrowed);
            if tag == ctl::SHELLS {
                forget_shells(&reply.0, &state, &reap_tx);
            }
            drop(out_fds);
            let why = err(format!("the worker could not send its reply: {e}"));
            if control.send(&why.0, &[]).is_err() {
                break;
            }
        }
    }
    // Stop every VM at once, then let them go.
    let vms: Vec<_> = state
        .vms
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .drain()
        .map(|(_, v)| v)
        .collect();
    vms.iter().for_each(|v| v.stop());
    drop(vms);
    0
}

/// Whether the reply to a `tag` request is to fail to send (fault injection: only with
/// the `failpoints` feature, armed by `ctl::FAIL_NEXT_REPLY`).
fn injected_send_failure(state: &State, tag: u8) -> bool {
    #[cfg(feature = "failpoints")]
    {
        tag != ctl::FAIL_NEXT_REPLY
            && state
                .fail_next_reply
                .swap(false, std::sync::atomic::Ordering::Relaxed)
    }
    #[cfg(not(feature = "failpoints"))]
    {
        let _ = (state, tag);
        false
    }
}

/// A SHELLS reply that did not reach the VMM: its shells are known to no one, so they
/// go (on the reaper thread, like any dropped VM).
fn forget_shells(reply: &[u8], state: &State, reap: &std::sync::mpsc::Sender<Arc<Vm>>) {
    let Ok((ctl::OK, mut d)) = Dec::new(reply) else {
        return;
    };
    let Ok(n) = d.u32() else { return };
    let mut vms = state.vms.lock().unwrap_or_else(|e| e.into_inner());
    for _ in 0..n {
        let Ok(id) = d.u32() else { return };
        if let Some(vm) = vms.remove(&id) {
            vm.stop();
            let _ = reap.send(vm);
        }
    }
}

fn err(e: impl std::fmt::Display) -> Enc {
    Enc::new(ctl::ERR).bytes(e.to_string().as_bytes())
}

fn err_limit(e: &crate::vm::VmError) -> Enc {
    Enc::new(ctl::ERR)
        .bytes(e.to_string().as_bytes())
        .u8(u8::from(e.is_host_limit()))
}

fn serve_control(
    tag: u8,
    mut d: Dec<'_>,
    hv: &Hypervisor,
    state: &State,
    nodes: &Arc<Nodes>,
    reap: &std::sync::mpsc::Sender<Arc<Vm>>,
) -> (Enc, Vec<OwnedFd>) {
    let r = (|| -> Result<(Enc, Vec<OwnedFd>), Enc> {
        match tag {
            ctl::SHELLS => {
                let count = d.u32().map_err(err)?;
                let mem = d.u64().map_err(err)?;
                let vcpus = d.u32().map_err(err)?;
                let cpu = d.u64().map_err(err)?;
                let home = d.u32().map_err(err)?;
                let mut cfg = VmConfig::new(mem, vcpus);
                cfg.load_guest = false;
                cfg.cpu = (cpu != u64::MAX).then_some(cpu as usize);
                // The handlers resolve as threads of this node (first touch places there).
                cfg.home_node =
                    NodeId(u16::try_from(home).map_err(|_| err("node id out of range"))?);
                // Held here until the whole batch is made: on a failure the VMM knows none
                // of them, so none may stay.
                let mut made = Vec::new();
                let mut socks = Vec::new();
                for _ in 0..count.min(crate::sys::ipc::MAX_FDS as u32) {
                    let vm = Vm::shell(hv, &cfg).map_err(|e| err_limit(&e))?;
                    let (mine, theirs) = Seqpacket::pair().map_err(err)?;
                    vm.attach(Arc::new(RemoteResolver {
                        sock: Mutex::new((mine, Vec::with_capacity(64 << 10))),
                        window: vm.window().clone(),
                        nodes: nodes.clone(),
                    }))
                    .map_err(|e| err_limit(&e))?;
                    made.push(vm);
                    socks.push(theirs.into_fd());
                }
                let mut e = Enc::new(ctl::OK).u32(made.len() as u32);
                let mut vms = state.vms.lock().unwrap_or_else(|e| e.into_inner());
                for vm in made {
                    let id = state
                        .next
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    vms.insert(id, Arc::new(vm));
                    e = e.u32(id);
                }
                Ok((e, socks))
            }
            ctl::MMU => {
                let id = d.u32().map_err(err)?;
                let op = MmuOp::get(&mut d).map_err(err)?;
                match state.window(id) {
                    Some(w) => Ok((apply(&w, nodes, op), Vec::new())),
                    None => Err(Enc::new(ctl::GONE)),
                }
            }
            ctl::RESTORE => {
                let id = d.u32().map_err(err)?;
                let vm = state.vm(id).ok_or_else(|| Enc::new(ctl::GONE))?;
                let i = d.u32().map_err(err)?;
                let st = wire::get_state(&mut d).map_err(err)?;
                let v = vm
                    .vcpu(i as usize)
                    .ok_or_else(|| err(VcpuError::NoSuchVcpu(i)))?;
                v.restore_state(&st).map_err(err)?;
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            ctl::SUBMIT => {
                let id = d.u32().map_err(err)?;
                let i = d.u32().map_err(err)?;
                let cmd = wire::get_cmd(&mut d).map_err(err)?;
                let vm = state.vm(id).ok_or_else(|| Enc::new(ctl::GONE))?;
                let v = vm
                    .vcpu(i as usize)
                    .ok_or_else(|| err(VcpuError::NoSuchVcpu(i)))?;
                v.submit(cmd).map_err(err)?;
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            ctl::STOP => {
                let id = d.u32().map_err(err)?;
                if let Some(vm) = state.vm(id) {
                    vm.stop();
                }
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            ctl::DROP => {
                let id = d.u32().map_err(err)?;
                let vm = state
                    .vms
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                if let Some(vm) = vm {
                    vm.stop();
                    state
                        .retired
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(id, vm.window().clone());
                    let _ = reap.send(vm);
                }
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            ctl::FORGET => {
                let id = d.u32().map_err(err)?;
                state
                    .retired
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .remove(&id);
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            ctl::COUNTS => {
                let id = d.u32().map_err(err)?;
                let vm = state.vm(id).ok_or_else(|| Enc::new(ctl::GONE))?;
                let e = wire::put_counts(Enc::new(ctl::OK), &vm.fault_counts());
                Ok((
                    match vm.failure() {
                        Some(f) => e.u8(1).bytes(f.to_string().as_bytes()),
                        None => e.u8(0),
                    },
                    Vec::new(),
                ))
            }
            #[cfg(feature = "failpoints")]
            ctl::FAIL_NEXT_REPLY => {
                state
                    .fail_next_reply
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Ok((Enc::new(ctl::OK), Vec::new()))
            }
            _ => Err(err("unknown request")),
        }
    })();
    r.unwrap_or_else(|e| (e, Vec::new()))
}

/// The waiter: one `wait` at a time, each answered when its command ends.
fn serve_waits(sock: &Seqpacket, state: &State) {
    let mut buf = Vec::with_capacity(4096);
    let mut fds = Vec::new();
    while let Ok(true) = sock.recv(&mut buf, &mut fds) {
        let reply = (|| -> Result<Enc, Enc> {
            let (_, mut d) = Dec::new(&buf).map_err(err)?;
            let id = d.u32().map_err(err)?;
            let i = d.u32().map_err(err)?;
            let ms = d.u64().map_err(err)?;
            let vm = state.vm(id).ok_or_else(|| Enc::new(ctl::GONE))?;
            let v = vm
                .vcpu(i as usize)
                .ok_or_else(|| err(VcpuError::NoSuchVcpu(i)))?;
            let deadline = (ms != u64::MAX)
                .then(|| {
                    std::time::Instant::now().checked_add(std::time::Duration::from_millis(ms))
                })
                .flatten();
            match v.wait_deadline(deadline) {
                Ok(r) => Ok(wire::put_result(Enc::new(ctl::OK), r)),
                Err(VcpuError::Timeout(_)) => Err(Enc::new(ctl::TIMEOUT)),
                Err(e) => Err(err(e)),
            }
        })()
        .unwrap_or_else(|e| e);
        if let Err(e) = sock.send(&reply.0, &[]) {
            // A VMM that is gone ends this loop; else this wait fails (its result is
            // lost with the reply) and the next is served.
            let why = err(format!("the worker could not send its reply: {e}"));
            if super::link::peer_gone(&e) || sock.send(&why.0, &[]).is_err() {
                return;
            }
        }
    }
}
