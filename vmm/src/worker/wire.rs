//! The messages between the VMM and its workers, and their byte encoding: little-endian
//! integers in a fixed order per message, a tag byte first. Both ends are the same
//! binary, so a decode error is a bug or a dead peer, never a version mismatch.

use guestmem::types::{Gfn, NodeId, Pfn};
use kvm_bindings::{
    kvm_debugregs, kvm_fpu, kvm_mp_state, kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events,
    kvm_xcrs, kvm_xsave,
};

use crate::fault::{FaultCounts, FaultKind};
use crate::guest::{CmdResult, Command, Op};
use crate::vcpu::VcpuState;

/// A message that does not decode.
#[derive(Debug, thiserror::Error)]
#[error("malformed message from the peer process ({0})")]
pub struct WireError(pub &'static str);

/// Builds one message.
#[derive(Debug, Default)]
pub struct Enc(pub Vec<u8>);

impl Enc {
    /// A message starting with `tag`.
    pub fn new(tag: u8) -> Enc {
        Enc(vec![tag])
    }
    /// Appends a byte.
    pub fn u8(mut self, v: u8) -> Enc {
        self.0.push(v);
        self
    }
    /// Appends a u32.
    pub fn u32(mut self, v: u32) -> Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a u64.
    pub fn u64(mut self, v: u64) -> Enc {
        self.0.extend_from_slice(&v.to_le_bytes());
        self
    }
    /// Appends a length-prefixed byte string.
    pub fn bytes(mut self, b: &[u8]) -> Enc {
        self = self.u32(b.len() as u32);
        self.0.extend_from_slice(b);
        self
    }
    /// Appends a plain-old-data KVM structure by its bytes.
    fn pod<T: Pod>(self, v: &T) -> Enc {
        // SAFETY: `T: Pod` is a `repr(C)` KVM UAPI structure of integers and arrays
        // with no implicit padding (the kernel spells every gap as a named field, so
        // the layout is the same on 32- and 64-bit; the sizes are checked below): all
        // `size_of::<T>()` bytes behind `v` are initialised.
        let b = unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        };
        self.bytes(b)
    }
}

/// Reads one message.
#[derive(Debug)]
pub struct Dec<'a> {
    b: &'a [u8],
}

impl<'a> Dec<'a> {
    /// Reads `b`; returns the tag and the reader for the rest.
    pub fn new(b: &'a [u8]) -> Result<(u8, Dec<'a>), WireError> {
        match b.split_first() {
            Some((&tag, rest)) => Ok((tag, Dec { b: rest })),
            None => Err(WireError("empty message")),
        }
    }
    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.b.len() < n {
            return Err(WireError("message too short"));
        }
        let (h, t) = self.b.split_at(n);
        self.b = t;
        Ok(h)
    }
    /// A byte.
    pub fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }
    /// A u32.
    pub fn u32(&mut self) -> Result<u32, WireError> {
        let mut a = [0; 4];
        a.copy_from_slice(self.take(4)?);
        Ok(u32::from_le_bytes(a))
    }
    /// A u64.
    pub fn u64(&mut self) -> Result<u64, WireError> {
        let mut a = [0; 8];
        a.copy_from_slice(self.take(8)?);
        Ok(u64::from_le_bytes(a))
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self) -> Result<&'a [u8], WireError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    fn pod<T: Pod>(&mut self) -> Result<T, WireError> {
        let b = self.bytes()?;
        if b.len() != std::mem::size_of::<T>() {
            return Err(WireError("KVM structure of the wrong size"));
        }
        let mut v = T::default();
        // SAFETY: `v` is a `T` of exactly `b.len()` bytes, and every bit pattern is a
        // valid `T` (`Pod`: integers and arrays of integers).
        unsafe {
            std::ptr::copy_nonoverlapping(b.as_ptr(), (&mut v as *mut T).cast::<u8>(), b.len())
        };
        Ok(v)
    }
    /// A string.
    pub fn string(&mut self) -> Result<String, WireError> {
        Ok(String::from_utf8_lossy(self.bytes()?).into_owned())
    }
}

