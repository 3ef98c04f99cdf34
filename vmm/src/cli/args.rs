//! The command line as clap types: the subcommands, the options they share and the
//! WORKLOAD help text. Parsing only; every range and size check is in [`super::limits`].

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

pub(crate) const WORKLOAD_HELP: &str = "\
WORKLOAD syntax: STEP[,STEP...], each STEP is OP[:KEY=VALUE...]
  ops:  fill (write the seed's pattern), verify (check it), touch (read a word per page),
        random (seeded random reads/writes), checksum (sum every word), dirty (write a word per
        page), crash (a guest fault: tests how a failing guest is reported)
  keys: seed=N (default 1), offset=N (first page of the range, from the start of the vCPU's
        slice; default 0), pages=N (default: rest of the slice), count=N (random accesses,
        default 10000), stride=N (fork's second phase: clone k's range starts k*N pages later)
  offset, pages and stride also take sizes (whole pages): 4M, 1G. Each key at most once per
  step and only where it is used: seed for fill/verify/random/dirty, count for random; crash
  takes none.
Each vCPU works on its own slice of guest RAM (above the 1 MiB boot region); its seeds are
offset by the vCPU index and by 1000 per VM (100000 per fork clone), so every slice holds its
own pattern and `verify:seed=N` checks what `fill:seed=N` wrote.
Example: --workload fill:seed=1,verify:seed=1,random:seed=7:count=100000,checksum

Exit status: 0 every VM ran every step and every verify passed; 1 a guest failed, ran past
--timeout or a verify found bad words; 2 bad input or a host that cannot run it (the message
says what to do); 130 stopped by Ctrl-C (the report of what had run is printed first).";

#[derive(Debug, Parser)]
#[command(
    name = "vmm",
    version,
    about = "KVM guests on memory the VMM manages itself: run workloads, snapshot-fork running VMs",
    after_help = WORKLOAD_HELP
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub cmd: Cmd,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum AllocatorArg {
    /// Per-CPU magazines with a depot (seed 5).
    Magazine,
    /// Linux's per-cpu page lists.
    Percpu,
    /// One global lock.
    Global,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum ParentArg {
    /// Move the parent into a fresh VM and window.
    Rebirth,
    /// Write-protect the parent's window in place.
    InPlace,
}

/// `--migrate-walk`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum MigrateWalkArg {
    /// The root lock for writing (Linux before 2012).
    Exclusive,
    /// The root lock for reading (seed 4, Linux since).
    Shared,
    /// No root lock (the run's topology lock proves no chain changes).
    Unlocked,
}

impl From<MigrateWalkArg> for guestmem::MigrateWalk {
    fn from(w: MigrateWalkArg) -> guestmem::MigrateWalk {
        match w {
            MigrateWalkArg::Exclusive => guestmem::MigrateWalk::Exclusive,
            MigrateWalkArg::Shared => guestmem::MigrateWalk::Shared,
            MigrateWalkArg::Unlocked => guestmem::MigrateWalk::Unlocked,
        }
    }
}

impl Common {
    /// Whether swap is on (`--swap` or `--host-memory`).
    pub(crate) fn swap_on(&self) -> bool {
        self.swap.is_some() || self.host_memory.is_some()
    }
}

impl From<ParentArg> for vmm::ParentMode {
    fn from(p: ParentArg) -> vmm::ParentMode {
        match p {
            ParentArg::Rebirth => vmm::ParentMode::Rebirth,
            ParentArg::InPlace => vmm::ParentMode::InPlace,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub(crate) enum RmapArg {
    /// anon_vma chains (seed 2).
    Chain,
    /// One anon_vma per fork tree (pre-2010 Linux).
    Flat,
}

/// Options every subcommand shares.
#[derive(Debug, Clone, Args)]
pub(crate) struct Common {
    /// Guest RAM per VM: 256M, 1G ... (a multiple of 2 MiB, 4 MiB to 64 GiB).
    #[arg(long, default_value = "256M")]
    pub mem: String,
    /// vCPUs per VM (1 to 64); each works on its own slice of RAM.
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Frame pool size (default: what the VMs can write, plus 16 MiB; at most 16T less
    /// one page). The pool is sparse: host memory is used only for frames handed out.
    #[arg(long)]
    pub pool: Option<String>,
    /// Swap guest pages the pool cannot hold to PATH (created; must not exist; removed at
    /// exit). Without PATH: a new file in the system temp dir. With swap the pool may be
    /// smaller than what the VMs touch.
    #[arg(long, value_name = "PATH", num_args = 0..=1, default_missing_value = "")]
    pub swap: Option<String>,
    /// The resident budget: a frame pool of SIZE (instead of --pool) with swap on
    /// (--swap's PATH, or the temp dir).
    #[arg(long, value_name = "SIZE")]
    pub host_memory: Option<String>,
    /// Memory nodes of the frame pool (1 to 64), each its own memfd; without --pool each
    /// can hold all the VMs write (the pool is sparse). On a host with one NUMA node they
    /// are separate pools in the same memory.
    #[arg(long, default_value_t = 1)]
    pub nodes: usize,
    /// Where each VM's new frames come from: first-touch (the node of the VM's vCPUs:
    /// VM k's is node k mod --nodes), interleave, preferred:N or bind:N.
    #[arg(long, default_value = "first-touch", value_parser = parse_policy)]
    pub policy: guestmem::NodePolicy,
    /// Frame allocator design.
    #[arg(long, value_enum, default_value = "magazine")]
    pub allocator: AllocatorArg,
    /// Reverse-map design.
    #[arg(long, value_enum, default_value = "chain")]
    pub rmap: RmapArg,
    /// Pin every VM's vCPUs and fault handler to this host CPU, one of those this process
    /// may run on (0 to N-1; cross-CPU wake-ups cost).
    #[arg(long)]
    pub cpu: Option<usize>,
    /// Give up when the guests' work has not finished SECS seconds (fractions allowed)
    /// after the VMs start: the late VM, vCPU and step are named, the VMs are stopped and
    /// the exit status is 1. Default: no limit.
    #[arg(long, value_name = "SECS", value_parser = parse_timeout)]
    pub timeout: Option<Duration>,
    /// Print JSON instead of text (the whole configuration included; 64-bit guest results
    /// as hex strings, so no JSON reader rounds them).
    #[arg(long)]
    pub json: bool,
    /// Stream one JSON object per line on stdout as things happen (VM created, step done,
    /// VM verified, failures), the report last as `{"event":"report",...}`.
    #[arg(long)]
    pub events: bool,
    /// Test hook for the verdict itself: after the workload, flip one word of this VM's
    /// memory from the host side ("parent", "clone 3", "clone 1.1"), so its final verify
    /// must fail. Fork and demo only.
    #[arg(long, hide = true, value_name = "VM")]
    pub corrupt: Option<String>,
}

/// `--policy`: first-touch, interleave, preferred:N or bind:N.
fn parse_policy(s: &str) -> Result<guestmem::NodePolicy, String> {
    use guestmem::{NodeId, NodePolicy};
    let node = |n: &str| {
        n.parse::<u16>()
            .map(NodeId)
            .map_err(|_| format!("{n:?} is not a node number (0, 1, ...)"))
    };
    match s.trim().split_once(':') {
        None if s.trim() == "first-touch" => Ok(NodePolicy::FirstTouch),
        None if s.trim() == "interleave" => Ok(NodePolicy::Interleave),
        Some(("preferred", n)) => node(n).map(NodePolicy::Preferred),
        Some(("bind", n)) => node(n).map(NodePolicy::Bind),
        _ => Err(format!(
            "{s:?} is not a policy: give first-touch, interleave, preferred:N or bind:N"
        )),
    }
}

/// `--timeout`: positive seconds, fractions allowed.
fn parse_timeout(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds (like 30 or 0.5)"))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(format!(
            "{s:?}: the timeout must be more than 0 seconds (leave --timeout out for no limit)"
        ));
    }
    Duration::try_from_secs_f64(secs)
        .map_err(|_| format!("{s:?} seconds is too long: leave --timeout out for no limit"))
}

#[derive(Debug, Args)]
pub(crate) struct ForkArgs {
    #[command(flatten)]
    pub common: Common,
    /// Clones to fork the VM into (1 to 10000; with a `stride` in --phase2 each VM's range
    /// must fit in its vCPU slice, which bounds them by --mem).
    #[arg(long, default_value_t = 8)]
    pub clones: usize,
    /// Workload run in the VM before the fork (see WORKLOAD syntax).
    #[arg(long, default_value = "fill:seed=1")]
    pub phase1: String,
    /// Workload run after the fork in the parent and in every clone, each with its own
    /// seeds; `stride` gives each VM its own range.
    #[arg(long, default_value = "fill:seed=2:pages=256:stride=256")]
    pub phase2: String,
    /// Also fork clone 1 once more and run the second phase in that grandchild.
    #[arg(long)]
    pub grandchild: bool,
    /// Create the clones' VMs (KVM VM, memslot, vCPUs, threads) before pausing the
    /// parent, so the fork itself creates none (the time to make them is reported apart).
    #[arg(long)]
    pub shells: bool,
    /// Hold the clones in N worker processes (copies of this program; 1 to 64) instead of
    /// this one: their VM shells are made in all workers at once before the pause, and
    /// this process keeps the memory manager and resolves their faults. Every KVM VM of a
    /// process slows every host mapping change of it, so past a few hundred clones this
    /// is what keeps the cost per clone flat. Not with --grandchild or --vcpu-nodes.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub workers: usize,
    /// What the fork does with the parent's window: `rebirth` moves the parent into a
    /// fresh VM and window (a short pause; its pages fault back in as it touches them),
    /// `in-place` write-protects its window during the pause (a longer pause; its reads
    /// fault nothing afterwards).
    #[arg(long, value_enum, default_value = "rebirth")]
    pub parent: ParentArg,
    /// Each vCPU's home node, vCPU i taking the (i mod len)-th entry, in the parent and
    /// every clone (see `run --help`). Default: every vCPU on node 0.
    #[arg(long, value_name = "LIST", value_delimiter = ',')]
    pub vcpu_nodes: Option<Vec<u16>>,
}

#[derive(Debug, Subcommand)]
pub(crate) enum Cmd {
    /// Launch VMs and run a workload in each (see WORKLOAD syntax below).
    #[command(after_help = WORKLOAD_HELP)]
    Run {
        #[command(flatten)]
        common: Common,
        /// VMs to run at once (1 to 1000).
        #[arg(long, default_value_t = 1)]
        vms: u32,
        /// The guest commands to run.
        #[arg(long, default_value = "fill:seed=1,verify:seed=1")]
        workload: String,
        /// While the workload runs, move every VM's memory to this node, over and over
        /// (each pass takes the pages placed since), then once more at the end.
        #[arg(long, value_name = "NODE")]
        migrate_to: Option<u16>,
        /// How the moves' reverse-map walks take the anon_vma root lock.
        #[arg(long, value_enum, default_value = "shared")]
        migrate_walk: MigrateWalkArg,
        /// Move at most this many MiB per second (default: as fast as it goes).
        #[arg(long, value_name = "MIB")]
        migrate_rate: Option<u64>,
        /// Automatic NUMA balancing: scan the VMs every MS milliseconds at least (the
        /// period grows to 60 s while every touch is local) and move pages touched twice
        /// in a row from another node than the VM's home node (VM k's is node k mod
        /// --nodes), 256 MiB per scan.
        #[arg(long, value_name = "MS", num_args = 0..=1, default_missing_value = "1000")]
        numa_balance: Option<u64>,
        /// Each vCPU's home node, vCPU i taking the (i mod len)-th entry ("0,1": vCPU 0
        /// on node 0, vCPU 1 on node 1, ...), the same in every VM. A fault is resolved on
        /// the node of the vCPU that takes it, so first touch places each vCPU's slice on
        /// its node, and --numa-balance moves pages to the node of the vCPU that keeps
        /// touching them (hinting faults name the vCPU: userfaultfd MINOR faults).
        /// Default: all of VM k's vCPUs on node k mod --nodes.
        #[arg(long, value_name = "LIST", value_delimiter = ',')]
        vcpu_nodes: Option<Vec<u16>>,
    },
    /// Run a VM, snapshot-fork it into clones, run a second phase in each, verify all.
    #[command(after_help = WORKLOAD_HELP)]
    Fork(ForkArgs),
    /// A snapshot-fork experiment with defaults: a 256 MiB, 2-vCPU guest fills 192 MiB,
    /// forks into 8 clones (VM shells made beforehand), each rewrites its own 8 MiB (4 MiB
    /// per vCPU), the parent too, clone 1 forks again; every VM verifies all it holds.
    Demo {
        /// Clones (1 to 29: each VM rewrites its own 4 MiB range of each vCPU's slice).
        #[arg(long, default_value_t = 8)]
        clones: usize,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
        /// Stream one JSON line per event on stdout (see `run --help`).
        #[arg(long)]
        events: bool,
        /// See `fork --corrupt` (hidden: a test hook).
        #[arg(long, hide = true, value_name = "VM")]
        corrupt: Option<String>,
    },
    /// Serve a control API (JSON over HTTP on a Unix socket) for VMs made and driven by
    /// requests, until Ctrl-C, SIGTERM or POST /shutdown.
    Serve(super::serve::ServeArgs),
    /// Send one request to a `vmm serve` and print its JSON reply.
    Ctl(super::ctl::CtlArgs),
}

#[cfg(test)]
mod tests {
    use super::parse_timeout;
    use std::time::Duration;

    #[test]
    fn timeouts_parse_as_positive_seconds() {
        assert_eq!(parse_timeout("30"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_timeout("0.5"), Ok(Duration::from_millis(500)));
    }

    #[test]
    fn zero_negative_and_absurd_timeouts_are_rejected() {
        for bad in ["0", "-1", "NaN", "soon", "1e300"] {
            assert!(parse_timeout(bad).is_err(), "{bad}");
        }
    }
}
