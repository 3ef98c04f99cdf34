//! The built-in test guest: a small x86-64 program the VMM writes into guest memory, run
//! in ring 3 (user CS/SS, U bit in its page tables, RFLAGS.IOPL=3 for port I/O) because
//! ring-0 guest code is emulated, and very slow, on software KVM hosts. It never needs an
//! interrupt, a stack or an IDT.
//!
//! # Memory layout (guest-physical, identity-mapped with 2 MiB pages, U=1, A/D preset)
//!
//! | gpa | contents |
//! |---|---|
//! | `0x0000` | zero (populated: the host reads it when a vCPU first enters) |
//! | `0x1000` | GDT: null, kernel code 0x08, kernel data 0x10, user code 0x1b, user data 0x23 |
//! | `0x2000` | PML4 |
//! | `0x3000` | PDPT |
//! | `0x4000 ..` | page directories, one per GiB of RAM ([`MAX_RAM`] at most) |
//! | [`CODE_GPA`] | the program ([`program`]) |
//! | [`DATA_START`] `..` | free for workloads |
//!
//! The boot region `0 .. DATA_START` is populated by the VMM before the first vCPU runs;
//! everything above is faulted in on first touch. Accessed and dirty bits are preset in
//! every page-table entry so that no page walk writes guest memory (the page tables stay
//! shareable copy-on-write without faulting).
//!
//! # Port protocol
//!
//! Commands travel in registers, not a mailbox page, so the VMM never writes guest RAM
//! after boot: a command costs no fault and a forked child does not copy a mailbox.
//!
//! 1. The guest executes `out DOORBELL_PORT (0x10), al`: "previous command done, give me
//!    the next". Its results are in `rax` (result 0) and `rbx` (result 1).
//! 2. The VMM reads them (KVM_GET_REGS), writes the next command into `rdi` (opcode, [`Op`]),
//!    `rsi` (start gpa), `rdx` (end gpa, exclusive), `rcx` (seed), `r8` (count)
//!    (KVM_SET_REGS) and resumes. Start and end are page aligned.
//! 3. The guest runs the command and goes back to 1.
//!
//! An unknown opcode makes the guest `out ERROR_PORT (0x11), al` with the opcode in `rdi`.
//!
//! | op | command | result 0 (`rax`) | result 1 (`rbx`) |
//! |---|---|---|---|
//! | 1 | fill every word with `pattern(seed, gpa)` | 0 | 0 |
//! | 2 | verify every word against `pattern(seed, gpa)` | mismatched words | first bad gpa or `u64::MAX` |
//! | 3 | touch: read the first word of each page | wrapping sum of the words | pages |
//! | 4 | `count` random accesses from xorshift64 (`seed | 1`) | wrapping sum of words read | writes |
//! | 5 | checksum: wrapping sum of every word | the sum | words |
//! | 6 | crash: `ud2` (no IDT: triple fault) | - | - |
//! | 7 | write one word per page: `pattern(seed, gpa)` at each page's start | 0 | pages |
//!
//! Random access `i`: `x = xorshift64(x)`; page `((x >> 32) * pages) >> 32`, word offset
//! `x & 0xff8`; a write (storing `pattern(seed, gpa)`) when `x & 1`, else a read. The
//! Rust twins [`pattern`] and [`random_accesses`] compute the same so tests can check the
//! guest independently.

use guestmem::types::{Gfn, Gpa, PAGE_SIZE};

use crate::asm::{Alu, Asm, Cond, Reg};

/// The guest asks for its next command here.
pub const DOORBELL_PORT: u16 = 0x10;
/// The guest reports an unknown opcode here.
pub const ERROR_PORT: u16 = 0x11;
/// GDT.
pub const GDT_GPA: u64 = 0x1000;
/// PML4.
pub const PML4_GPA: u64 = 0x2000;
/// PDPT.
pub const PDPT_GPA: u64 = 0x3000;
/// First page directory.
pub const PD_GPA: u64 = 0x4000;
/// Largest guest RAM the boot page tables map.
pub const MAX_RAM: u64 = 64 << 30;
/// Where the program lives.
pub const CODE_GPA: u64 = 0x8_0000;
/// First gpa workloads may use; below is the boot region.
pub const DATA_START: u64 = 0x10_0000;
/// User code selector (GDT index 3, RPL 3).
pub const USER_CS: u16 = 0x1b;
/// User data selector (GDT index 4, RPL 3).
pub const USER_DS: u16 = 0x23;

