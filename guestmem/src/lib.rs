//! The guest memory manager.
pub mod mmu;
pub mod types;