/// KVM structures that are integers and arrays of integers only.
trait Pod: Copy + Default {}

// The UAPI sizes: a binding that grew implicit padding would change one of them.
const _: () = {
    use std::mem::size_of;
    assert!(size_of::<kvm_regs>() == 144);
    assert!(size_of::<kvm_sregs>() == 312);
    assert!(size_of::<kvm_fpu>() == 416);
    assert!(size_of::<kvm_xcrs>() == 392);
    assert!(size_of::<kvm_msr_entry>() == 16);
    assert!(size_of::<kvm_vcpu_events>() == 64);
    assert!(size_of::<kvm_mp_state>() == 4);
    assert!(size_of::<kvm_debugregs>() == 128);
};
impl Pod for kvm_regs {}
impl Pod for kvm_sregs {}
impl Pod for kvm_fpu {}
impl Pod for kvm_xcrs {}
impl Pod for kvm_msr_entry {}
impl Pod for kvm_vcpu_events {}
impl Pod for kvm_mp_state {}
impl Pod for kvm_debugregs {}

/// A host-MMU call of guestmem's `HostMmu`, for a window in another process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuOp {
    /// `map_run` (the memfd is the worker's copy of `node`'s).
    Map {
        /// First guest page.
        gfn: Gfn,
        /// Pages.
        pages: u64,
        /// Node of the frames.
        node: NodeId,
        /// First frame.
        pfn: Pfn,
        /// Byte offset of `pfn` in the node's memfd.
        file_offset: u64,
        /// Writable.
        writable: bool,
    },
    /// `unmap_run`.
    Unmap(Gfn, u64),
    /// `protect_run`.
    Protect(Gfn, u64, bool),
    /// `protect_for_fork`.
    ProtectForFork(Gfn, u64),
    /// `revoke`.
    Revoke(Gfn, u64),
    /// `restore_run`.
    Restore(Gfn, u64, bool),
    /// `harvest_accessed`.
    Harvest(Gfn, u64),
}

impl MmuOp {
    /// The `HostMmu` method's name (for errors).
    pub fn name(self) -> &'static str {
        match self {
            MmuOp::Map { .. } => "map_run",
            MmuOp::Unmap(..) => "unmap_run",
            MmuOp::Protect(..) => "protect_run",
            MmuOp::ProtectForFork(..) => "protect_for_fork",
            MmuOp::Revoke(..) => "revoke",
            MmuOp::Restore(..) => "restore_run",
            MmuOp::Harvest(..) => "harvest_accessed",
        }
    }

    /// The run it acts on.
    pub fn run(self) -> (Gfn, u64) {
        match self {
            MmuOp::Map { gfn, pages, .. } => (gfn, pages),
            MmuOp::Unmap(g, p)
            | MmuOp::Protect(g, p, _)
            | MmuOp::ProtectForFork(g, p)
            | MmuOp::Revoke(g, p)
            | MmuOp::Restore(g, p, _)
            | MmuOp::Harvest(g, p) => (g, p),
        }
    }

    /// Appends the call to `e`.
    pub fn put(self, e: Enc) -> Enc {
        match self {
            MmuOp::Map {
                gfn,
                pages,
                node,
                pfn,
                file_offset,
                writable,
            } => e
                .u8(1)
                .u64(gfn.0)
                .u64(pages)
                .u32(u32::from(node.0))
                .u32(pfn.0)
                .u64(file_offset)
                .u8(u8::from(writable)),
            MmuOp::Unmap(g, p) => e.u8(2).u64(g.0).u64(p),
            MmuOp::Protect(g, p, w) => e.u8(3).u64(g.0).u64(p).u8(u8::from(w)),
            MmuOp::ProtectForFork(g, p) => e.u8(4).u64(g.0).u64(p),
            MmuOp::Revoke(g, p) => e.u8(5).u64(g.0).u64(p),
            MmuOp::Restore(g, p, w) => e.u8(6).u64(g.0).u64(p).u8(u8::from(w)),
            MmuOp::Harvest(g, p) => e.u8(7).u64(g.0).u64(p),
        }
    }

    /// Reads a call.
    pub fn get(d: &mut Dec<'_>) -> Result<MmuOp, WireError> {
        let op = d.u8()?;
        let gfn = Gfn(d.u64()?);
        let pages = d.u64()?;
        Ok(match op {
            1 => MmuOp::Map {
                gfn,
                pages,
                node: NodeId(
                    u16::try_from(d.u32()?).map_err(|_| WireError("node id out of range"))?,
                ),
                pfn: Pfn(d.u32()?),
                file_offset: d.u64()?,
                writable: d.u8()? != 0,
            },
            2 => MmuOp::Unmap(gfn, pages),
            3 => MmuOp::Protect(gfn, pages, d.u8()? != 0),
            4 => MmuOp::ProtectForFork(gfn, pages),
            5 => MmuOp::Revoke(gfn, pages),
            6 => MmuOp::Restore(gfn, pages, d.u8()? != 0),
            7 => MmuOp::Harvest(gfn, pages),
            _ => return Err(WireError("unknown host-MMU call")),
        })
    }
}

