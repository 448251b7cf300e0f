//! The drill: proof, with numbers, that a failing cache never owns a
//! request.
//!
//! `safedisk-proxy drill` needs no set-up. It starts, in one process and
//! over loopback TCP:
//!
//! - a synthetic upstream serving deterministic artifacts for all five
//!   ecosystems at their real paths ([`upstream`]);
//! - for each scenario, a fresh cache (the disk backend in a temporary
//!   directory, the disk backend on a size-limited tmpfs when the process
//!   may mount one, or the object store backend over an in-process S3
//!   server), wrapped in a fault injector, and SafeDisk's proxy in front of
//!   it;
//! - real HTTP clients downloading through the proxy and checking every
//!   byte against the artifact's SHA-256.
//!
//! Each fault of the matrix ([`scenario::Fault`]) runs with each selected
//! concurrency (clients per ecosystem; the selected ecosystems run at the
//! same time). Then the same scenario runs through a naive inline tee
//! ([`naive`]) on an identical cache. For each ecosystem the report gives
//! whether the clients' bytes were intact, the time from the fault to each
//! client being done (p50, p99), whether the upstream connections were
//! closed, and the connections, fds, tasks and temp files still held after
//! a grace period ([`report`]).
//!
//! A check passes when the bytes are right, the connections are closed and
//! nothing else is held, no partial entry is readable, and both unblock p99
//! and the time the connections outlive the clients are under half the
//! naive server's write timeout. The exit status is non-zero when any SafeDisk check
//! fails; the naive tee's checks are figures, expected to fail.

pub mod naive;
pub mod report;
pub mod scenario;
pub mod upstream;
pub mod witness;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use report::{Report, Settings};
use scenario::{FILL_IDLE_DEADLINE, Fault, Rig, Scenario, Side};

use crate::ecosystem::Ecosystem;

/// Drill options. Empty lists select the defaults.
#[derive(Debug, Clone, clap::Args)]
pub struct DrillArgs {
    /// Ecosystems to drill (npm, pypi, crates, maven, go); repeat or
    /// separate with commas. Default: all five.
    #[arg(long = "ecosystem", value_delimiter = ',', value_parser = parse_ecosystem)]
    pub ecosystems: Vec<Ecosystem>,
    /// Faults to inject (enospc, edquot, short-write, eio, fsync, commit,
    /// stall, slow, s3-part, s3-stall, client-abort, truncation,
    /// tmpfs-enospc); repeat or separate with commas. Default: all.
    #[arg(long = "fault", value_delimiter = ',', value_parser = parse_fault)]
    pub faults: Vec<Fault>,
    /// Concurrent clients per ecosystem; repeat or separate with commas.
    /// Default: 1 and 64.
    #[arg(long = "concurrency", value_delimiter = ',')]
    pub concurrency: Vec<usize>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Draw connections held over time, naive tee against SafeDisk, as an
    /// SVG here.
    #[arg(long)]
    pub svg: Option<PathBuf>,
    /// The naive server's write timeout, in milliseconds; checks fail when
    /// unblock p99 reaches half of it.
    #[arg(long, default_value_t = 2000)]
    pub write_timeout_ms: u64,
}

impl Default for DrillArgs {
    /// Every ecosystem and fault, concurrency 1 and 64, no files, a 2 s
    /// naive write timeout.
    fn default() -> Self {
        Self {
            ecosystems: Vec::new(),
            faults: Vec::new(),
            concurrency: Vec::new(),
            json: None,
            svg: None,
            write_timeout_ms: naive::DEFAULT_WRITE_TIMEOUT.as_millis() as u64,
        }
    }
}

fn parse_ecosystem(name: &str) -> Result<Ecosystem, String> {
    name.trim()
        .parse()
        .map_err(|e: crate::ecosystem::UnknownEcosystem| e.to_string())
}

fn parse_fault(name: &str) -> Result<Fault, String> {
    name.trim().parse()
}

