//! The drill's report: checks per fault, ecosystem and concurrency, the
//! naive tee's figures beside them, as a table, JSON and an SVG of
//! connections held over time.

use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::scenario::{Fault, Held, Outcome, SAMPLE_INTERVAL, Side, percentile};

/// The whole report, as `--json` writes it.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// Whether every SafeDisk check passed.
    pub passed: bool,
    /// SafeDisk's checks, one per fault, ecosystem and concurrency.
    pub checks: Vec<Check>,
    /// The same scenarios through the naive tee.
    pub baseline: Baseline,
    /// Scenarios that could not run, and why.
    pub skipped: Vec<Skipped>,
    /// The settings the figures were taken with.
    pub settings: Settings,
    /// Connections held over time, per fault and concurrency, both tees.
    pub timelines: Vec<Timeline>,
    /// Wall time of the whole drill, in milliseconds.
    pub elapsed_ms: u64,
}

/// One fault, ecosystem and concurrency, through one tee.
#[derive(Debug, Clone, Serialize)]
pub struct Check {
    /// `npm`, `pypi`, `crates`, `maven` or `go`.
    pub ecosystem: String,
    /// The fault's name (see `--fault`).
    pub fault: String,
    /// How the fault was made: the fault plan, or a description.
    pub injected_by: String,
    /// Concurrent clients for this ecosystem (all selected ecosystems ran
    /// at once).
    pub concurrency: usize,
    /// Bytes right, connections released and nothing held, no partial
    /// entry readable, unblock p99 under the bound.
    pub passed: bool,
    /// Every client got exactly the artifact; for a truncated upstream,
    /// every client saw an error, never a complete-looking body; `null`
    /// where the clients leave on purpose.
    pub client_bytes_ok: Option<bool>,
    /// Clients whose request or body failed.
    pub client_errors: usize,
    /// Median time from the fault to the client being done, in ms.
    pub unblock_ms_p50: f64,
    /// 99th percentile of the same, in ms.
    pub unblock_ms_p99: f64,
    /// Whether every connection to the upstream was closed afterwards.
    pub upstream_closed: bool,
    /// Time from the last client being done to every connection to the
    /// proxy and the upstream being closed, in ms (shared by the
    /// ecosystems of one scenario).
    pub release_ms: f64,
    /// Connections held (proxy and upstream ports) integrated over the
    /// scenario, in connection-seconds: the area under its timeline
    /// (shared by the ecosystems of one scenario).
    pub connection_seconds: f64,
    /// What was still held after the grace period (shared by the
    /// ecosystems of one scenario, which run in one process at once).
    pub held_after: HeldAfter,
    /// Entries readable afterwards whose bytes are not the artifact's.
    pub partial_entries: usize,
    /// Entries readable afterwards with the artifact's exact bytes.
    pub complete_entries: usize,
    /// Faults injected for this ecosystem's keys (on the tmpfs: fills
    /// that met a real error).
    pub faults_injected: usize,
    /// Why it failed; empty when it passed.
    pub failures: Vec<String>,
}

/// Resources still held after the grace period, above the baseline.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct HeldAfter {
    /// TCP connections to the proxy's port and the upstream's.
    pub connections: usize,
    /// File descriptors.
    pub fds: usize,
    /// Tokio tasks.
    pub tasks: usize,
    /// Unpublished fills: temp files, open multipart uploads.
    pub temp_files: usize,
}

impl From<Held> for HeldAfter {
    fn from(held: Held) -> Self {
        Self {
            connections: held.connections,
            fds: held.fds,
            tasks: held.tasks,
            temp_files: held.temp_files,
        }
    }
}

/// The naive tee's figures.
#[derive(Debug, Clone, Serialize)]
pub struct Baseline {
    /// What the naive tee does.
    pub description: String,
    /// Its server's write timeout, in ms.
    pub write_timeout_ms: u64,
    /// How many of its checks passed the same criteria.
    pub passed: usize,
    /// How many ran.
    pub total: usize,
    /// Its checks, in the same shape as SafeDisk's.
    pub checks: Vec<Check>,
}

/// A scenario that did not run.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// The fault.
    pub fault: String,
    /// The concurrency.
    pub concurrency: usize,
    /// Which tee.
    pub side: String,
    /// Why.
    pub reason: String,
}

