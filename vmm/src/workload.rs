//! Workloads for the `vmm` program: a comma-separated sequence of guest commands, parsed
//! from text, and a run-length model of which seed's pattern each guest page holds, so
//! that every VM (a fork's parent and each clone) can be verified against what it wrote.
//!
//! # Syntax
//!
//! `STEP[,STEP...]`, each step `OP[:KEY=VALUE...]`:
//!
//! | op | guest command |
//! |---|---|
//! | `fill` | write every word of the range with the seed's pattern |
//! | `verify` | check the range against the seed's pattern (a mismatch fails the run) |
//! | `touch` | read the first word of every page |
//! | `random` | `count` seeded random reads and writes |
//! | `checksum` | sum every word |
//! | `dirty` | write one word per page |
//! | `crash` | execute `ud2` in the guest (a test of guest-fault reporting: the run fails) |
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `seed=N` | pattern / generator seed | 1 |
//! | `offset=N` | first page, counted from the start of the vCPU's slice | 0 |
//! | `pages=N` | pages in the range | the rest of the slice |
//! | `count=N` | accesses (`random` only) | 10000 |
//! | `stride=N` | in `vmm fork`'s second phase: clone k's range starts `k*N` pages later (the parent is k=0) | 0 |
//!
//! Sizes also take units: `offset=4M`, `pages=64M` mean bytes, converted to pages (a size
//! must be a whole number of 4 KiB pages). Each key may be given once per step, and only
//! to an op that uses it: `seed` to fill, verify, random and dirty; `count` to random;
//! `crash` takes no key. Anything else is refused rather than ignored.
//! Every vCPU of every VM runs the workload on its own slice of RAM above the boot region;
//! the seed a vCPU uses is `seed + vcpu + 1000 * vm` (and `+ 100000 * (clone + 1)` in a
//! fork's clones), so no two slices hold the same pattern. `verify:seed=N` checks the
//! pattern `fill:seed=N` wrote in the same VM and vCPU.

use guestmem::types::Gfn;

use crate::guest::{Command, Op};

/// The most random accesses one step may ask for (about a minute of guest work here).
pub const MAX_COUNT: u64 = 1 << 30;

/// A workload could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WorkloadError {
    /// An empty workload or an empty step.
    #[error("the workload is empty: give steps like `fill:seed=1,verify:seed=1`")]
    Empty,
    /// An unknown operation.
    #[error("unknown operation {0:?}: use fill, verify, touch, random, checksum, dirty or crash")]
    UnknownOp(String),
    /// A key given twice in one step.
    #[error("{op}: {key} is given twice: give each key once per step")]
    DuplicateKey {
        /// The operation.
        op: String,
        /// The key.
        key: String,
    },
    /// A key the operation does not use (it would be silently ignored).
    #[error("{op} does not use {key}: {uses}")]
    KeyIgnored {
        /// The operation.
        op: String,
        /// The key.
        key: String,
        /// Which keys the operation does use.
        uses: &'static str,
    },
    /// A size that is not a whole number of pages.
    #[error(
        "{key}={value} is not a whole number of 4 KiB pages: give pages (like {key}=16) or a \
         multiple of 4K"
    )]
    NotPages {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A `key=value` that is not one.
    #[error("{0:?} is not KEY=VALUE (keys: seed, offset, pages, count, stride)")]
    BadPair(String),
    /// An unknown key.
    #[error("unknown key {0:?}: use seed, offset, pages, count or stride")]
    UnknownKey(String),
    /// A `count` so large the run would not finish.
    #[error("count={0} is too large: at most {MAX_COUNT} random accesses per step")]
    CountTooLarge(u64),
    /// A value that is not a number.
    #[error("{key}={value}: not a number (sizes may end in K, M or G)")]
    BadNumber {
        /// The key.
        key: String,
        /// The value.
        value: String,
    },
    /// A range outside the vCPU's slice.
    #[error(
        "step {step} ({op}) covers pages {start}..{end} of a {slice}-page slice{}: make the guest bigger (--mem) or the range smaller",
        if *stride > 0 { format!(" (its range starts {stride_index} x stride={stride} pages later)") } else { String::new() }
    )]
    OutOfSlice {
        /// Step number (1-based).
        step: usize,
        /// Operation name.
        op: String,
        /// First page (slice-relative).
        start: u64,
        /// End page.
        end: u64,
        /// Pages in the slice.
        slice: u64,
        /// The step's stride (pages).
        stride: u64,
        /// The VM's stride index (a fork's VM number).
        stride_index: u64,
    },
}

