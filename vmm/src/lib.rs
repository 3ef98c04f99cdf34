//! KVM guests on managed memory (work in progress: see issue 5).