/// Encodes a fault kind.
pub fn put_kind(e: Enc, k: FaultKind) -> Enc {
    match k {
        FaultKind::Missing { write } => e.u8(1).u8(u8::from(write)),
        FaultKind::WriteProtect => e.u8(2).u8(0),
        FaultKind::Hint { write } => e.u8(3).u8(u8::from(write)),
    }
}

/// Decodes a fault kind.
pub fn get_kind(d: &mut Dec<'_>) -> Result<FaultKind, WireError> {
    let (k, w) = (d.u8()?, d.u8()? != 0);
    Ok(match k {
        1 => FaultKind::Missing { write: w },
        2 => FaultKind::WriteProtect,
        3 => FaultKind::Hint { write: w },
        _ => return Err(WireError("unknown fault kind")),
    })
}

fn op_of(v: u64) -> Result<Op, WireError> {
    Ok(match v {
        1 => Op::Fill,
        2 => Op::Verify,
        3 => Op::Touch,
        4 => Op::Random,
        5 => Op::Checksum,
        6 => Op::Crash,
        7 => Op::Dirty,
        _ => return Err(WireError("unknown guest command")),
    })
}

/// Encodes a guest command.
pub fn put_cmd(e: Enc, c: &Command) -> Enc {
    e.u64(c.op as u64)
        .u64(c.start.0)
        .u64(c.pages)
        .u64(c.seed)
        .u64(c.count)
}

/// Decodes a guest command.
pub fn get_cmd(d: &mut Dec<'_>) -> Result<Command, WireError> {
    Ok(Command {
        op: op_of(d.u64()?)?,
        start: Gfn(d.u64()?),
        pages: d.u64()?,
        seed: d.u64()?,
        count: d.u64()?,
    })
}

/// Encodes a command's result.
pub fn put_result(e: Enc, r: CmdResult) -> Enc {
    e.u64(r.r0).u64(r.r1)
}

/// Decodes a command's result.
pub fn get_result(d: &mut Dec<'_>) -> Result<CmdResult, WireError> {
    Ok(CmdResult {
        r0: d.u64()?,
        r1: d.u64()?,
    })
}

/// Encodes fault counts.
pub fn put_counts(e: Enc, c: &FaultCounts) -> Enc {
    e.u64(c.missing_read)
        .u64(c.missing_write)
        .u64(c.write_protect)
        .u64(c.hint)
        .u64(c.handler_ns)
        .u64(c.resolve_ns)
}

/// Decodes fault counts.
pub fn get_counts(d: &mut Dec<'_>) -> Result<FaultCounts, WireError> {
    Ok(FaultCounts {
        missing_read: d.u64()?,
        missing_write: d.u64()?,
        write_protect: d.u64()?,
        hint: d.u64()?,
        handler_ns: d.u64()?,
        resolve_ns: d.u64()?,
    })
}