/// One workload step, slice-relative.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Step {
    /// Operation.
    pub op: Op,
    /// Seed before the per-vCPU/VM offsets.
    pub seed: u64,
    /// First page from the slice start.
    pub offset: u64,
    /// Pages (None: to the end of the slice).
    pub pages: Option<u64>,
    /// Random accesses.
    pub count: u64,
    /// Per-clone shift of the range in pages.
    pub stride: u64,
}

/// A parsed workload.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Workload {
    /// The steps, in order.
    pub steps: Vec<Step>,
}

/// The name of `op` in the workload syntax (`fill`, `verify`, ...).
pub fn op_name(op: Op) -> &'static str {
    match op {
        Op::Fill => "fill",
        Op::Verify => "verify",
        Op::Touch => "touch",
        Op::Random => "random",
        Op::Checksum => "checksum",
        Op::Crash => "crash",
        Op::Dirty => "dirty",
    }
}

/// Parses `4096` or a size with a K/M/G unit (bytes, turned into 4 KiB pages).
fn parse_pages(key: &str, value: &str) -> Result<u64, WorkloadError> {
    let bad = || WorkloadError::BadNumber {
        key: key.into(),
        value: value.into(),
    };
    match value.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let shift = match c.to_ascii_uppercase() {
                'K' => 10,
                'M' => 20,
                'G' => 30,
                _ => return Err(bad()),
            };
            let n: u64 = value[..i].parse().map_err(|_| bad())?;
            let bytes = n.checked_mul(1 << shift).ok_or_else(bad)?;
            if bytes % 4096 != 0 {
                return Err(WorkloadError::NotPages {
                    key: key.into(),
                    value: value.into(),
                });
            }
            Ok(bytes / 4096)
        }
        _ => value.parse().map_err(|_| bad()),
    }
}

impl std::str::FromStr for Workload {
    type Err = WorkloadError;

    fn from_str(s: &str) -> Result<Workload, WorkloadError> {
        let mut steps = Vec::new();
        for text in s.split(',').map(str::trim) {
            if text.is_empty() {
                return Err(WorkloadError::Empty);
            }
            let mut parts = text.split(':');
            let op = match parts
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
                .as_str()
            {
                "fill" => Op::Fill,
                "verify" => Op::Verify,
                "touch" => Op::Touch,
                "random" => Op::Random,
                "checksum" => Op::Checksum,
                "dirty" => Op::Dirty,
                "crash" => Op::Crash,
                other => return Err(WorkloadError::UnknownOp(other.into())),
            };
            let uses = keys_used(op);
            let mut step = Step {
                op,
                seed: 1,
                offset: 0,
                pages: None,
                count: 10_000,
                stride: 0,
            };
            let mut seen: Vec<&str> = Vec::new();
            for pair in parts {
                let (k, v) = pair
                    .split_once('=')
                    .ok_or_else(|| WorkloadError::BadPair(pair.into()))?;
                let (k, v) = (k.trim(), v.trim());
                if !KEYS.contains(&k) {
                    return Err(WorkloadError::UnknownKey(k.into()));
                }
                if !uses.0.contains(&k) {
                    return Err(WorkloadError::KeyIgnored {
                        op: op_name(op).into(),
                        key: k.into(),
                        uses: uses.1,
                    });
                }
                if seen.contains(&k) {
                    return Err(WorkloadError::DuplicateKey {
                        op: op_name(op).into(),
                        key: k.into(),
                    });
                }
                seen.push(k);
                let num = || {
                    v.parse::<u64>().map_err(|_| WorkloadError::BadNumber {
                        key: k.into(),
                        value: v.into(),
                    })
                };
                match k {
                    "seed" => step.seed = num()?,
                    "count" => {
                        step.count = num()?;
                        if step.count > MAX_COUNT {
                            return Err(WorkloadError::CountTooLarge(step.count));
                        }
                    }
                    "offset" => step.offset = parse_pages(k, v)?,
                    "pages" => step.pages = Some(parse_pages(k, v)?),
                    "stride" => step.stride = parse_pages(k, v)?,
                    _ => return Err(WorkloadError::UnknownKey(k.into())),
                }
            }
            steps.push(step);
        }
        if steps.is_empty() {
            return Err(WorkloadError::Empty);
        }
        Ok(Workload { steps })
    }
}

