//! The `vmm` command-line program (skeleton: `vmm run` launches one test VM on
//! guestmem-managed memory, fills and verifies a slice of RAM per vCPU, and prints what
//! happened). Bad input and a missing `/dev/kvm` exit with status 2 and a message.

use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use guestmem::types::Gfn;
use guestmem::{AllocatorKind, Manager, ManagerConfig, Pool, PoolConfig, RegionSpec};
use vmm::guest::DATA_START;
use vmm::{Command, FaultError, FaultResolver, Hypervisor, Op, SpaceResolver, Vm, VmConfig};

#[derive(Debug, Parser)]
#[command(name = "vmm", about = "KVM guests on memory the VMM manages itself")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run one test VM: each vCPU fills its own slice of RAM with a seeded pattern
    /// through first-touch faults, then verifies it.
    Run {
        /// Guest RAM, e.g. 256M, 1G (a multiple of 2 MiB).
        #[arg(long, default_value = "64M")]
        mem: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Pattern seed.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Parses `4096`, `64K`, `256M`, `1G`.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                _ => return Err(format!("size {s:?}: unknown unit {c:?} (use K, M or G)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("size {s:?} is not a number with an optional K/M/G unit"))?;
    n.checked_mul(mult)
        .filter(|&b| b > 0)
        .ok_or_else(|| format!("size {s:?} must be non-zero and fit in 64 bits"))
}

#[derive(Debug, serde::Serialize)]
struct RunReport {
    mem_bytes: u64,
    vcpus: u32,
    pages_filled: u64,
    mismatches: u64,
    verified: bool,
    faults: vmm::FaultCounts,
    memory: guestmem::MemoryUsage,
    host_resident_bytes: Option<u64>,
    window_host_mappings: Option<u64>,
}

fn run(mem: &str, vcpus: u32, seed: u64) -> Result<RunReport, (u8, String)> {
    let usage = |m: String| (2u8, m);
    let mem = parse_size(mem).map_err(usage)?;
    if mem % (2 << 20) != 0 || mem <= DATA_START + (2 << 20) {
        return Err(usage(format!(
            "--mem {mem} must be a multiple of 2 MiB and at least 4 MiB"
        )));
    }
    if vcpus == 0 || vcpus > 64 {
        return Err(usage("--vcpus must be between 1 and 64".into()));
    }
    let hv = Hypervisor::new().map_err(|e| (2, e.to_string()))?;
    let pool = Pool::new(&PoolConfig::uniform(mem, 1, AllocatorKind::Magazine))
        .map_err(|e| (2, format!("cannot create the frame pool: {e}")))?;
    // Frames mapped into a window must be populated in their memfd (an unpopulated shmem
    // page raises MISSING again); until guestmem's zero fill guarantees that, prefault.
    pool.prefault()
        .map_err(|e| (2, format!("cannot populate the frame pool: {e}")))?;
    let pool = Arc::new(pool);
    let mm = Manager::new(pool.clone(), ManagerConfig::default());
    let mut space = None;
    let vm = Vm::new(&hv, &VmConfig::new(mem, vcpus), |w| {
        let regions = [RegionSpec {
            start: Gfn(0),
            pages: mem / 4096,
        }];
        let s = mm
            .create(&regions, w.clone())
            .map_err(|e| FaultError::Other(e.to_string()))?;
        space = Some(s.clone());
        Ok(Arc::new(SpaceResolver::new(s)) as Arc<dyn FaultResolver>)
    })
    .map_err(|e| (1, e.to_string()))?;
    let space = space.ok_or((1, "no address space".to_string()))?;
    let per = (mem - DATA_START) / 4096 / u64::from(vcpus);
    let slice = |i: u64| Gfn(DATA_START / 4096 + i * per);
    for (i, v) in vm.vcpus().iter().enumerate() {
        v.submit(Command::new(
            Op::Fill,
            slice(i as u64),
            per,
            seed + i as u64,
        ))
        .map_err(|e| (1, e.to_string()))?;
    }
    for v in vm.vcpus() {
        v.wait().map_err(|e| (1, e.to_string()))?;
    }
    let mut mismatches = 0;
    for (i, v) in vm.vcpus().iter().enumerate() {
        let r = v
            .run(Command::new(
                Op::Verify,
                slice(i as u64),
                per,
                seed + i as u64,
            ))
            .map_err(|e| (1, e.to_string()))?;
        mismatches += r.mismatches();
    }
    let report = RunReport {
        mem_bytes: mem,
        vcpus,
        pages_filled: per * u64::from(vcpus),
        mismatches,
        verified: mismatches == 0,
        faults: vm.fault_counts(),
        memory: space.memory(),
        host_resident_bytes: pool.resident_bytes().ok(),
        window_host_mappings: vm.window().host_mappings(),
    };
    drop(vm);
    space.exit();
    Ok(report)
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match cli.cmd {
        Cmd::Run {
            mem,
            vcpus,
            seed,
            json,
        } => match run(&mem, vcpus, seed) {
            Ok(r) => {
                if json {
                    match serde_json::to_string_pretty(&r) {
                        Ok(s) => println!("{s}"),
                        Err(e) => eprintln!("vmm: cannot format the report: {e}"),
                    }
                } else {
                    println!(
                        "{} MiB, {} vCPUs: {} pages filled, verify {} ({} bad words)\n\
                         faults: {} missing-read, {} missing-write, {} write-protect\n\
                         memory: {} resident, {} private, {} shared pages, PSS {:.0} pages; \
                         guest RAM is {} host mappings",
                        r.mem_bytes >> 20,
                        r.vcpus,
                        r.pages_filled,
                        if r.verified { "passed" } else { "FAILED" },
                        r.mismatches,
                        r.faults.missing_read,
                        r.faults.missing_write,
                        r.faults.write_protect,
                        r.memory.resident,
                        r.memory.private,
                        r.memory.shared,
                        r.memory.pss,
                        r.window_host_mappings.unwrap_or(0)
                    );
                }
                ExitCode::from(if r.verified { 0 } else { 1 })
            }
            Err((code, msg)) => {
                eprintln!("vmm: {msg}");
                ExitCode::from(code)
            }
        },
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1g"), Ok(1 << 30));
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn bad_sizes_are_rejected() {
        assert!(parse_size("0").is_err());
        assert!(parse_size("12X").is_err());
        assert!(parse_size("M").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