/// The settings of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    /// A check fails when unblock p99 reaches this, in ms.
    pub unblock_bound_ms: u64,
    /// Longest wait for resources to be released, in ms.
    pub grace_ms: u64,
    /// Idle deadline of SafeDisk's fills, in ms.
    pub fill_idle_deadline_ms: u64,
    /// Bytes of the artifacts of disk faults.
    pub artifact_bytes: usize,
    /// Bytes of the artifacts of object store faults.
    pub s3_artifact_bytes: usize,
    /// Interval of the timelines' samples, in ms.
    pub sample_interval_ms: u64,
}

/// Connections held over one scenario, both tees.
#[derive(Debug, Clone, Serialize)]
pub struct Timeline {
    /// The fault.
    pub fault: String,
    /// The concurrency.
    pub concurrency: usize,
    /// Samples through SafeDisk's proxy.
    pub safedisk: Vec<u32>,
    /// Samples through the naive tee.
    pub naive: Vec<u32>,
}

/// Turns one scenario's outcome into checks, one per ecosystem.
pub fn checks_of(outcome: &Outcome, bound: Duration) -> Vec<Check> {
    let bound_ms = bound.as_secs_f64() * 1000.0;
    let fault = outcome.scenario.fault;
    let connection_seconds =
        outcome.timeline.iter().map(|&n| f64::from(n)).sum::<f64>() * SAMPLE_INTERVAL.as_secs_f64();
    outcome
        .rows
        .iter()
        .map(|row| {
            let p50 = percentile(&row.unblock_ms, 50.0);
            let p99 = percentile(&row.unblock_ms, 99.0);
            let mut failures = Vec::new();
            if row.client_bytes_ok == Some(false) {
                failures.push(if fault == Fault::Truncation {
                    "a truncated body looked complete".to_owned()
                } else {
                    "client bytes broken".to_owned()
                });
            }
            if !outcome.upstream_closed {
                failures.push("upstream connection held".to_owned());
            }
            if !outcome.held.is_clear() {
                failures.push("resources held after the grace period".to_owned());
            }
            let release_ms = outcome.release.as_secs_f64() * 1000.0;
            if release_ms >= bound_ms {
                failures.push(format!(
                    "connections held {release_ms:.0} ms after the clients"
                ));
            }
            if row.partial_entries > 0 {
                failures.push(format!("{} partial entries readable", row.partial_entries));
            }
            if p99 >= bound_ms {
                failures.push(format!("unblock p99 {p99:.0} ms over {bound_ms:.0} ms"));
            }
            Check {
                ecosystem: row.ecosystem.as_str().to_owned(),
                fault: fault.as_str().to_owned(),
                injected_by: fault.describe().to_owned(),
                concurrency: outcome.scenario.concurrency,
                passed: failures.is_empty(),
                client_bytes_ok: row.client_bytes_ok,
                client_errors: row.client_errors,
                unblock_ms_p50: round(p50),
                unblock_ms_p99: round(p99),
                upstream_closed: outcome.upstream_closed,
                release_ms: round(release_ms),
                connection_seconds: round(connection_seconds),
                held_after: outcome.held.into(),
                partial_entries: row.partial_entries,
                complete_entries: row.complete_entries,
                faults_injected: row.faults_injected,
                failures,
            }
        })
        .collect()
}

fn round(ms: f64) -> f64 {
    (ms * 10.0).round() / 10.0
}

