//! The `vmm` command-line program: `run` launches test VMs on guestmem-managed memory and
//! runs a workload in them; `fork` snapshot-forks a running VM into clones and verifies
//! every one; `demo` is `fork` with sensible defaults, a progress display and a table.
//!
//! Exit status: 0 when everything ran and verified, 1 when a guest failed or a verify
//! found a mismatch, 2 for bad input or a host that cannot run the VMs (no `/dev/kvm`,
//! limits too low), always with a message saying what to do; 130 after Ctrl-C. Every step
//! of every VM counts towards the verdict. A run that stops early still prints the report
//! of what had run. `--timeout SECS` bounds the guests' work: a VM still running at the
//! limit is named (with its vCPU and step), its VMs are stopped and the status is 1.

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;

use cli::args::{AllocatorArg, Cli, Cmd, Common, RmapArg};
use cli::error::CliError;
use cli::fork::{ForkParams, cmd_fork};
use cli::report::{ForkReport, RunReport, emit, print_fork, print_run};
use cli::run::cmd_run;

fn main() -> ExitCode {
    // A worker process of a `WorkerPool` serves and exits here.
    vmm::worker::serve_if_worker();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    // Ctrl-C stops the guests' work and prints the partial report, for the one-shot
    // commands only: `serve` handles its own signals, `ctl` is killed as usual.
    if matches!(cli.cmd, Cmd::Run { .. } | Cmd::Fork(_) | Cmd::Demo { .. }) {
        cli::feedback::catch_interrupts();
    }
    let (verified, error) = match &cli.cmd {
        Cmd::Run {
            common,
            vms,
            workload,
            migrate_to,
            migrate_walk,
            migrate_rate,
            numa_balance,
            vcpu_nodes,
        } => {
            let migrate = migrate_to.map(|to| cli::run::MigrateOpts {
                to,
                walk: (*migrate_walk).into(),
                rate_mib: *migrate_rate,
            });
            let (report, error) = cmd_run(
                common,
                *vms,
                workload,
                common.events,
                migrate,
                *numa_balance,
                vcpu_nodes.as_deref(),
            );
            finish(common.json, common.events, report, error, print_run)
        }
        Cmd::Fork(a) => {
            let (report, error) = cmd_fork(&ForkParams {
                common: &a.common,
                clones: a.clones,
                phase1: &a.phase1,
                phase2: &a.phase2,
                grandchild: a.grandchild,
                shells: a.shells,
                demo: false,
                events: a.common.events,
                parent: a.parent.into(),
                live_move: None,
                vcpu_nodes: a.vcpu_nodes.as_deref(),
                workers: a.workers,
            });
            finish(a.common.json, a.common.events, report, error, print_fork)
        }
        Cmd::Demo {
            clones,
            json,
            events,
            corrupt,
        } => {
            let common = Common {
                mem: cli::fork::DEMO_MEM.into(),
                vcpus: cli::fork::DEMO_VCPUS,
                pool: None,
                swap: None,
                host_memory: None,
                // Two nodes: clone 1's memory moves to node 1 while phase 2 runs.
                nodes: 2,
                policy: guestmem::NodePolicy::FirstTouch,
                allocator: AllocatorArg::Magazine,
                rmap: RmapArg::Chain,
                cpu: None,
                timeout: None,
                json: *json,
                events: *events,
                corrupt: corrupt.clone(),
            };
            let (report, error) = cmd_fork(&ForkParams {
                common: &common,
                clones: *clones,
                phase1: cli::fork::DEMO_PHASE1,
                phase2: cli::fork::DEMO_PHASE2,
                grandchild: true,
                shells: true,
                demo: true,
                events: *events,
                parent: vmm::ParentMode::Rebirth,
                live_move: Some((1, 1)),
                vcpu_nodes: None,
                workers: 0,
            });
            // The overcommit phase follows a first phase that verified (with `--corrupt`
            // the first phase is meant to fail: there is none).
            let first_ok =
                error.is_none() && corrupt.is_none() && report.as_ref().is_some_and(|r| r.verified);
            let (overcommit, oc_error) = if first_ok {
                demo_overcommit(*json, *events, report.as_ref())
            } else {
                (None, None)
            };
            let fork_printed = first_ok && !*json && !*events;
            let demo = report.map(|fork| DemoReport {
                every_phase_verified: fork.verified
                    && overcommit.as_ref().is_none_or(|o| o.verified),
                fork,
                overcommit,
                fork_printed,
            });
            finish(*json, *events, demo, error.or(oc_error), print_demo)
        }
        // They keep their own exit statuses (see their modules).
        Cmd::Serve(a) => return cli::serve::cmd_serve(a),
        Cmd::Ctl(a) => return cli::ctl::cmd_ctl(a),
    };
    match error {
        Some(e) => {
            eprintln!("vmm: {e}");
            ExitCode::from(e.code())
        }
        None if verified => ExitCode::SUCCESS,
        None => {
            eprintln!("vmm: a verify found mismatches (see the report)");
            ExitCode::from(1)
        }
    }
}

