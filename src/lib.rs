//! Shared plumbing for the benchmark programs in `benches/`.
//!
//! Every end-to-end experiment is a `harness = false` program that measures several
//! designs in one run, prints a table with ratios against a baseline variant and writes
//! `target/experiments/<name>.json` in one shape:
//!
//! ```json
//! {"experiment": "pagealloc", "mode": "quick",
//!  "rows": [{"variant": "magazine", "params": {"batch": 8}, "metrics": {"alloc_ns": 31.2}}]}
//! ```
//!
//! The run mode comes from the command line the way cargo passes it:
//! `cargo bench --bench X` passes `--bench` ([`Mode::Full`]), `cargo bench --bench X -- --quick`
//! adds `--quick` ([`Mode::Quick`]: fewer repetitions, every point of the table kept), and
//! `cargo test --benches` passes neither ([`Mode::Smoke`]: tiny sizes, checks that the
//! program runs and its results are sane, measures nothing worth recording).

pub mod chart;
pub mod hostref;
pub mod setup;

pub use chart::{Bars, Chart};

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

/// How thoroughly an experiment runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Run by `cargo test --benches`: smallest sizes, one repetition.
    Smoke,
    /// `cargo bench -- --quick`: every point, fewer repetitions (under a minute).
    Quick,
    /// `cargo bench`: every point, full repetitions.
    Full,
}

impl Mode {
    /// Reads the mode from the process arguments (see the module docs).
    pub fn from_args() -> Mode {
        let args: Vec<String> = std::env::args().collect();
        let bench = args.iter().any(|a| a == "--bench");
        let quick = args.iter().any(|a| a == "--quick");
        match (bench, quick) {
            (_, true) => Mode::Quick,
            (true, false) => Mode::Full,
            (false, false) => Mode::Smoke,
        }
    }

    /// Picks one of three values by mode.
    pub fn pick<T>(self, smoke: T, quick: T, full: T) -> T {
        match self {
            Mode::Smoke => smoke,
            Mode::Quick => quick,
            Mode::Full => full,
        }
    }
}

/// One measured point: a design (`variant`) at some parameters, with its metrics.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// The design or peer measured, e.g. `magazine`, `percpu`, `host-fork`.
    pub variant: String,
    /// The point's parameters, e.g. `{"batch": 8, "threads": 2}`.
    pub params: BTreeMap<String, Value>,
    /// What was measured, e.g. `{"alloc_ns": 31.2}`.
    pub metrics: BTreeMap<String, f64>,
}

impl Row {
    /// A row for `variant` with no parameters or metrics yet.
    pub fn new(variant: impl Into<String>) -> Row {
        Row {
            variant: variant.into(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    /// Adds a parameter.
    pub fn param(mut self, key: &str, value: impl Into<Value>) -> Row {
        self.params.insert(key.to_owned(), value.into());
        self
    }

    /// Adds a metric.
    pub fn metric(mut self, key: &str, value: f64) -> Row {
        self.metrics.insert(key.to_owned(), value);
        self
    }
}

/// An experiment's results, written as JSON and printed as a table.
#[derive(Debug, Clone, Serialize)]
pub struct Experiment {
    /// The experiment's name; also the JSON file's stem.
    pub experiment: String,
    /// The mode it ran in.
    pub mode: Mode,
    /// Machine facts: CPUs, kernel, date.
    pub machine: BTreeMap<String, Value>,
    /// Every measured point.
    pub rows: Vec<Row>,
}

impl Experiment {
    /// Starts an experiment named `name` in `mode`.
    pub fn new(name: &str, mode: Mode) -> Experiment {
        let mut machine = BTreeMap::new();
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        machine.insert("cpus".to_owned(), Value::from(cpus));
        if let Ok(release) = std::fs::read_to_string("/proc/sys/kernel/osrelease") {
            machine.insert("kernel".to_owned(), Value::from(release.trim()));
        }
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        machine.insert("unix_time".to_owned(), Value::from(secs));
        Experiment {
            experiment: name.to_owned(),
            mode,
            machine,
            rows: Vec::new(),
        }
    }

    /// Records a row.
    pub fn push(&mut self, row: Row) {
        self.rows.push(row);
    }

    /// Where the JSON goes: `target/experiments/<name>.json` under the workspace (or
    /// `$CARGO_TARGET_DIR/experiments`).
    pub fn path(&self) -> PathBuf {
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
        target
            .join("experiments")
            .join(format!("{}.json", self.experiment))
    }

    /// Writes the JSON file and returns its path.
    pub fn write_json(&self) -> std::io::Result<PathBuf> {
        let path = self.path();
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let text = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// Writes the JSON file and says where (or why not) on the terminal: the last step of
    /// every experiment program.
    pub fn finish(&self) {
        match self.write_json() {
            Ok(path) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("could not write {}: {e}", self.path().display()),
        }
    }

    /// Renders a table of `metric` for every row, with the ratio of each row's value to
    /// the `baseline` variant's value at the same parameters (`-` when there is none).
    pub fn table(&self, metric: &str, baseline: &str) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "{:<14} {:<40} {:>14} {:>10}",
            "variant",
            "params",
            metric,
            format!("/{baseline}")
        );
        for row in self.rows.iter().filter(|r| r.metrics.contains_key(metric)) {
            let value = row.metrics[metric];
            let base = self
                .rows
                .iter()
                .find(|b| b.variant == baseline && b.params == row.params)
                .and_then(|b| b.metrics.get(metric).copied());
            let ratio = match base {
                Some(b) if b != 0.0 => format_ratio(value / b),
                _ => "-".to_owned(),
            };
            let params = row
                .params
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            let _ = writeln!(
                out,
                "{:<14} {:<40} {:>14} {:>10}",
                row.variant,
                params,
                format_value(value),
                ratio
            );
        }
        out
    }

    /// The value of `metric` for `variant` at `params`, if measured.
    pub fn get(
        &self,
        variant: &str,
        params: &BTreeMap<String, Value>,
        metric: &str,
    ) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| r.variant == variant && &r.params == params)
            .and_then(|r| r.metrics.get(metric).copied())
    }
}

/// A value with two decimals, or three significant digits when it is small.
fn format_value(v: f64) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:.2e}")
    } else {
        format!("{v:.2}")
    }
}

/// A ratio with two decimals, or three significant digits when it is small.
fn format_ratio(r: f64) -> String {
    if r != 0.0 && r.abs() < 0.1 {
        format!("{r:.2e}")
    } else {
        format!("{r:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_ratio_is_against_baseline_at_same_params() {
        let mut e = Experiment::new("t", Mode::Smoke);
        e.push(Row::new("base").param("n", 1).metric("ns", 10.0));
        e.push(Row::new("new").param("n", 1).metric("ns", 5.0));
        e.push(Row::new("new").param("n", 2).metric("ns", 7.0));
        let t = e.table("ns", "base");
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[2].trim_end().ends_with("0.50"), "{t}");
        assert!(lines[3].trim_end().ends_with('-'), "{t}");
    }

    #[test]
    fn json_has_the_documented_shape() {
        let mut e = Experiment::new("shape", Mode::Quick);
        e.push(Row::new("v").param("batch", 8).metric("alloc_ns", 1.5));
        let v: Value = serde_json::to_value(&e).unwrap();
        assert_eq!(v["experiment"], "shape");
        assert_eq!(v["rows"][0]["variant"], "v");
        assert_eq!(v["rows"][0]["params"]["batch"], 8);
        assert_eq!(v["rows"][0]["metrics"]["alloc_ns"], 1.5);
    }
}