const K: u64 = 0x9E37_79B9_7F4A_7C15;
const _: () = assert!(PD_GPA + (MAX_RAM >> 30) * PAGE <= CODE_GPA);
const PAGE: u64 = PAGE_SIZE as u64;

/// Command opcodes (`rdi` at the doorbell).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[repr(u64)]
pub enum Op {
    /// Fill with the pattern.
    Fill = 1,
    /// Verify the pattern.
    Verify = 2,
    /// Read one word per page.
    Touch = 3,
    /// Seeded random reads and writes.
    Random = 4,
    /// Sum every word.
    Checksum = 5,
    /// Execute `ud2`.
    Crash = 6,
    /// Write one word per page.
    Dirty = 7,
}

/// One guest command: an operation over guest pages `start .. start + pages`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Command {
    /// What to do.
    pub op: Op,
    /// First page.
    pub start: Gfn,
    /// Pages.
    pub pages: u64,
    /// Pattern / generator seed.
    pub seed: u64,
    /// Accesses, for [`Op::Random`].
    pub count: u64,
}

impl Command {
    /// A command with `count = 0`.
    pub fn new(op: Op, start: Gfn, pages: u64, seed: u64) -> Command {
        Command {
            op,
            start,
            pages,
            seed,
            count: 0,
        }
    }

    /// `count` random accesses over the range.
    pub fn random(start: Gfn, pages: u64, seed: u64, count: u64) -> Command {
        Command {
            op: Op::Random,
            start,
            pages,
            seed,
            count,
        }
    }

    /// End gpa (exclusive).
    pub fn end(&self) -> Gpa {
        Gfn(self.start.0 + self.pages).gpa()
    }
}

/// What a command returned (see the table in the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct CmdResult {
    /// `rax`.
    pub r0: u64,
    /// `rbx`.
    pub r1: u64,
}

impl CmdResult {
    /// For [`Op::Verify`]: words that did not match.
    pub fn mismatches(&self) -> u64 {
        self.r0
    }

    /// For [`Op::Verify`]: the first bad gpa.
    pub fn first_bad(&self) -> Option<Gpa> {
        (self.r1 != u64::MAX).then_some(Gpa(self.r1))
    }
}

/// The word the guest stores at `gpa` for `seed`.
pub fn pattern(seed: u64, gpa: u64) -> u64 {
    let x = (gpa ^ seed).wrapping_mul(K);
    x ^ (x >> 29)
}

/// One random access of [`Op::Random`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    /// The word's gpa.
    pub gpa: u64,
    /// Write (else read).
    pub write: bool,
}

/// The accesses [`Op::Random`] makes for `cmd`, in order.
pub fn random_accesses(cmd: &Command) -> impl Iterator<Item = Access> + '_ {
    let mut x = cmd.seed | 1;
    let base = cmd.start.gpa().0;
    (0..cmd.count).map(move |_| {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let page = ((x >> 32).wrapping_mul(cmd.pages)) >> 32;
        Access {
            gpa: base + page * PAGE + (x & 0xff8),
            write: x & 1 != 0,
        }
    })
}

/// Emits `dst = pattern(rcx, addr)`, clobbering r11; r12 must hold `K`.
fn emit_pattern(a: &mut Asm, dst: Reg, addr: Reg) {
    a.mov(dst, addr);
    a.alu(Alu::Xor, dst, Reg::RCX);
    a.imul(dst, Reg::R12);
    a.mov(Reg::R11, dst);
    a.shr(Reg::R11, 29);
    a.alu(Alu::Xor, dst, Reg::R11);
}