/// A report's overall verdict.
trait Verdict {
    fn verified(&self) -> bool;
}

impl Verdict for RunReport {
    fn verified(&self) -> bool {
        self.verified
    }
}

impl Verdict for ForkReport {
    fn verified(&self) -> bool {
        self.verified
    }
}

/// `vmm demo`'s report: the fork phase's fields at the top level (as `vmm fork --json`
/// has them) and the overcommit phase's report under `overcommit` (`null` when it did not
/// run: the first phase failed, or `--corrupt`).
#[derive(Debug, serde::Serialize)]
struct DemoReport {
    #[serde(flatten)]
    fork: ForkReport,
    overcommit: Option<ForkReport>,
    /// Both phases verified (`verified` above is the first phase's).
    every_phase_verified: bool,
    /// The text output showed the first phase's table already.
    #[serde(skip)]
    fork_printed: bool,
}

impl Verdict for DemoReport {
    fn verified(&self) -> bool {
        self.every_phase_verified
    }
}

fn print_demo(out: &mut dyn std::io::Write, r: &DemoReport) -> std::io::Result<()> {
    use cli::fork::{DEMO_OC_CLONES, DEMO_OC_HOST, DEMO_OC_MEM, DEMO_OC_TOUCHED};
    if !r.fork_printed {
        print_fork(out, &r.fork)?;
    }
    if let Some(oc) = &r.overcommit {
        writeln!(
            out,
            "\nOvercommit: 1 parent + {DEMO_OC_CLONES} clones of {DEMO_OC_MEM} touch about \
             {DEMO_OC_TOUCHED} in {DEMO_OC_HOST} of host memory (--host-memory {DEMO_OC_HOST}, a \
             swap file in the temp dir):\n"
        )?;
        print_fork(out, oc)?;
    }
    Ok(())
}

/// The demo's overcommit phase: a fork whose VMs together touch about twice the host
/// memory they are given, so reclaim swaps all the time. Its events (with `--events`)
/// follow the first phase's, after a `stage` event naming it; its report is returned for
/// the demo's. Text output comes at the end with the first phase's, so a terminal shows
/// the first table while this phase runs.
fn demo_overcommit(
    json: bool,
    events: bool,
    first: Option<&ForkReport>,
) -> (Option<ForkReport>, Option<CliError>) {
    use cli::fork::{
        DEMO_OC_CLONES, DEMO_OC_HOST, DEMO_OC_MEM, DEMO_OC_PHASE1, DEMO_OC_PHASE2, DEMO_OC_TOUCHED,
    };
    use std::io::Write;
    if events {
        let line = serde_json::json!({
            "event": "stage",
            "what": format!(
                "overcommit phase: 1 parent + {DEMO_OC_CLONES} clones of {DEMO_OC_MEM} touch \
                 about {DEMO_OC_TOUCHED} in {DEMO_OC_HOST} of host memory"
            ),
        });
        let _ = writeln!(std::io::stdout(), "{line}");
    } else if !json {
        // The first table now: the overcommit phase takes a few seconds.
        if let Some(r) = first {
            let mut out = std::io::stdout().lock();
            let _ = print_fork(&mut out, r);
            let _ = out.flush();
        }
    }
    let common = Common {
        mem: DEMO_OC_MEM.into(),
        vcpus: 1,
        pool: None,
        swap: None,
        host_memory: Some(DEMO_OC_HOST.into()),
        nodes: 1,
        policy: guestmem::NodePolicy::FirstTouch,
        allocator: AllocatorArg::Magazine,
        rmap: RmapArg::Chain,
        cpu: None,
        timeout: None,
        json,
        events,
        corrupt: None,
    };
    cmd_fork(&ForkParams {
        common: &common,
        clones: DEMO_OC_CLONES,
        phase1: DEMO_OC_PHASE1,
        phase2: DEMO_OC_PHASE2,
        grandchild: false,
        shells: false,
        demo: false,
        events,
        parent: vmm::ParentMode::Rebirth,
        live_move: None,
        vcpu_nodes: None,
        workers: 0,
    })
}

/// Writes the report (text, `--json`, or the last `--events` line) and gives the verdict
/// and the error to exit with (the command's own first, else a report that could not be
/// written).
fn finish<T: serde::Serialize + Verdict>(
    json: bool,
    events: bool,
    report: Option<T>,
    error: Option<CliError>,
    text: impl FnOnce(&mut dyn std::io::Write, &T) -> std::io::Result<()>,
) -> (bool, Option<CliError>) {
    let Some(r) = report else {
        return (false, error);
    };
    let written = if events {
        cli::report::emit_event_line(&r)
    } else {
        emit(json, &r, text)
    };
    let error = match (error, written) {
        (Some(e), Err(w)) => {
            // Both said, unless both are the same failure to write.
            if !matches!(e, CliError::Report(_)) {
                eprintln!("vmm: {w}");
            }
            Some(e)
        }
        (e, w) => e.or(w.err()),
    };
    (r.verified(), error)
}
