//! The `vmm` program's pieces, one concern each: [`args`] (the clap command line),
//! [`limits`] (checks on sizes, counts and sums of user input; opening KVM and the pool),
//! [`steps`] (running a workload's steps on a VM's vCPUs against `--timeout`), [`run`] and
//! [`fork`] (the subcommands), [`report`] (what they print), [`feedback`] (progress, `--events`, Ctrl-C) and [`error`] (why the program
//! stopped, and its exit status).

pub(crate) mod args;
/// `vmm ctl`: the control API's client.
pub(crate) mod ctl;
pub(crate) mod error;
pub(crate) mod feedback;
pub(crate) mod fork;
pub(crate) mod limits;
pub(crate) mod report;
pub(crate) mod run;
/// `vmm serve`: a long-running VMM under a control API.
pub(crate) mod serve;
pub(crate) mod steps;