/// Assembles the report from every outcome, SafeDisk's and the naive
/// tee's.
pub fn assemble(
    outcomes: &[Outcome],
    bound: Duration,
    write_timeout: Duration,
    settings: Settings,
    elapsed: Duration,
) -> Report {
    let mut checks = Vec::new();
    let mut naive = Vec::new();
    let mut skipped = Vec::new();
    let mut timelines: Vec<Timeline> = Vec::new();
    for outcome in outcomes {
        let scenario = &outcome.scenario;
        if let Some(reason) = &outcome.skipped {
            skipped.push(Skipped {
                fault: scenario.fault.as_str().to_owned(),
                concurrency: scenario.concurrency,
                side: scenario.side.as_str().to_owned(),
                reason: reason.clone(),
            });
            continue;
        }
        let rows = checks_of(outcome, bound);
        let position = timelines.iter().position(|t| {
            t.fault == scenario.fault.as_str() && t.concurrency == scenario.concurrency
        });
        let timeline = match position {
            Some(i) => &mut timelines[i],
            None => {
                timelines.push(Timeline {
                    fault: scenario.fault.as_str().to_owned(),
                    concurrency: scenario.concurrency,
                    safedisk: Vec::new(),
                    naive: Vec::new(),
                });
                timelines.last_mut().expect("just pushed")
            }
        };
        match scenario.side {
            Side::SafeDisk => {
                checks.extend(rows);
                timeline.safedisk = outcome.timeline.clone();
            }
            Side::Naive => {
                naive.extend(rows);
                timeline.naive = outcome.timeline.clone();
            }
        }
    }

    Report {
        passed: !checks.is_empty() && checks.iter().all(|c| c.passed),
        baseline: Baseline {
            description: "writes each chunk to the cache inline before forwarding it, \
                          commits inline before ending the response, takes an upstream \
                          error for the end of the body"
                .to_owned(),
            write_timeout_ms: write_timeout.as_millis() as u64,
            passed: naive.iter().filter(|c| c.passed).count(),
            total: naive.len(),
            checks: naive,
        },
        checks,
        skipped,
        settings,
        timelines,
        elapsed_ms: elapsed.as_millis() as u64,
    }
}

fn bytes_cell(ok: Option<bool>) -> &'static str {
    match ok {
        Some(true) => "ok",
        Some(false) => "BROKEN",
        None => "n/a",
    }
}

fn held_cell(held: &HeldAfter) -> String {
    format!(
        "{}/{}/{}/{}",
        held.connections, held.fds, held.tasks, held.temp_files
    )
}

/// The readable table: one line per check, SafeDisk and the naive tee side
/// by side.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{:<13} {:<6} {:>4} | {:<6} {:>7} {:>7} {:>7} {:>6} {:>9} {:>7} {:<4} | {:<6} {:>7} {:>7} {:>6} {:>9} {:>7} {:<4}",
        "fault",
        "eco",
        "conc",
        "bytes",
        "p50 ms",
        "p99 ms",
        "rel ms",
        "conn·s",
        "held",
        "partial",
        "pass",
        "naive",
        "p99 ms",
        "rel ms",
        "conn·s",
        "held",
        "partial",
        "pass",
    );
    let _ = writeln!(out, "{}", "-".repeat(140));
    for check in &report.checks {
        let naive = report.baseline.checks.iter().find(|n| {
            n.fault == check.fault
                && n.ecosystem == check.ecosystem
                && n.concurrency == check.concurrency
        });
        let _ = write!(
            out,
            "{:<13} {:<6} {:>4} | {:<6} {:>7.1} {:>7.1} {:>7.0} {:>6.1} {:>9} {:>7} {:<4} |",
            check.fault,
            check.ecosystem,
            check.concurrency,
            bytes_cell(check.client_bytes_ok),
            check.unblock_ms_p50,
            check.unblock_ms_p99,
            check.release_ms,
            check.connection_seconds,
            held_cell(&check.held_after),
            check.partial_entries,
            if check.passed { "PASS" } else { "FAIL" },
        );
        match naive {
            Some(n) => {
                let _ = writeln!(
                    out,
                    " {:<6} {:>7.1} {:>7.0} {:>6.1} {:>9} {:>7} {:<4}",
                    bytes_cell(n.client_bytes_ok),
                    n.unblock_ms_p99,
                    n.release_ms,
                    n.connection_seconds,
                    held_cell(&n.held_after),
                    n.partial_entries,
                    if n.passed { "pass" } else { "fail" },
                );
            }
            None => {
                let _ = writeln!(out, " (not run)");
            }
        }
    }
    for skip in &report.skipped {
        let _ = writeln!(
            out,
            "skipped: {} c={} ({}): {}",
            skip.fault, skip.concurrency, skip.side, skip.reason
        );
    }
    let failed: Vec<String> = report
        .checks
        .iter()
        .filter(|c| !c.passed)
        .map(|c| {
            format!(
                "{} {} c={}: {}",
                c.fault,
                c.ecosystem,
                c.concurrency,
                c.failures.join("; ")
            )
        })
        .collect();
    for line in &failed {
        let _ = writeln!(out, "FAILED {line}");
    }
    let _ = writeln!(
        out,
        "\nsafedisk: {}/{} checks passed; naive tee: {}/{} by the same criteria. \
         p50/p99 = unblock (fault to client done); rel = connections outliving the \
         clients; conn·s = connections held integrated over time; held = connections/fds/tasks/temp files after up to {} ms grace; \
         bound {} ms; took {:.1} s",
        report.checks.iter().filter(|c| c.passed).count(),
        report.checks.len(),
        report.baseline.passed,
        report.baseline.total,
        report.settings.grace_ms,
        report.settings.unblock_bound_ms,
        report.elapsed_ms as f64 / 1000.0,
    );
    out
}

