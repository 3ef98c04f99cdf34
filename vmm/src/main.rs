//! The `vmm` command-line program: `run` launches test VMs on guestmem-managed memory and
//! runs a workload in them; `fork` snapshot-forks a running VM into clones and verifies
//! every one; `demo` is `fork` with sensible defaults, a progress display and a table.
//!
//! Exit status: 0 when everything ran and verified, 1 when a guest failed or a verify
//! found a mismatch, 2 for bad input or a host that cannot run the VMs (no `/dev/kvm`,
//! limits too low), always with a message saying what to do. `--timeout SECS` bounds the
//! guests' work: a VM still running at the limit is named (with its vCPU and step), its
//! VMs are stopped and the status is 1.

mod cli;

use std::process::ExitCode;

use clap::Parser;

use cli::args::{AllocatorArg, Cli, Cmd, Common, RmapArg};
use cli::fork::{ForkParams, cmd_fork};
use cli::report::{emit, print_fork, print_run};
use cli::run::cmd_run;

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
    let demo_common;
    let result = match &cli.cmd {
        Cmd::Run {
            common,
            vms,
            workload,
        } => cmd_run(common, *vms, workload).map(|r| {
            emit(common.json, &r, print_run);
            r.verified
        }),
        Cmd::Fork(a) => cmd_fork(&ForkParams {
            common: &a.common,
            clones: a.clones,
            phase1: &a.phase1,
            phase2: &a.phase2,
            grandchild: a.grandchild,
            shells: a.shells,
            progress: false,
        })
        .map(|r| {
            emit(a.common.json, &r, print_fork);
            r.verified
        }),
        Cmd::Demo { clones, json } => {
            demo_common = Common {
                mem: "256M".into(),
                vcpus: 2,
                pool: None,
                allocator: AllocatorArg::Magazine,
                rmap: RmapArg::Chain,
                cpu: None,
                timeout: None,
                json: *json,
            };
            cmd_fork(&ForkParams {
                common: &demo_common,
                clones: *clones,
                // Each vCPU fills 96 of its 127 MiB; after the fork every VM rewrites its own
                // 4 MiB per vCPU (the parent too), clone 1's child another.
                phase1: "fill:seed=1:pages=96M",
                phase2: "fill:seed=2:pages=4M:stride=4M",
                grandchild: true,
                shells: true,
                progress: true,
            })
            .map(|r| {
                emit(*json, &r, print_fork);
                r.verified
            })
        }
        // They keep their own exit statuses (see their modules).
        Cmd::Serve(a) => return cli::serve::cmd_serve(a),
        Cmd::Ctl(a) => return cli::ctl::cmd_ctl(a),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => {
            eprintln!("vmm: a verify found mismatches (see the report)");
            ExitCode::from(1)
        }
        Err(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(e.code())
        }
    }
}