/// Every key of the syntax.
const KEYS: [&str; 5] = ["seed", "offset", "pages", "count", "stride"];

/// The keys `op` uses, and how to say so.
fn keys_used(op: Op) -> (&'static [&'static str], &'static str) {
    match op {
        Op::Fill | Op::Verify | Op::Dirty => (
            &["seed", "offset", "pages", "stride"],
            "it takes seed, offset, pages and stride",
        ),
        Op::Random => (
            &["seed", "offset", "pages", "count", "stride"],
            "it takes seed, offset, pages, count and stride",
        ),
        Op::Touch | Op::Checksum => (
            &["offset", "pages", "stride"],
            "it takes offset, pages and stride (no seed: it reads what is there)",
        ),
        Op::Crash => (&[], "it takes no key"),
    }
}

impl Workload {
    /// Whether any step has a `stride` (meaningful only in a fork's second phase).
    pub fn has_stride(&self) -> bool {
        self.steps.iter().any(|s| s.stride > 0)
    }
}

/// Where a vCPU's slice lies and which seeds it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// First page of the slice.
    pub slice_start: Gfn,
    /// Pages in the slice.
    pub slice_pages: u64,
    /// Added to every step's seed.
    pub seed_offset: u64,
    /// Multiplies each step's `stride` (a fork's clone index + 1; 0 for the parent).
    pub stride_index: u64,
}

impl Workload {
    /// The guest commands for one vCPU, checked against its slice.
    pub fn commands(&self, at: &Placement) -> Result<Vec<Command>, WorkloadError> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let start = s
                    .stride
                    .checked_mul(at.stride_index)
                    .and_then(|d| d.checked_add(s.offset))
                    .unwrap_or(u64::MAX);
                let pages = s.pages.unwrap_or(at.slice_pages.saturating_sub(start));
                let end = start.saturating_add(pages);
                if pages == 0 || end > at.slice_pages {
                    return Err(WorkloadError::OutOfSlice {
                        step: i + 1,
                        op: op_name(s.op).into(),
                        start,
                        end,
                        slice: at.slice_pages,
                        stride: s.stride,
                        stride_index: at.stride_index,
                    });
                }
                Ok(Command {
                    op: s.op,
                    start: Gfn(at.slice_start.0 + start),
                    pages,
                    seed: s.seed.wrapping_add(at.seed_offset),
                    count: s.count,
                })
            })
            .collect()
    }
}

/// What a page is known to hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    /// Never written: zero.
    Zero,
    /// `pattern(seed, gpa)` in every word.
    Seed(u64),
    /// Partly written (random or dirty): not verifiable.
    Unknown,
}

/// Which pattern each guest page holds, as runs (see the module docs).
#[derive(Debug, Clone)]
pub struct Model {
    /// Sorted, non-overlapping `(start, end, mark)` runs of gfns; gaps are [`Mark::Zero`].
    runs: Vec<(u64, u64, Mark)>,
}

impl Default for Model {
    fn default() -> Self {
        Model::new()
    }
}

impl Model {
    /// Nothing written.
    pub fn new() -> Model {
        Model { runs: Vec::new() }
    }

    fn set(&mut self, start: u64, end: u64, mark: Mark) {
        let mut out = Vec::with_capacity(self.runs.len() + 2);
        for &(s, e, m) in &self.runs {
            if e <= start || s >= end {
                out.push((s, e, m));
                continue;
            }
            if s < start {
                out.push((s, start, m));
            }
            if e > end {
                out.push((end, e, m));
            }
        }
        if mark != Mark::Zero {
            out.push((start, end, mark));
        }
        out.sort_by_key(|r| r.0);
        self.runs = out;
    }

    /// Records what `cmd` did to memory.
    pub fn apply(&mut self, cmd: &Command) {
        let (s, e) = (cmd.start.0, cmd.start.0 + cmd.pages);
        match cmd.op {
            Op::Fill => self.set(s, e, Mark::Seed(cmd.seed)),
            Op::Random | Op::Dirty => self.set(s, e, Mark::Unknown),
            Op::Verify | Op::Touch | Op::Checksum | Op::Crash => {}
        }
    }

    /// Verify commands covering every page whose pattern is known (adjacent runs of one
    /// seed merged).
    pub fn verify_commands(&self) -> Vec<Command> {
        let mut out: Vec<Command> = Vec::new();
        for &(s, e, m) in &self.runs {
            let Mark::Seed(seed) = m else { continue };
            if let Some(last) = out.last_mut()
                && last.seed == seed
                && last.start.0 + last.pages == s
            {
                last.pages += e - s;
                continue;
            }
            out.push(Command::new(Op::Verify, Gfn(s), e - s, seed));
        }
        out
    }

