//! The guest memory manager.
pub mod types;
