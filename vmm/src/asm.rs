//! A tiny x86-64 assembler for the built-in test guest: only the instruction forms the
//! guest uses, each checked against GNU as output in the unit tests, plus labels for
//! forward and backward jumps (always rel32).

/// A 64-bit general-purpose register (hardware number 0..15).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reg(pub u8);

#[allow(missing_docs)]
impl Reg {
    pub const RAX: Reg = Reg(0);
    pub const RCX: Reg = Reg(1);
    pub const RDX: Reg = Reg(2);
    pub const RBX: Reg = Reg(3);
    pub const RSP: Reg = Reg(4);
    pub const RBP: Reg = Reg(5);
    pub const RSI: Reg = Reg(6);
    pub const RDI: Reg = Reg(7);
    pub const R8: Reg = Reg(8);
    pub const R9: Reg = Reg(9);
    pub const R10: Reg = Reg(10);
    pub const R11: Reg = Reg(11);
    pub const R12: Reg = Reg(12);
    pub const R13: Reg = Reg(13);
    pub const R14: Reg = Reg(14);
    pub const R15: Reg = Reg(15);
}

/// A jump target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Label(usize);

/// Condition codes for `jcc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Cond {
    /// Below (unsigned <).
    B = 0x2,
    /// Above or equal (unsigned >=).
    Ae = 0x3,
    /// Equal / zero.
    E = 0x4,
    /// Not equal / not zero.
    Ne = 0x5,
}

/// Group-1 ALU operations with an immediate (`81 /digit id`) or register (`op r/m, r`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alu {
    /// add
    Add,
    /// or
    Or,
    /// and
    And,
    /// sub
    Sub,
    /// xor
    Xor,
    /// cmp
    Cmp,
}

impl Alu {
    fn digit(self) -> u8 {
        match self {
            Alu::Add => 0,
            Alu::Or => 1,
            Alu::And => 4,
            Alu::Sub => 5,
            Alu::Xor => 6,
            Alu::Cmp => 7,
        }
    }
    /// Opcode of `op r/m64, r64`.
    fn rm_r(self) -> u8 {
        self.digit() * 8 + 1
    }
}

/// The assembler: emits bytes, resolves labels in [`Asm::finish`].
#[derive(Debug, Default)]
pub struct Asm {
    code: Vec<u8>,
    labels: Vec<Option<usize>>,
    fixups: Vec<(usize, Label)>,
}

impl Asm {
    /// An empty program.
    pub fn new() -> Asm {
        Asm::default()
    }

    /// Current offset.
    pub fn pos(&self) -> usize {
        self.code.len()
    }

    /// A new, unbound label.
    pub fn label(&mut self) -> Label {
        self.labels.push(None);
        Label(self.labels.len() - 1)
    }

    /// Binds `l` here.
    pub fn bind(&mut self, l: Label) {
        self.labels[l.0] = Some(self.code.len());
    }

    /// A new label bound here.
    pub fn here(&mut self) -> Label {
        let l = self.label();
        self.bind(l);
        l
    }

    fn rex(&mut self, reg: Reg, rm: Reg) {
        self.code.push(0x48 | ((reg.0 >> 3) << 2) | (rm.0 >> 3));
    }

    /// `op r/m64, reg` (or `op reg, r/m64`) with register operands: REX.W op modrm(11).
    fn rr(&mut self, op: &[u8], reg: Reg, rm: Reg) {
        self.rex(reg, rm);
        self.code.extend_from_slice(op);
        self.code.push(0xC0 | ((reg.0 & 7) << 3) | (rm.0 & 7));
    }

    /// REX.W op with a memory operand `[base]`.
    fn rmem(&mut self, op: &[u8], reg: Reg, base: Reg) {
        self.rex(reg, base);
        self.code.extend_from_slice(op);
        let r = (reg.0 & 7) << 3;
        match base.0 & 7 {
            4 => self.code.extend_from_slice(&[r | 4, 0x24]),
            5 => self.code.extend_from_slice(&[0x40 | r | 5, 0]),
            b => self.code.push(r | b),
        }
    }

