//! SVG charts of an experiment's rows, written beside its JSON: line charts (one line per
//! variant, a metric against a numeric parameter, linear or log axes) and bar charts (one
//! bar per row that has the metric, for experiments whose rows differ by design rather
//! than by a size).
//!
//! Written by hand (a few SVG elements) rather than with a plotting crate: plotters needs
//! a font backend (font-kit and the host's fontconfig) to lay out text, which CI machines
//! need not have; an SVG `<text>` element needs none.

use std::fmt::Write as _;
use std::path::PathBuf;

use crate::Experiment;

/// What to draw.
#[derive(Debug, Clone, Copy)]
pub struct Chart<'a> {
    /// The file is `<experiment>-<stem>.svg`.
    pub stem: &'a str,
    /// The title line.
    pub title: &'a str,
    /// The numeric row parameter on the x axis.
    pub x: &'a str,
    /// The metric on the y axis.
    pub y: &'a str,
    /// Logarithmic x axis.
    pub log_x: bool,
    /// Logarithmic y axis.
    pub log_y: bool,
    /// Only rows whose parameters have these values.
    pub only: &'a [(&'a str, f64)],
}

/// A bar chart: one horizontal bar per row that has `y` (and the `only` parameters),
/// labelled with its variant and parameters.
#[derive(Debug, Clone, Copy)]
pub struct Bars<'a> {
    /// The file is `<experiment>-<stem>.svg`.
    pub stem: &'a str,
    /// The title line.
    pub title: &'a str,
    /// The metric the bars show.
    pub y: &'a str,
    /// Only rows whose parameters have these values.
    pub only: &'a [(&'a str, f64)],
}

const W: f64 = 640.0;
const H: f64 = 400.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
];

/// Escapes text for SVG.
fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A value as an axis label.
fn label(v: f64) -> String {
    let a = v.abs();
    if a >= 1e6 {
        format!("{:.3}M", v / 1e6)
    } else if a >= 1e4 {
        format!("{:.0}k", v / 1e3)
    } else if a >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else if a >= 0.1 {
        format!("{v:.2}")
    } else {
        format!("{v:.1e}")
    }
}

/// An axis: maps values to `[0, 1]`.
#[derive(Debug, Clone, Copy)]
struct Axis {
    lo: f64,
    hi: f64,
    log: bool,
}

impl Axis {
    fn new(values: impl Iterator<Item = f64> + Clone, log: bool) -> Axis {
        let ok = |v: &f64| v.is_finite() && (!log || *v > 0.0);
        let lo = values.clone().filter(ok).fold(f64::INFINITY, f64::min);
        let hi = values.filter(ok).fold(f64::NEG_INFINITY, f64::max);
        let (lo, hi) = if lo.is_finite() { (lo, hi) } else { (1.0, 1.0) };
        let (lo, hi) = if log {
            (
                10f64.powf(lo.log10().floor()),
                10f64.powf(hi.log10().ceil()),
            )
        } else {
            (lo.min(0.0), if hi > 0.0 { hi * 1.05 } else { 1.0 })
        };
        let hi = if hi <= lo { lo + 1.0 } else { hi };
        Axis { lo, hi, log }
    }

    fn at(&self, v: f64) -> f64 {
        if self.log {
            (v.log10() - self.lo.log10()) / (self.hi.log10() - self.lo.log10())
        } else {
            (v - self.lo) / (self.hi - self.lo)
        }
    }

    fn ticks(&self) -> Vec<f64> {
        if self.log {
            let (a, b) = (self.lo.log10() as i32, self.hi.log10() as i32);
            (a..=b).map(|e| 10f64.powi(e)).collect()
        } else {
            (0..=4)
                .map(|i| self.lo + (self.hi - self.lo) * f64::from(i) / 4.0)
                .collect()
        }
    }
}

impl Experiment {
    /// The chart's path: beside the JSON, `<experiment>-<stem>.svg`.
    pub fn chart_path(&self, stem: &str) -> PathBuf {
        self.path()
            .with_file_name(format!("{}-{stem}.svg", self.experiment))
    }