/// The guest program (position independent; entry at offset 0).
pub fn program() -> Vec<u8> {
    const RAX: Reg = Reg::RAX;
    const RBX: Reg = Reg::RBX;
    const RCX: Reg = Reg::RCX;
    const RDX: Reg = Reg::RDX;
    const RSI: Reg = Reg::RSI;
    const RDI: Reg = Reg::RDI;
    const R8: Reg = Reg::R8;
    const R9: Reg = Reg::R9;
    const R10: Reg = Reg::R10;
    const R12: Reg = Reg::R12;
    const R13: Reg = Reg::R13;
    const R14: Reg = Reg::R14;
    const R15: Reg = Reg::R15;
    let mut a = Asm::new();
    a.mov_imm(R12, K);
    a.alu(Alu::Xor, RAX, RAX);
    a.alu(Alu::Xor, RBX, RBX);
    let doorbell = a.here();
    a.out(DOORBELL_PORT as u8);
    let ops = [
        (Op::Fill, a.label()),
        (Op::Verify, a.label()),
        (Op::Touch, a.label()),
        (Op::Random, a.label()),
        (Op::Checksum, a.label()),
        (Op::Crash, a.label()),
        (Op::Dirty, a.label()),
    ];
    for &(op, l) in &ops {
        a.alu_imm(Alu::Cmp, RDI, op as i32);
        a.jcc(Cond::E, l);
    }
    a.out(ERROR_PORT as u8);
    a.jmp(doorbell);

    for &(op, l) in &ops {
        a.bind(l);
        a.alu(Alu::Xor, RAX, RAX);
        a.alu(Alu::Xor, RBX, RBX);
        a.mov(R13, RSI);
        match op {
            Op::Fill => {
                let top = a.here();
                a.alu(Alu::Cmp, R13, RDX);
                a.jcc(Cond::Ae, doorbell);
                emit_pattern(&mut a, R10, R13);
                a.store(R13, R10);
                a.alu_imm(Alu::Add, R13, 8);
                a.jmp(top);
            }
            Op::Verify => {
                a.alu_imm(Alu::Sub, RBX, 1); // rbx = u64::MAX
                let top = a.here();
                let ok = a.label();
                a.alu(Alu::Cmp, R13, RDX);
                a.jcc(Cond::Ae, doorbell);
                emit_pattern(&mut a, R10, R13);
                a.cmp_load(R10, R13);
                a.jcc(Cond::E, ok);
                a.inc(RAX);
                a.alu_imm(Alu::Cmp, RBX, -1);
                a.jcc(Cond::Ne, ok);
                a.mov(RBX, R13);
                a.bind(ok);
                a.alu_imm(Alu::Add, R13, 8);
                a.jmp(top);
            }
            Op::Touch | Op::Checksum | Op::Dirty => {
                let step = if op == Op::Checksum { 8 } else { PAGE as i32 };
                let top = a.here();
                a.alu(Alu::Cmp, R13, RDX);
                a.jcc(Cond::Ae, doorbell);
                if op == Op::Dirty {
                    emit_pattern(&mut a, R10, R13);
                    a.store(R13, R10);
                } else {
                    a.add_load(RAX, R13);
                }
                a.inc(RBX);
                a.alu_imm(Alu::Add, R13, step);
                a.jmp(top);
            }
            Op::Random => {
                a.mov(R15, RCX);
                a.alu_imm(Alu::Or, R15, 1);
                a.mov(R14, RDX);
                a.alu(Alu::Sub, R14, RSI);
                a.shr(R14, 12); // pages
                a.mov(R9, R8);
                let top = a.here();
                let read = a.label();
                let next = a.label();
                a.test(R9, R9);
                a.jcc(Cond::E, doorbell);
                for (left, n) in [(true, 13), (false, 7), (true, 17)] {
                    a.mov(R10, R15);
                    if left {
                        a.shl(R10, n)
                    } else {
                        a.shr(R10, n)
                    }
                    a.alu(Alu::Xor, R15, R10);
                }
                a.mov(R13, R15);
                a.shr(R13, 32);
                a.imul(R13, R14);
                a.shr(R13, 32);
                a.shl(R13, 12);
                a.alu(Alu::Add, R13, RSI);
                a.mov(R10, R15);
                a.alu_imm(Alu::And, R10, 0xff8);
                a.alu(Alu::Add, R13, R10);
                a.test_imm(R15, 1);
                a.jcc(Cond::E, read);
                emit_pattern(&mut a, R10, R13);
                a.store(R13, R10);
                a.inc(RBX);
                a.jmp(next);
                a.bind(read);
                a.add_load(RAX, R13);
                a.bind(next);
                a.dec(R9);
                a.jmp(top);
            }
            Op::Crash => {
                a.ud2();
                a.hlt();
            }
        }
    }
    a.finish().unwrap_or_default()
}