    /// `mov dst, src`.
    pub fn mov(&mut self, dst: Reg, src: Reg) {
        self.rr(&[0x89], src, dst);
    }

    /// `mov dst, imm64`.
    pub fn mov_imm(&mut self, dst: Reg, imm: u64) {
        self.code.push(0x48 | (dst.0 >> 3));
        self.code.push(0xB8 + (dst.0 & 7));
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `op dst, src` for a group-1 ALU op.
    pub fn alu(&mut self, op: Alu, dst: Reg, src: Reg) {
        self.rr(&[op.rm_r()], src, dst);
    }

    /// `op dst, imm32` (sign-extended) for a group-1 ALU op.
    pub fn alu_imm(&mut self, op: Alu, dst: Reg, imm: i32) {
        self.rr(&[0x81], Reg(op.digit()), dst);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `imul dst, src`.
    pub fn imul(&mut self, dst: Reg, src: Reg) {
        self.rr(&[0x0F, 0xAF], dst, src);
    }

    /// `shl dst, n`.
    pub fn shl(&mut self, dst: Reg, n: u8) {
        self.rr(&[0xC1], Reg(4), dst);
        self.code.push(n);
    }

    /// `shr dst, n`.
    pub fn shr(&mut self, dst: Reg, n: u8) {
        self.rr(&[0xC1], Reg(5), dst);
        self.code.push(n);
    }

    /// `test a, b`.
    pub fn test(&mut self, a: Reg, b: Reg) {
        self.rr(&[0x85], b, a);
    }

    /// `test dst, imm32`.
    pub fn test_imm(&mut self, dst: Reg, imm: i32) {
        self.rr(&[0xF7], Reg(0), dst);
        self.code.extend_from_slice(&imm.to_le_bytes());
    }

    /// `inc dst`.
    pub fn inc(&mut self, dst: Reg) {
        self.rr(&[0xFF], Reg(0), dst);
    }

    /// `dec dst`.
    pub fn dec(&mut self, dst: Reg) {
        self.rr(&[0xFF], Reg(1), dst);
    }

    /// `mov [base], src`.
    pub fn store(&mut self, base: Reg, src: Reg) {
        self.rmem(&[0x89], src, base);
    }

    /// `mov dst, [base]`.
    pub fn load(&mut self, dst: Reg, base: Reg) {
        self.rmem(&[0x8B], dst, base);
    }

    /// `add dst, [base]`.
    pub fn add_load(&mut self, dst: Reg, base: Reg) {
        self.rmem(&[0x03], dst, base);
    }

    /// `cmp reg, [base]`.
    pub fn cmp_load(&mut self, reg: Reg, base: Reg) {
        self.rmem(&[0x3B], reg, base);
    }

    /// `jmp l`.
    pub fn jmp(&mut self, l: Label) {
        self.code.push(0xE9);
        self.fixup(l);
    }

    /// `jcc l`.
    pub fn jcc(&mut self, c: Cond, l: Label) {
        self.code.extend_from_slice(&[0x0F, 0x80 | c as u8]);
        self.fixup(l);
    }

    fn fixup(&mut self, l: Label) {
        self.fixups.push((self.code.len(), l));
        self.code.extend_from_slice(&[0; 4]);
    }

    /// `out port, al`.
    pub fn out(&mut self, port: u8) {
        self.code.extend_from_slice(&[0xE6, port]);
    }

    /// `ud2`.
    pub fn ud2(&mut self) {
        self.code.extend_from_slice(&[0x0F, 0x0B]);
    }

    /// `hlt`.
    pub fn hlt(&mut self) {
        self.code.push(0xF4);
    }

    /// Resolves the jumps; `None` if a used label was never bound.
    pub fn finish(mut self) -> Option<Vec<u8>> {
        for &(at, l) in &self.fixups {
            let target = self.labels[l.0]? as i64;
            let rel = target - (at as i64 + 4);
            self.code[at..at + 4].copy_from_slice(&(rel as i32).to_le_bytes());
        }
        Some(self.code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(f: impl FnOnce(&mut Asm)) -> Vec<u8> {
        let mut a = Asm::new();
        f(&mut a);
        a.finish().unwrap()
    }

    // Expected bytes from GNU as 2.x (`as --64`, objdump -d).
    #[test]
    fn register_forms_match_gnu_as() {
        assert_eq!(bytes(|a| a.mov(Reg::R13, Reg::RSI)), [0x49, 0x89, 0xf5]);
        assert_eq!(bytes(|a| a.mov(Reg::RAX, Reg::R10)), [0x4c, 0x89, 0xd0]);
        assert_eq!(
            bytes(|a| a.mov_imm(Reg::R12, 0x9E37_79B9_7F4A_7C15)),
            [0x49, 0xbc, 0x15, 0x7c, 0x4a, 0x7f, 0xb9, 0x79, 0x37, 0x9e]
        );
        assert_eq!(
            bytes(|a| a.alu(Alu::Xor, Reg::R10, Reg::RCX)),
            [0x49, 0x31, 0xca]
        );
        assert_eq!(
            bytes(|a| a.alu(Alu::Sub, Reg::R14, Reg::RSI)),
            [0x49, 0x29, 0xf6]
        );
        assert_eq!(
            bytes(|a| a.alu(Alu::Cmp, Reg::R13, Reg::RDX)),
            [0x49, 0x39, 0xd5]
        );
        assert_eq!(
            bytes(|a| a.imul(Reg::R10, Reg::R12)),
            [0x4d, 0x0f, 0xaf, 0xd4]
        );
        assert_eq!(bytes(|a| a.shr(Reg::R11, 29)), [0x49, 0xc1, 0xeb, 0x1d]);
        assert_eq!(bytes(|a| a.shl(Reg::R10, 13)), [0x49, 0xc1, 0xe2, 0x0d]);
        assert_eq!(
            bytes(|a| a.alu_imm(Alu::And, Reg::R10, 0xff8)),
            [0x49, 0x81, 0xe2, 0xf8, 0x0f, 0x00, 0x00]
        );
        assert_eq!(
            bytes(|a| a.alu_imm(Alu::Cmp, Reg::RDI, 3)),
            [0x48, 0x81, 0xff, 0x03, 0x00, 0x00, 0x00]
        );
        assert_eq!(
            bytes(|a| a.test_imm(Reg::R15, 1)),
            [0x49, 0xf7, 0xc7, 0x01, 0x00, 0x00, 0x00]
        );
        assert_eq!(bytes(|a| a.test(Reg::R9, Reg::R9)), [0x4d, 0x85, 0xc9]);
        assert_eq!(bytes(|a| a.inc(Reg::RBX)), [0x48, 0xff, 0xc3]);
        assert_eq!(bytes(|a| a.dec(Reg::R9)), [0x49, 0xff, 0xc9]);
    }

    #[test]
    fn memory_forms_match_gnu_as() {
        assert_eq!(
            bytes(|a| a.store(Reg::R13, Reg::R10)),
            [0x4d, 0x89, 0x55, 0x00]
        );
        assert_eq!(bytes(|a| a.store(Reg::RAX, Reg::RCX)), [0x48, 0x89, 0x08]);
        assert_eq!(
            bytes(|a| a.store(Reg::R12, Reg::RAX)),
            [0x49, 0x89, 0x04, 0x24]
        );
        assert_eq!(
            bytes(|a| a.add_load(Reg::RAX, Reg::R13)),
            [0x49, 0x03, 0x45, 0x00]
        );
        assert_eq!(
            bytes(|a| a.cmp_load(Reg::R10, Reg::R13)),
            [0x4d, 0x3b, 0x55, 0x00]
        );
        assert_eq!(bytes(|a| a.load(Reg::RDX, Reg::RSI)), [0x48, 0x8b, 0x16]);
    }

    #[test]
    fn jumps_resolve_backward_and_forward() {
        let code = bytes(|a| {
            let top = a.here();
            let end = a.label();
            a.jcc(Cond::Ae, end);
            a.jmp(top);
            a.bind(end);
            a.out(0x10);
        });
        assert_eq!(
            code,
            [
                0x0f, 0x83, 0x05, 0, 0, 0, 0xe9, 0xf5, 0xff, 0xff, 0xff, 0xe6, 0x10
            ]
        );
    }
}