/// Encodes a saved vCPU state.
pub fn put_state(mut e: Enc, s: &VcpuState) -> Enc {
    e = e
        .pod(&s.regs)
        .pod(&s.sregs)
        .pod(&s.fpu)
        .pod(&s.events)
        .pod(&s.mp_state)
        .pod(&s.debugregs);
    e = match &s.xsave {
        // SAFETY: as in `Enc::pod`: kvm_xsave is a repr(C) array of integers (4 KiB;
        // its flexible tail is empty in the fixed-size form the VMM saves).
        Some(x) => e.u8(1).bytes(unsafe {
            std::slice::from_raw_parts(
                (&**x as *const kvm_xsave).cast::<u8>(),
                std::mem::size_of::<kvm_xsave>(),
            )
        }),
        None => e.u8(0),
    };
    e = match &s.xcrs {
        Some(x) => e.u8(1).pod(x),
        None => e.u8(0),
    };
    e = e.u32(s.msrs.len() as u32);
    for m in &s.msrs {
        e = e.pod(m);
    }
    e = match &s.in_flight {
        Some(c) => put_cmd(e.u8(1), c),
        None => e.u8(0),
    };
    e.u8(u8::from(s.booted))
}

/// Decodes a saved vCPU state.
pub fn get_state(d: &mut Dec<'_>) -> Result<VcpuState, WireError> {
    let regs = d.pod()?;
    let sregs = d.pod()?;
    let fpu = d.pod()?;
    let events = d.pod()?;
    let mp_state = d.pod()?;
    let debugregs = d.pod()?;
    let xsave = match d.u8()? {
        0 => None,
        _ => {
            let b = d.bytes()?;
            if b.len() != std::mem::size_of::<kvm_xsave>() {
                return Err(WireError("XSAVE area of the wrong size"));
            }
            let mut x = kvm_xsave::default();
            // SAFETY: `x` is exactly `b.len()` bytes of integers.
            unsafe {
                std::ptr::copy_nonoverlapping(
                    b.as_ptr(),
                    (&mut x as *mut kvm_xsave).cast::<u8>(),
                    b.len(),
                )
            };
            Some(std::sync::Arc::new(x))
        }
    };
    let xcrs = match d.u8()? {
        0 => None,
        _ => Some(d.pod()?),
    };
    let n = d.u32()? as usize;
    let mut msrs = Vec::with_capacity(n.min(4096));
    for _ in 0..n {
        msrs.push(d.pod()?);
    }
    let in_flight = match d.u8()? {
        0 => None,
        _ => Some(get_cmd(d)?),
    };
    Ok(VcpuState {
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        msrs,
        events,
        mp_state,
        debugregs,
        in_flight,
        booted: d.u8()? != 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_mmu_calls_and_commands_come_back_as_they_went() {
        let ops = [
            MmuOp::Map {
                gfn: Gfn(5),
                pages: 7,
                node: NodeId(1),
                pfn: Pfn(99),
                file_offset: 99 * 4096,
                writable: false,
            },
            MmuOp::Unmap(Gfn(1), 2),
            MmuOp::Protect(Gfn(3), 4, true),
            MmuOp::ProtectForFork(Gfn(0), 9),
            MmuOp::Revoke(Gfn(0), 9),
            MmuOp::Restore(Gfn(8), 1, false),
            MmuOp::Harvest(Gfn(0), 512),
        ];
        for op in ops {
            let e = op.put(Enc::new(9));
            let (tag, mut d) = Dec::new(&e.0).expect("tag");
            assert_eq!(tag, 9);
            assert_eq!(MmuOp::get(&mut d).expect("decode"), op);
        }
        let c = Command::random(Gfn(300), 40, 7, 1000);
        let e = put_cmd(Enc::new(1), &c);
        let (_, mut d) = Dec::new(&e.0).expect("tag");
        assert_eq!(get_cmd(&mut d).expect("decode"), c);
        let (_, mut d) = Dec::new(&[1, 2]).expect("tag");
        assert!(get_cmd(&mut d).is_err(), "a short message must not decode");
    }
}