/// The GDT's five descriptors (null, kernel code/data, user code/data; 64-bit, accessed).
pub fn gdt() -> [u64; 5] {
    [
        0,
        0x00af_9b00_0000_ffff, // kernel code: L=1, P, DPL0, type 0xb
        0x00cf_9300_0000_ffff, // kernel data
        0x00af_fb00_0000_ffff, // user code: DPL3
        0x00cf_f300_0000_ffff, // user data: DPL3
    ]
}

const PTE_P: u64 = 1;
const PTE_RW: u64 = 1 << 1;
const PTE_US: u64 = 1 << 2;
const PTE_A: u64 = 1 << 5;
const PTE_D: u64 = 1 << 6;
const PTE_PS: u64 = 1 << 7;

/// The boot page tables for `ram` bytes, as `(gpa, words)` chunks: PML4, PDPT, and one
/// page directory per GiB, mapping `0 .. ram` (rounded up to 2 MiB) identity, user, RW.
pub fn page_tables(ram: u64) -> Vec<(u64, Vec<u64>)> {
    let gib = ram.div_ceil(1 << 30).clamp(1, MAX_RAM >> 30);
    let upper = PTE_P | PTE_RW | PTE_US | PTE_A;
    let mut out = vec![(PML4_GPA, vec![PDPT_GPA | upper])];
    out.push((
        PDPT_GPA,
        (0..gib).map(|i| (PD_GPA + i * PAGE) | upper).collect(),
    ));
    let two_mb = ram.div_ceil(2 << 20);
    for i in 0..gib {
        let n = two_mb.saturating_sub(i * 512).min(512);
        let pd = (0..n)
            .map(|j| ((i * 512 + j) << 21) | upper | PTE_D | PTE_PS)
            .collect();
        out.push((PD_GPA + i * PAGE, pd));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn program_fits_in_boot_region() {
        let p = program();
        assert!(!p.is_empty());
        assert!(CODE_GPA + p.len() as u64 <= DATA_START);
    }

    #[test]
    fn page_tables_map_ram_with_user_bit() {
        let pts = page_tables(3 << 30);
        assert_eq!(pts.len(), 2 + 3);
        assert_eq!(pts[1].1.len(), 3);
        let last_pd = &pts[4].1;
        assert_eq!(last_pd.len(), 512);
        assert_eq!(last_pd[511] & !0xfff, (3u64 << 30) - (2 << 20));
        assert_ne!(last_pd[0] & PTE_US, 0);
    }

    #[test]
    fn random_accesses_stay_in_range() {
        let cmd = Command::random(Gfn(256), 10, 7, 1000);
        let (lo, hi) = (cmd.start.gpa().0, cmd.end().0);
        let acc: Vec<_> = random_accesses(&cmd).collect();
        assert_eq!(acc.len(), 1000);
        assert!(
            acc.iter()
                .all(|a| a.gpa >= lo && a.gpa < hi && a.gpa % 8 == 0)
        );
        assert!(acc.iter().any(|a| a.write) && acc.iter().any(|a| !a.write));
    }

    #[test]
    fn pattern_depends_on_seed_and_address() {
        assert_ne!(pattern(1, 0x1000), pattern(2, 0x1000));
        assert_ne!(pattern(1, 0x1000), pattern(1, 0x1008));
    }
}
