//! The real resolver: guest faults resolved by guestmem's [`AddressSpace`], which picks the
//! frame and mirrors the mapping into the VM's [`Window`](crate::window::Window) through
//! `HostMmu`. This is the adapter between the VMM's fault handler and the memory manager;
//! [`crate::fault::ScaffoldResolver`] is the test stand-in it replaces.

use std::sync::Arc;

use guestmem::types::Gfn;
use guestmem::{Access, AddressSpace};

use crate::fault::{FaultError, FaultKind, FaultResolver};

/// Resolves faults through an [`AddressSpace`] (the space's `HostMmu` must be the VM's
/// window). Dropping it does not exit the space: the owner decides when frames go back.
#[derive(Debug, Clone)]
pub struct SpaceResolver {
    space: Arc<AddressSpace>,
}

impl SpaceResolver {
    /// A resolver for `space`.
    pub fn new(space: Arc<AddressSpace>) -> SpaceResolver {
        SpaceResolver { space }
    }

    /// The address space.
    pub fn space(&self) -> &Arc<AddressSpace> {
        &self.space
    }
}

impl FaultResolver for SpaceResolver {
    fn resolve(&self, gfn: Gfn, kind: FaultKind) -> Result<(), FaultError> {
        let access = if kind.is_write() {
            Access::Write
        } else {
            Access::Read
        };
        self.space
            .handle_fault(gfn, access)
            .map(|_| ())
            .map_err(|e| FaultError::Other(e.to_string()))
    }
}