/// An SVG of connections held over time: one panel per fault at its
/// highest concurrency, the naive tee against SafeDisk.
pub fn svg(report: &Report) -> String {
    // One panel per fault, at the highest concurrency that ran.
    let mut panels: Vec<&Timeline> = Vec::new();
    for timeline in &report.timelines {
        match panels.iter_mut().find(|p| p.fault == timeline.fault) {
            Some(panel) if panel.concurrency < timeline.concurrency => *panel = timeline,
            Some(_) => {}
            None => panels.push(timeline),
        }
    }

    let (panel_w, panel_h, columns) = (320.0, 170.0, 3usize);
    let rows = panels.len().div_ceil(columns).max(1);
    let (width, height) = (
        panel_w * columns as f64 + 20.0,
        panel_h * rows as f64 + 70.0,
    );
    let interval = SAMPLE_INTERVAL.as_secs_f64();
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        out,
        r#"<rect width="100%" height="100%" fill="white"/><text x="10" y="20" font-size="14">Connections held over time (proxy and upstream ports), naive tee against SafeDisk</text>"#
    );
    let _ = writeln!(
        out,
        r##"<line x1="10" y1="36" x2="30" y2="36" stroke="#c0392b" stroke-width="2"/><text x="34" y="40">naive tee ({} ms write timeout)</text><line x1="230" y1="36" x2="250" y2="36" stroke="#27ae60" stroke-width="2"/><text x="254" y="40">SafeDisk</text>"##,
        report.baseline.write_timeout_ms
    );

    for (i, panel) in panels.iter().enumerate() {
        let x0 = 10.0 + panel_w * (i % columns) as f64;
        let y0 = 55.0 + panel_h * (i / columns) as f64;
        let (plot_x, plot_y, plot_w, plot_h) =
            (x0 + 35.0, y0 + 20.0, panel_w - 50.0, panel_h - 50.0);
        let samples = panel.safedisk.len().max(panel.naive.len()).max(2);
        let peak = panel
            .safedisk
            .iter()
            .chain(&panel.naive)
            .copied()
            .max()
            .unwrap_or(0)
            .max(1);
        let seconds = samples as f64 * interval;
        let _ = writeln!(
            out,
            r##"<text x="{x0}" y="{}" font-weight="bold">{} (c={})</text><rect x="{plot_x}" y="{plot_y}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>"##,
            y0 + 12.0,
            panel.fault,
            panel.concurrency
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" text-anchor="end">{peak}</text><text x="{}" y="{}" text-anchor="end">0</text><text x="{}" y="{}" text-anchor="end">{seconds:.1} s</text>"#,
            plot_x - 3.0,
            plot_y + 9.0,
            plot_x - 3.0,
            plot_y + plot_h,
            plot_x + plot_w,
            plot_y + plot_h + 13.0,
        );
        for (series, color) in [(&panel.naive, "#c0392b"), (&panel.safedisk, "#27ae60")] {
            if series.is_empty() {
                continue;
            }
            let points: Vec<String> = series
                .iter()
                .enumerate()
                .map(|(n, &held)| {
                    let x = plot_x + plot_w * n as f64 / (samples - 1) as f64;
                    let y = plot_y + plot_h - plot_h * f64::from(held) / f64::from(peak);
                    format!("{x:.1},{y:.1}")
                })
                .collect();
            let _ = writeln!(
                out,
                r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
                points.join(" ")
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
