//! A reduced drill over real loopback TCP: two faults, two ecosystems,
//! concurrency 1 and 8. SafeDisk must pass every check, and the naive tee
//! must show the failures the drill exists to expose.

use safedisk_proxy::drill::scenario::Fault;
use safedisk_proxy::drill::{DrillArgs, execute};
use safedisk_proxy::ecosystem::Ecosystem;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn safedisk_passes_and_the_naive_tee_is_caught() {
    let args = DrillArgs {
        ecosystems: vec![Ecosystem::Npm, Ecosystem::Go],
        faults: vec![Fault::Enospc, Fault::Stall],
        concurrency: vec![1, 8],
        ..DrillArgs::default()
    };
    let report = execute(&args).await.expect("the drill starts");
    let failed: Vec<_> = report.checks.iter().filter(|c| !c.passed).collect();
    assert!(report.passed, "safedisk checks failed: {failed:#?}");
    assert_eq!(report.checks.len(), 2 * 2 * 2);
    for check in &report.checks {
        assert_eq!(check.client_bytes_ok, Some(true), "{check:?}");
        assert_eq!(check.partial_entries, 0, "{check:?}");
        assert!(
            check.faults_injected > 0,
            "the fault never fired: {check:?}"
        );
    }

    // Through the naive tee a full disk cuts the clients' bodies short,
    // and a stalled cache holds them until the server's write timeout.
    let naive = &report.baseline.checks;
    assert_eq!(naive.len(), report.checks.len());
    for check in naive.iter().filter(|c| c.fault == "enospc") {
        assert_eq!(check.client_bytes_ok, Some(false), "{check:?}");
    }
    let timeout = report.baseline.write_timeout_ms as f64;
    for check in naive.iter().filter(|c| c.fault == "stall") {
        assert!(!check.passed, "{check:?}");
        assert!(
            check.unblock_ms_p99 >= timeout * 0.9,
            "the naive tee unblocked before its write timeout: {check:?}"
        );
        let safedisk = report
            .checks
            .iter()
            .find(|c| {
                c.fault == check.fault
                    && c.ecosystem == check.ecosystem
                    && c.concurrency == check.concurrency
            })
            .expect("the same scenario through safedisk");
        assert!(safedisk.unblock_ms_p99 < check.unblock_ms_p99 / 4.0);
        assert!(
            safedisk.connection_seconds < check.connection_seconds,
            "safedisk held connections longer: {safedisk:?} against {check:?}"
        );
    }

    // The report carries what `--json` and `--svg` need.
    let json = serde_json::to_value(&report).unwrap();
    for field in ["passed", "checks", "baseline"] {
        assert!(json.get(field).is_some(), "{field} missing");
    }
    let held = &json["checks"][0]["held_after"];
    for field in ["connections", "fds", "tasks", "temp_files"] {
        assert!(held.get(field).is_some(), "held_after.{field} missing");
    }
    let svg = safedisk_proxy::drill::report::svg(&report);
    assert!(svg.starts_with("<svg") && svg.contains("polyline"));
}