    /// Draws `c` from the rows that have both its parameter and its metric, one line per
    /// variant in order of first appearance.
    pub fn chart_svg(&self, c: &Chart<'_>) -> String {
        let points: Vec<(&str, f64, f64)> = self
            .selected(c.only)
            .filter_map(|r| {
                let x = r.params.get(c.x)?.as_f64()?;
                let y = *r.metrics.get(c.y)?;
                Some((r.variant.as_str(), x, y))
            })
            .collect();
        let mut variants: Vec<&str> = Vec::new();
        for (v, _, _) in &points {
            if !variants.contains(v) {
                variants.push(v);
            }
        }
        let xa = Axis::new(points.iter().map(|p| p.1), c.log_x);
        let ya = Axis::new(points.iter().map(|p| p.2), c.log_y);
        let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
        let px = |x: f64| LEFT + xa.at(x) * pw;
        let py = |y: f64| TOP + (1.0 - ya.at(y)) * ph;
        let mut s = svg_open(H, LEFT + pw / 2.0, c.title);
        // Axes, ticks and grid.
        let _ = writeln!(
            s,
            r##"<path d="M{LEFT} {TOP} V{} H{}" fill="none" stroke="#333"/>"##,
            TOP + ph,
            LEFT + pw
        );
        for t in xa.ticks() {
            let x = px(t);
            let _ = writeln!(
                s,
                r##"<line x1="{x}" y1="{TOP}" x2="{x}" y2="{}" stroke="#eee"/><text x="{x}" y="{}" text-anchor="middle">{}</text>"##,
                TOP + ph,
                TOP + ph + 16.0,
                label(t)
            );
        }
        for t in ya.ticks() {
            let y = py(t);
            let _ = writeln!(
                s,
                r##"<line x1="{LEFT}" y1="{y}" x2="{}" y2="{y}" stroke="#eee"/><text x="{}" y="{}" text-anchor="end">{}</text>"##,
                LEFT + pw,
                LEFT - 6.0,
                y + 4.0,
                label(t)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}{}</text>"#,
            LEFT + pw / 2.0,
            H - 12.0,
            esc(c.x),
            if c.log_x { " (log)" } else { "" }
        );
        let _ = writeln!(
            s,
            r#"<text x="16" y="{}" text-anchor="middle" transform="rotate(-90 16 {})">{}{}</text>"#,
            TOP + ph / 2.0,
            TOP + ph / 2.0,
            esc(c.y),
            if c.log_y { " (log)" } else { "" }
        );
        // One line (and its points) per variant, and the legend.
        for (i, v) in variants.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let mut pts: Vec<(f64, f64)> = points
                .iter()
                .filter(|p| p.0 == *v)
                .filter(|p| (!c.log_x || p.1 > 0.0) && (!c.log_y || p.2 > 0.0))
                .map(|p| (px(p.1), py(p.2)))
                .collect();
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let path: Vec<String> = pts.iter().map(|(x, y)| format!("{x:.1},{y:.1}")).collect();
            let _ = writeln!(
                s,
                r#"<polyline points="{}" fill="none" stroke="{colour}" stroke-width="2"/>"#,
                path.join(" ")
            );
            for (x, y) in &pts {
                let _ = writeln!(
                    s,
                    r#"<circle cx="{x:.1}" cy="{y:.1}" r="3" fill="{colour}"/>"#
                );
            }
            let ly = TOP + 10.0 + 18.0 * i as f64;
            let _ = writeln!(
                s,
                r#"<line x1="{}" y1="{ly}" x2="{}" y2="{ly}" stroke="{colour}" stroke-width="2"/><text x="{}" y="{}">{}</text>"#,
                W - RIGHT + 12.0,
                W - RIGHT + 32.0,
                W - RIGHT + 38.0,
                ly + 4.0,
                esc(v)
            );
        }
        s.push_str("</svg>\n");
        s
    }

    /// The rows whose parameters have the values `only` names.
    fn selected<'s>(
        &'s self,
        only: &'s [(&'s str, f64)],
    ) -> impl Iterator<Item = &'s crate::Row> + 's {
        self.rows.iter().filter(move |r| {
            only.iter()
                .all(|(k, v)| r.params.get(*k).and_then(|p| p.as_f64()) == Some(*v))
        })
    }

    /// Draws `b`: a bar per row with its metric, in row order, scaled from zero.
    pub fn bars_svg(&self, b: &Bars<'_>) -> String {
        let bars: Vec<(String, f64)> = self
            .selected(b.only)
            .filter_map(|r| {
                let y = *r.metrics.get(b.y)?;
                let params: Vec<String> = r
                    .params
                    .iter()
                    .map(|(k, v)| match v.as_str() {
                        Some(s) => format!("{k}={s}"),
                        None => format!("{k}={v}"),
                    })
                    .collect();
                let label = if params.is_empty() {
                    r.variant.clone()
                } else {
                    format!("{} {}", r.variant, params.join(" "))
                };
                y.is_finite().then_some((label, y))
            })
            .collect();
        const LABEL: f64 = 260.0;
        const BAR: f64 = 18.0;
        let h = TOP + BOTTOM + BAR * 1.4 * bars.len().max(1) as f64;
        let pw = W - LABEL - 90.0;
        let max = bars.iter().map(|b| b.1).fold(0.0f64, f64::max);
        let scale = if max > 0.0 { pw / max } else { 0.0 };
        let mut s = svg_open(h, W / 2.0, b.title);
        for (i, (label, y)) in bars.iter().enumerate() {
            let top = TOP + BAR * 1.4 * i as f64;
            let width = (y.max(0.0) * scale).max(0.5);
            let colour = COLOURS[i % COLOURS.len()];
            let _ = writeln!(
                s,
                r#"<text x="{}" y="{}" text-anchor="end">{}</text><rect x="{LABEL}" y="{top}" width="{width:.1}" height="{BAR}" fill="{colour}"/><text x="{:.1}" y="{}">{}</text>"#,
                LABEL - 6.0,
                top + BAR - 5.0,
                esc(label),
                LABEL + width + 4.0,
                top + BAR - 5.0,
                label_value(*y)
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{}" text-anchor="middle">{}</text>"#,
            LABEL + pw / 2.0,
            h - 12.0,
            esc(b.y)
        );
        s.push_str("</svg>\n");
        s
    }

    /// Writes `c` beside the JSON and says where (or why not).
    pub fn chart(&self, c: &Chart<'_>) {
        self.write_svg(c.stem, &self.chart_svg(c));
    }

    /// Writes `b` beside the JSON and says where (or why not).
    pub fn bars(&self, b: &Bars<'_>) {
        self.write_svg(b.stem, &self.bars_svg(b));
    }

    fn write_svg(&self, stem: &str, svg: &str) {
        let path = self.chart_path(stem);
        let r = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, svg));
        match r {
            Ok(()) => println!("wrote {}", path.display()),
            Err(e) => eprintln!("could not write {}: {e}", path.display()),
        }
    }
}

