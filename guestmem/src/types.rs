//! Typed numbers that must not mix: frame numbers, node ids, guest frame numbers,
//! guest-physical addresses, VM ids and allocation orders.
//!
//! Conversions between them are explicit methods; none implements arithmetic with another.

use std::fmt;

/// Bytes in a page and in a frame.
pub const PAGE_SIZE: usize = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;
/// The largest allocation order (2^9 frames = 2 MiB).
pub const MAX_ORDER: u32 = 9;

macro_rules! newtype {
    ($(#[$m:meta])* $name:ident($inner:ty), $fmt:literal) => {
        $(#[$m])*
        #[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, serde::Serialize)]
        pub struct $name(pub $inner);

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, $fmt, self.0)
            }
        }
    };
}

newtype!(
    /// A host frame number, global within a `Pool`: node `n` owns a contiguous range of them.
    Pfn(u32),
    "pfn:{:#x}"
);
newtype!(
    /// A frame-pool node (a NUMA-style zone of frames).
    NodeId(u16),
    "node{}"
);
newtype!(
    /// A guest frame number: a guest-physical address divided by [`PAGE_SIZE`].
    Gfn(u64),
    "gfn:{:#x}"
);
newtype!(
    /// A guest-physical address.
    Gpa(u64),
    "gpa:{:#x}"
);
newtype!(
    /// A VM (address space) id, unique within one process.
    VmId(u32),
    "vm{}"
);

impl Pfn {
    /// The frame `n` frames after this one (within one allocation: internal only).
    pub fn offset(self, n: u32) -> Pfn {
        debug_assert!(self.0.checked_add(n).is_some(), "{self:?} + {n} overflows");
        Pfn(self.0.wrapping_add(n))
    }

    /// As an index into a frame table.
    pub fn index(self) -> usize {
        self.0 as usize
    }
}

impl Gfn {
    /// The guest-physical address of the first byte of this page. For page numbers from
    /// outside (a guest, a caller), use [`Gfn::checked_gpa`].
    pub fn gpa(self) -> Gpa {
        debug_assert!(
            self.checked_gpa().is_some(),
            "{self:?} has no 64-bit address"
        );
        Gpa(self.0 << PAGE_SHIFT)
    }

    /// The guest-physical address of this page, `None` if it does not fit in 64 bits.
    pub fn checked_gpa(self) -> Option<Gpa> {
        (self.0 <= u64::MAX >> PAGE_SHIFT).then_some(Gpa(self.0 << PAGE_SHIFT))
    }

    /// The page `n` pages after this one (within a region: internal only). For numbers
    /// from outside, use [`Gfn::checked_offset`].
    pub fn offset(self, n: u64) -> Gfn {
        debug_assert!(self.0.checked_add(n).is_some(), "{self:?} + {n} overflows");
        Gfn(self.0.wrapping_add(n))
    }

    /// The page `n` pages after this one, `None` on overflow.
    pub fn checked_offset(self, n: u64) -> Option<Gfn> {
        self.0.checked_add(n).map(Gfn)
    }
}

impl Gpa {
    /// The page holding this address.
    pub fn gfn(self) -> Gfn {
        Gfn(self.0 >> PAGE_SHIFT)
    }

    /// The offset of this address within its page.
    pub fn page_offset(self) -> usize {
        (self.0 & (PAGE_SIZE as u64 - 1)) as usize
    }
}

/// An allocation order: a run of `2^order` contiguous, naturally aligned frames.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default)]
pub struct Order(u8);

impl Order {
    /// A single frame.
    pub const ZERO: Order = Order(0);

    /// `Some(order)` when `order <= MAX_ORDER`.
    pub fn new(order: u32) -> Option<Order> {
        (order <= MAX_ORDER).then_some(Order(order as u8))
    }

    /// The order as a number.
    pub fn get(self) -> u32 {
        u32::from(self.0)
    }

    /// Frames in a run of this order.
    pub fn frames(self) -> u32 {
        1 << self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpa_and_gfn_convert_both_ways() {
        let gpa = Gpa(0x1234_5678);
        assert_eq!(gpa.gfn(), Gfn(0x12345));
        assert_eq!(gpa.page_offset(), 0x678);
        assert_eq!(Gfn(0x12345).gpa(), Gpa(0x1234_5000));
    }

    #[test]
    fn checked_conversions_refuse_what_does_not_fit() {
        assert_eq!(Gfn(1).checked_gpa(), Some(Gpa(4096)));
        assert_eq!(Gfn(1 << 52).checked_gpa(), None);
        assert_eq!(Gfn(u64::MAX).checked_offset(1), None);
        assert_eq!(Gfn(3).checked_offset(4), Some(Gfn(7)));
    }

    #[test]
    fn order_rejects_more_than_max() {
        assert_eq!(Order::new(9).map(Order::frames), Some(512));
        assert_eq!(Order::new(10), None);
    }
}