    /// Pages whose pattern is known.
    pub fn known_pages(&self) -> u64 {
        self.runs
            .iter()
            .filter(|r| matches!(r.2, Mark::Seed(_)))
            .map(|r| r.1 - r.0)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_workload_parses_with_defaults_and_units() {
        let w: Workload = "fill:seed=1,verify:seed=1,random:seed=7:count=100000,checksum,fill:pages=4M:offset=8:stride=1024"
            .parse()
            .unwrap();
        assert_eq!(w.steps.len(), 5);
        assert_eq!(w.steps[2].count, 100_000);
        assert_eq!(w.steps[3].seed, 1);
        assert_eq!(w.steps[4].pages, Some(1024));
        assert_eq!(w.steps[4].offset, 8);
        assert_eq!(w.steps[4].stride, 1024);
    }

    #[test]
    fn malformed_workloads_are_rejected_with_the_reason() {
        assert_eq!("".parse::<Workload>(), Err(WorkloadError::Empty));
        assert_eq!(
            "fill,,verify".parse::<Workload>(),
            Err(WorkloadError::Empty)
        );
        assert!(matches!(
            "fil".parse::<Workload>(),
            Err(WorkloadError::UnknownOp(_))
        ));
        assert!(matches!(
            "fill:seed".parse::<Workload>(),
            Err(WorkloadError::BadPair(_))
        ));
        assert!(matches!(
            "fill:sed=1".parse::<Workload>(),
            Err(WorkloadError::UnknownKey(_))
        ));
        assert!(matches!(
            "fill:seed=x".parse::<Workload>(),
            Err(WorkloadError::BadNumber { .. })
        ));
    }

    #[test]
    fn nonsense_that_used_to_be_ignored_is_refused() {
        let err = |w: &str| w.parse::<Workload>().unwrap_err();
        assert!(matches!(
            err("fill:seed=1:seed=2"),
            WorkloadError::DuplicateKey { .. }
        ));
        assert!(matches!(
            err("fill:count=5"),
            WorkloadError::KeyIgnored { .. }
        ));
        assert!(matches!(
            err("checksum:seed=5"),
            WorkloadError::KeyIgnored { .. }
        ));
        assert!(matches!(
            err("crash:pages=1"),
            WorkloadError::KeyIgnored { .. }
        ));
        assert!(matches!(
            err("fill:offset=1K"),
            WorkloadError::NotPages { .. }
        ));
        assert!(matches!(
            err("fill:pages=6K"),
            WorkloadError::NotPages { .. }
        ));
        // What is meant is still accepted.
        let w: Workload = "fill:offset=8K:pages=4M,random:count=3:seed=2,crash"
            .parse()
            .unwrap();
        assert_eq!((w.steps[0].offset, w.steps[0].pages), (2, Some(1024)));
        assert_eq!(w.steps[2].op, Op::Crash);
        assert!(!w.has_stride());
    }

    #[test]
    fn commands_are_placed_in_the_slice_and_checked() {
        let w: Workload = "fill:seed=3:offset=10:pages=5:stride=100".parse().unwrap();
        let at = Placement {
            slice_start: Gfn(256),
            slice_pages: 1000,
            seed_offset: 40,
            stride_index: 2,
        };
        let c = w.commands(&at).unwrap();
        assert_eq!((c[0].start, c[0].pages, c[0].seed), (Gfn(466), 5, 43));
        let far = Placement {
            stride_index: 10,
            ..at
        };
        assert!(matches!(
            w.commands(&far),
            Err(WorkloadError::OutOfSlice { .. })
        ));
    }

    #[test]
    fn the_model_verifies_the_latest_pattern_of_each_page() {
        let mut m = Model::new();
        m.apply(&Command::new(Op::Fill, Gfn(100), 100, 1));
        m.apply(&Command::new(Op::Fill, Gfn(120), 10, 2));
        m.apply(&Command::random(Gfn(190), 20, 5, 10));
        let v = m.verify_commands();
        let got: Vec<_> = v.iter().map(|c| (c.start.0, c.pages, c.seed)).collect();
        assert_eq!(got, vec![(100, 20, 1), (120, 10, 2), (130, 60, 1)]);
        assert_eq!(m.known_pages(), 90);
    }
}
