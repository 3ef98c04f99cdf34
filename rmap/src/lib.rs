//! Reverse maps for anonymous guest memory (work in progress: see issue 3).