/// Runs the drill: prints progress on stderr and the table on stdout,
/// writes the JSON and SVG files asked for, and fails when any SafeDisk
/// check fails or the drill cannot start.
pub async fn run(args: DrillArgs) -> ExitCode {
    let report = match execute(&args).await {
        Ok(report) => report,
        Err(err) => {
            eprintln!("safedisk-proxy drill: {err}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report::table(&report));

    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).expect("the report serializes");
        if let Err(err) = std::fs::write(path, json + "\n") {
            eprintln!(
                "safedisk-proxy drill: cannot write {}: {err}",
                path.display()
            );
            return ExitCode::from(2);
        }
    }
    if let Some(path) = &args.svg
        && let Err(err) = std::fs::write(path, report::svg(&report))
    {
        eprintln!(
            "safedisk-proxy drill: cannot write {}: {err}",
            path.display()
        );
        return ExitCode::from(2);
    }
    if report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Runs the selected scenarios, each through SafeDisk then the naive tee,
/// one at a time so resource counts belong to one scenario, and returns the
/// report. Progress goes to stderr.
///
/// # Errors
///
/// When the upstream or the S3 server cannot start.
pub async fn execute(args: &DrillArgs) -> Result<Report, String> {
    let started = Instant::now();
    let ecosystems = if args.ecosystems.is_empty() {
        Ecosystem::ALL.to_vec()
    } else {
        dedup(&args.ecosystems)
    };
    let faults = if args.faults.is_empty() {
        Fault::ALL.to_vec()
    } else {
        dedup(&args.faults)
    };
    let concurrency = if args.concurrency.is_empty() {
        vec![1, 64]
    } else {
        dedup(&args.concurrency)
    };
    if concurrency.contains(&0) {
        return Err("concurrency must be at least 1".to_owned());
    }
    let write_timeout = Duration::from_millis(args.write_timeout_ms.max(1));
    let bound = write_timeout / 2;

    // What the scenarios share: the upstream, the S3 server, and whether
    // tmpfs mounts work here.
    let upstream =
        upstream::Upstream::start().map_err(|e| format!("cannot start the upstream: {e}"))?;
    let s3 = if faults.iter().any(|f| f.needs_s3()) {
        let server = safedisk_s3::testing::S3TestServer::start()
            .await
            .map_err(|e| format!("cannot start the s3 server: {e}"))?;
        Some(server)
    } else {
        None
    };
    let tmpfs_refused = if faults.contains(&Fault::TmpfsFull) {
        let refused = scenario::probe_tmpfs().err();
        if let Some(why) = &refused {
            eprintln!("drill: tmpfs-enospc skipped: {why} (needs root or a mount namespace)");
        }
        refused
    } else {
        None
    };
    let rig = Rig {
        upstream,
        s3,
        tmpfs_refused,
        write_timeout,
        // Long enough for a stalled fill to meet its idle deadline and for
        // a busy S3 server to answer the aborts; it ends early when
        // everything is released.
        grace: FILL_IDLE_DEADLINE + Duration::from_secs(4),
    };

    let total: usize = faults
        .iter()
        .map(|f| {
            dedup(
                &concurrency
                    .iter()
                    .map(|&c| f.clients(c))
                    .collect::<Vec<_>>(),
            )
            .len()
                * 2
        })
        .sum();
    let mut outcomes = Vec::with_capacity(total);
    let mut id = 0;
    for &fault in &faults {
        let mut ran = Vec::new();
        for &asked in &concurrency {
            let clients = fault.clients(asked);
            if clients != asked {
                eprintln!(
                    "drill: {fault} runs {clients} clients per ecosystem, not {asked} \
                     (object store faults are capped)"
                );
            }
            if ran.contains(&clients) {
                continue;
            }
            ran.push(clients);
            for side in [Side::SafeDisk, Side::Naive] {
                id += 1;
                let scenario = Scenario {
                    id,
                    fault,
                    concurrency: clients,
                    ecosystems: ecosystems.clone(),
                    side,
                };
                let outcome = scenario::run(&rig, scenario).await;
                eprintln!("{}", progress_line(id, total, &outcome, bound));
                outcomes.push(outcome);
            }
        }
    }

    let settings = Settings {
        unblock_bound_ms: bound.as_millis() as u64,
        grace_ms: rig.grace.as_millis() as u64,
        fill_idle_deadline_ms: FILL_IDLE_DEADLINE.as_millis() as u64,
        artifact_bytes: upstream::Size::Small.bytes(),
        s3_artifact_bytes: upstream::Size::Large.bytes(),
        sample_interval_ms: scenario::SAMPLE_INTERVAL.as_millis() as u64,
    };
    Ok(report::assemble(
        &outcomes,
        bound,
        write_timeout,
        settings,
        started.elapsed(),
    ))
}

fn dedup<T: PartialEq + Copy>(items: &[T]) -> Vec<T> {
    let mut out = Vec::new();
    for &item in items {
        if !out.contains(&item) {
            out.push(item);
        }
    }
    out
}

/// `[ 3/52] safedisk stall c=64: 5/5 pass, p99 12 ms, held 0/0/0/0 (1.3 s)`.
fn progress_line(n: usize, total: usize, outcome: &scenario::Outcome, bound: Duration) -> String {
    let scenario = &outcome.scenario;
    let head = format!(
        "[{n:>3}/{total}] {:<8} {:<13} c={:<3}",
        scenario.side.as_str(),
        scenario.fault.as_str(),
        scenario.concurrency
    );
    if let Some(why) = &outcome.skipped {
        return format!("{head} skipped: {why}");
    }
    let checks = report::checks_of(outcome, bound);
    let passed = checks.iter().filter(|c| c.passed).count();
    let p99 = checks.iter().map(|c| c.unblock_ms_p99).fold(0.0, f64::max);
    let bytes_ok = checks.iter().all(|c| c.client_bytes_ok != Some(false));
    let held = outcome.held;
    format!(
        "{head} {passed}/{} pass, bytes {}, unblock p99 {p99:.0} ms, held {}/{}/{}/{} ({:.1} s)",
        checks.len(),
        if bytes_ok { "ok" } else { "BROKEN" },
        held.connections,
        held.fds,
        held.tasks,
        held.temp_files,
        outcome.elapsed.as_secs_f64()
    )
}