/// An SVG of width [`W`] and height `h`: white, with `title` centred at `title_x`.
fn svg_open(h: f64, title_x: f64, title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{h}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{title_x}" y="22" font-size="14" text-anchor="middle">{}</text>"#,
        esc(title)
    );
    s
}

/// A bar's value as text: three significant digits.
fn label_value(v: f64) -> String {
    if v != 0.0 && (v.abs() >= 1e6 || v.abs() < 1e-2) {
        format!("{v:.2e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.3}")
            .trim_end_matches('0')
            .trim_end_matches('.')
            .to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Mode, Row};

    #[test]
    fn a_chart_has_a_line_per_variant_with_its_points() {
        let mut e = Experiment::new("t", Mode::Smoke);
        for n in [1u64, 10, 100] {
            e.push(Row::new("flat").param("n", n).metric("ns", n as f64 * 10.0));
            e.push(Row::new("chain").param("n", n).metric("ns", 20.0));
        }
        e.push(Row::new("other").param("m", 3).metric("ns", 1.0));
        let svg = e.chart_svg(&Chart {
            stem: "walk",
            title: "walk <cost>",
            x: "n",
            y: "ns",
            log_x: true,
            log_y: true,
            only: &[],
        });
        assert_eq!(svg.matches("<polyline").count(), 2, "{svg}");
        assert_eq!(svg.matches("<circle").count(), 6, "{svg}");
        assert!(svg.contains("walk &lt;cost&gt;"));
        assert!(svg.contains(">flat<") && svg.contains(">chain<"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
        assert!(e.chart_path("walk").ends_with("experiments/t-walk.svg"));
    }

    #[test]
    fn a_bar_chart_has_a_bar_per_row_with_the_metric() {
        let mut e = Experiment::new("t", Mode::Smoke);
        e.push(Row::new("standard").param("pages", 8).metric("us", 5.62));
        e.push(Row::new("managed").param("pages", 8).metric("us", 4.54));
        e.push(Row::new("other").metric("ms", 1.0));
        let svg = e.bars_svg(&Bars {
            stem: "first",
            title: "first touch <us>",
            y: "us",
            only: &[],
        });
        // The white background and two bars.
        assert_eq!(svg.matches("<rect").count(), 3, "{svg}");
        assert!(
            svg.contains(">standard pages=8<") && svg.contains(">4.54<"),
            "{svg}"
        );
        assert!(svg.contains("first touch &lt;us&gt;"));
        assert!(!svg.contains("NaN") && !svg.contains("inf"), "{svg}");
    }
}
