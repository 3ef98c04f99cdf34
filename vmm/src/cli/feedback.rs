//! Live feedback while `run`, `fork` and `demo` work: a progress bar on a terminal (stderr,
//! drawn only when stderr is one), one JSON line per event on stdout with `--events`, and
//! Ctrl-C, which stops the guests' work so the partial report is printed before the exit
//! status 130.
//!
//! Events are objects with an `"event"` name: `start` (the whole configuration), `stage`
//! (what the program does now), `vm` (a VM was created or forked), `step` (one workload
//! step finished in one VM: op, pages, mismatches, ms), `verified` (a VM's final verify:
//! pages, mismatches), `failed` (a VM's error), `migrate` (a pass of `run --migrate-to`:
//! pass, to_node, pages and runs moved so far) and, last, `report` (the report the text
//! or `--json` output would show).

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde_json::{Value, json};

use super::steps::StepReport;

/// Makes Ctrl-C (SIGINT) and SIGTERM stop the guests' work instead of killing the process,
/// so the partial report is printed; a second one kills at once (exit 130).
pub(crate) fn catch_interrupts() {
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        // A second signal while the first is being handled exits at once. Registration
        // fails only for signals that cannot be caught; these two can.
        let _ = signal_hook::flag::register_conditional_shutdown(sig, 130, flag());
        let _ = signal_hook::flag::register(sig, flag());
    }
}

/// The flag the signal handlers set (signal-hook stores into it from the handler, which is
/// async-signal-safe).
fn flag() -> Arc<AtomicBool> {
    static FLAG: OnceLock<Arc<AtomicBool>> = OnceLock::new();
    FLAG.get_or_init(|| Arc::new(AtomicBool::new(false)))
        .clone()
}

/// Whether Ctrl-C (or SIGTERM) has been pressed (sent).
pub(crate) fn interrupted() -> bool {
    flag().load(Ordering::Relaxed)
}

/// The progress bar and the event stream of one command.
#[derive(Debug)]
pub(crate) struct Feedback {
    bar: ProgressBar,
    events: Option<Mutex<EventSink>>,
}

/// Where events go, and whether writing them has failed (a closed pipe: stop writing).
#[derive(Debug)]
struct EventSink {
    failed: Option<std::io::Error>,
}

impl Feedback {
    /// Feedback for work of `total` units: a bar when `bar` (and stderr is a terminal), JSON
    /// lines on stdout when `events`.
    pub(crate) fn new(total: u64, bar: bool, events: bool) -> Feedback {
        let b = if bar {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {bar:32} {pos}/{len} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(100));
            b
        } else {
            ProgressBar::hidden()
        };
        Feedback {
            bar: b,
            events: events.then(|| Mutex::new(EventSink { failed: None })),
        }
    }

    /// One JSON line `{"event": name, ...fields}` (fields an object).
    pub(crate) fn event(&self, name: &str, fields: Value) {
        let Some(sink) = &self.events else { return };
        let mut line = json!({ "event": name });
        if let (Some(obj), Value::Object(f)) = (line.as_object_mut(), fields) {
            obj.extend(f);
        }
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        if sink.failed.is_some() {
            return;
        }
        let mut out = std::io::stdout().lock();
        let r = serde_json::to_writer(&mut out, &line)
            .map_err(std::io::Error::from)
            .and_then(|()| out.write_all(b"\n"))
            .and_then(|()| out.flush());
        if let Err(e) = r {
            sink.failed = Some(e);
        }
    }

    /// Why writing an event failed, if it did (a closed pipe is not a failure: it ends
    /// the stream quietly).
    pub(crate) fn write_error(&self) -> Option<std::io::Error> {
        let sink = self.events.as_ref()?;
        let mut sink = sink.lock().unwrap_or_else(|p| p.into_inner());
        sink.failed
            .take()
            .filter(|e| e.kind() != std::io::ErrorKind::BrokenPipe)
    }

    /// A progress message on the bar only (no event: the caller sends its own).
    pub(crate) fn note(&self, msg: impl Into<String>) {
        self.bar.set_message(msg.into());
    }

    /// What the program does now.
    pub(crate) fn stage(&self, msg: impl Into<String>) {
        let msg = msg.into();
        self.event("stage", json!({ "what": msg }));
        self.bar.set_message(msg);
    }

    /// A VM appeared (`how`: created, forked).
    pub(crate) fn vm(&self, who: &str, how: &str, ms: Option<f64>) {
        self.event("vm", json!({ "vm": who, "how": how, "ms": ms }));
        self.bar.inc(1);
    }

    /// `who` finished a step.
    pub(crate) fn step(&self, who: &str, s: &StepReport) {
        self.event("step", json!({ "vm": who, "step": s }));
        self.bar.inc(1);
    }

    /// `who`'s final verify.
    pub(crate) fn verified(&self, who: &str, pages: u64, mismatches: u64) {
        self.event(
            "verified",
            json!({ "vm": who, "pages": pages, "mismatches": mismatches }),
        );
        self.bar.inc(1);
    }

    /// `who` failed with `error`.
    pub(crate) fn failed(&self, who: &str, error: &str) {
        self.event("failed", json!({ "vm": who, "error": error }));
        self.bar.println(format!("{who}: {error}"));
    }

    /// Clears the bar (before the report is printed).
    pub(crate) fn finish(&self) {
        self.bar.finish_and_clear();
    }
}
