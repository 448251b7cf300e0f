//! The tee: the client always gets exactly the upstream's bytes, and the
//! fill detaches on every kind of cache trouble.

mod support;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::StreamExt;
use safedisk_core::{
    AbandonReason, BodyError, Cache, CacheBackend, ClientGonePolicy, ErrorKind, Fill, FillOutcome,
    LagPolicy, TeePolicy, WriteOptions, tee,
};
use support::{
    DropFlag, Script, ScriptedBackend, assert_nothing_left, concat, failing_upstream, key, payload,
    read_entry, settle_tasks, upstream,
};

/// Collects what a client would receive: the bytes, and the error that
/// ended the body, if any.
async fn drain<S, E>(mut body: safedisk_core::TeeBody<S, E>) -> (Vec<u8>, Option<BodyError<E>>)
where
    S: futures::Stream<Item = Result<Bytes, E>> + Send + 'static,
    E: Send + 'static,
{
    let mut received = Vec::new();
    while let Some(item) = body.next().await {
        match item {
            Ok(chunk) => received.extend_from_slice(&chunk),
            Err(err) => return (received, Some(err)),
        }
    }
    (received, None)
}

fn abandoned_kind(outcome: &FillOutcome) -> Option<ErrorKind> {
    match outcome.abandon_reason() {
        Some(AbandonReason::Cache(kind)) => Some(kind),
        _ => None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_error_after_some_bytes_never_reaches_the_client() {
    let kinds = [
        ErrorKind::NoSpace,
        ErrorKind::QuotaExceeded,
        ErrorKind::FileTooLarge,
        ErrorKind::Io,
        ErrorKind::ReadOnly,
        ErrorKind::ShortWrite,
        ErrorKind::Backend,
    ];
    for kind in kinds {
        let backend = ScriptedBackend::always(Script {
            fail_after: Some((200 * 1024, kind)),
            ..Script::default()
        });
        let chunks = payload(1024 * 1024, 16 * 1024, kind as u8);
        let expected = concat(&chunks);
        let k = key("fails.tgz");

        let options = WriteOptions::new().expected_len(expected.len() as u64);
        let fill = Fill::begin(&*backend, &k, options).await.unwrap();
        let (body, handle) = tee(upstream(chunks, Duration::ZERO), fill, TeePolicy::new());
        let (received, err) = drain(body).await;
        let outcome = handle.await;

        assert!(err.is_none(), "{kind:?}: client saw an error");
        assert!(received == expected, "{kind:?}: client bytes differ");
        assert_eq!(
            abandoned_kind(&outcome),
            Some(kind),
            "{kind:?}: {outcome:?}"
        );
        assert!(
            backend.get(&k).await.unwrap().is_none(),
            "{kind:?}: readable"
        );
        assert_eq!(backend.pending().await.unwrap(), 0, "{kind:?}: writer left");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_writer_is_abandoned_by_the_idle_deadline() {
    let backend = ScriptedBackend::always(Script {
        stall_after: Some(64 * 1024),
        ..Script::default()
    });
    let chunks = payload(40 * 16 * 1024, 16 * 1024, 1);
    let expected = concat(&chunks);
    let k = key("stall.tgz");

    let options = WriteOptions::new().idle_deadline(Duration::from_millis(200));
    let fill = Fill::begin(&*backend, &k, options).await.unwrap();
    // A buffer larger than the body: only the idle deadline can end this fill.
    let policy = TeePolicy::new().buffer_bytes(64 << 20);
    let started = Instant::now();
    let (body, handle) = tee(upstream(chunks, Duration::from_millis(5)), fill, policy);
    let (received, err) = drain(body).await;
    let client_done = started.elapsed();
    let outcome = handle.await;
    let fill_done = started.elapsed();

    assert!(err.is_none());
    assert!(received == expected);
    // 40 chunks at 5 ms is the upstream's pace; 2 s is far from any stall.
    assert!(
        client_done < Duration::from_secs(2),
        "client took {client_done:?}"
    );
    assert_eq!(
        abandoned_kind(&outcome),
        Some(ErrorKind::Stalled),
        "{outcome:?}"
    );
    assert!(
        fill_done < Duration::from_secs(2),
        "fill ended after {fill_done:?}"
    );
    assert_nothing_left(&*backend, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_writer_does_not_slow_the_client_under_abandon() {
    // The writer alone would need 100 x 50 ms = 5 s.
    let backend = ScriptedBackend::always(Script {
        delay_per_write: Some(Duration::from_millis(50)),
        ..Script::default()
    });
    let chunks = payload(100 * 64 * 1024, 64 * 1024, 2);
    let expected = concat(&chunks);
    let k = key("slow.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let policy = TeePolicy::new().buffer_bytes(256 * 1024);
    let started = Instant::now();
    let (body, handle) = tee(upstream(chunks, Duration::ZERO), fill, policy);
    let (received, err) = drain(body).await;
    let client_done = started.elapsed();
    let outcome = handle.await;

    assert!(err.is_none());
    assert!(received == expected);
    assert!(
        client_done < Duration::from_secs(1),
        "client took {client_done:?}"
    );
    assert_eq!(outcome.abandon_reason(), Some(AbandonReason::Lagged));
    // The abort is prompt: the in-flight 50 ms write is cancelled.
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_nothing_left(&*backend, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_writer_holds_the_client_at_most_the_stated_time() {
    let backend = ScriptedBackend::always(Script {
        delay_per_write: Some(Duration::from_millis(50)),
        ..Script::default()
    });
    let chunks = payload(100 * 64 * 1024, 64 * 1024, 3);
    let expected = concat(&chunks);
    let k = key("hold.tgz");
    let max_hold = Duration::from_millis(300);

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let policy = TeePolicy::new()
        .buffer_bytes(256 * 1024)
        .on_lag(LagPolicy::Hold {
            max_total: max_hold,
        });
    let started = Instant::now();
    let (body, handle) = tee(upstream(chunks, Duration::ZERO), fill, policy);
    let (received, err) = drain(body).await;
    let client_done = started.elapsed();
    let outcome = handle.await;

    assert!(err.is_none());
    assert!(received == expected);
    // Held, but for no more than the stated total (plus scheduling slack),
    // far below the writer's 5 s.
    assert!(
        client_done >= max_hold,
        "client was not held: {client_done:?}"
    );
    assert!(
        client_done < max_hold + Duration::from_secs(1),
        "held {client_done:?}"
    );
    assert_eq!(outcome.abandon_reason(), Some(AbandonReason::Lagged));
    assert!(backend.get(&k).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold_lets_a_briefly_slow_writer_finish_the_fill() {
    // 8 writes of 20 ms with a one-chunk buffer: about 160 ms of holding.
    let backend = ScriptedBackend::always(Script {
        delay_per_write: Some(Duration::from_millis(20)),
        ..Script::default()
    });
    let chunks = payload(8 * 1024, 1024, 4);
    let expected = concat(&chunks);
    let k = key("held-ok.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let policy = TeePolicy::new().buffer_bytes(1024).on_lag(LagPolicy::Hold {
        max_total: Duration::from_secs(5),
    });
    let (body, handle) = tee(upstream(chunks, Duration::ZERO), fill, policy);
    let (received, _) = drain(body).await;

    assert!(received == expected);
    assert!(handle.await.is_committed());
    assert_eq!(read_entry(&*backend, &k).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_writer_does_not_touch_the_client() {
    let backend = ScriptedBackend::always(Script {
        panic_on_write: Some(2),
        ..Script::default()
    });
    let chunks = payload(64 * 1024, 4 * 1024, 5);
    let expected = concat(&chunks);
    let k = key("panic.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let (body, handle) = tee(
        upstream(chunks, Duration::from_millis(1)),
        fill,
        TeePolicy::new(),
    );
    let (received, err) = drain(body).await;
    let outcome = handle.await;

    assert!(err.is_none());
    assert!(received == expected);
    assert_eq!(outcome.abandon_reason(), Some(AbandonReason::Panicked));
    assert!(backend.get(&k).await.unwrap().is_none());
    // Unwinding dropped the writer, which aborted it.
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_drops_the_upstream_and_aborts_the_fill() {
    let backend = ScriptedBackend::always(Script::default());
    let chunks = payload(64 * 1024, 1024, 6);
    let (source, upstream_dropped) = DropFlag::new(upstream(chunks, Duration::from_millis(2)));
    let k = key("gone.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let (mut body, handle) = tee(source, fill, TeePolicy::new());
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    assert!(!upstream_dropped.load(Ordering::SeqCst));
    drop(body);

    // At once, not at some timeout: the drop itself released the upstream.
    assert!(upstream_dropped.load(Ordering::SeqCst));
    let outcome = tokio::time::timeout(Duration::from_secs(2), handle)
        .await
        .expect("fill ended promptly");
    assert_eq!(outcome.abandon_reason(), Some(AbandonReason::ClientGone));
    assert_nothing_left(&*backend, &k).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_read_to_its_declared_length_commits_without_reading_the_end() {
    // HTTP servers stop polling once Content-Length bytes are sent, and
    // drop the body without asking for its end.
    let backend = ScriptedBackend::always(Script::default());
    let chunks = payload(64 * 1024, 4096, 11);
    let expected = concat(&chunks);
    let k = key("content-length.tgz");

    let options = WriteOptions::new().expected_len(expected.len() as u64);
    let fill = Fill::begin(&*backend, &k, options).await.unwrap();
    let (mut body, handle) = tee(upstream(chunks, Duration::ZERO), fill, TeePolicy::new());
    let mut received = Vec::new();
    while received.len() < expected.len() {
        received.extend_from_slice(&body.next().await.unwrap().unwrap());
    }
    assert!(http_body::Body::is_end_stream(&body));
    drop(body);

    assert!(handle.await.is_committed());
    assert_eq!(read_entry(&*backend, &k).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_in_background_commits_after_the_client_leaves() {
    let backend = ScriptedBackend::always(Script::default());
    let chunks = payload(64 * 1024, 1024, 7);
    let expected = concat(&chunks);
    let (source, upstream_dropped) = DropFlag::new(upstream(chunks, Duration::from_millis(1)));
    let k = key("background.tgz");

    let options = WriteOptions::new().expected_len(expected.len() as u64);
    let fill = Fill::begin(&*backend, &k, options).await.unwrap();
    let policy = TeePolicy::new().on_client_gone(ClientGonePolicy::FinishInBackground {
        deadline: Duration::from_secs(5),
        max_bytes: 1 << 20,
    });
    let (mut body, handle) = tee(source, fill, policy);
    for _ in 0..3 {
        body.next().await.unwrap().unwrap();
    }
    drop(body);

    let outcome = tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("background fill ended");
    assert!(outcome.is_committed(), "{outcome:?}");
    assert!(upstream_dropped.load(Ordering::SeqCst));
    assert_eq!(read_entry(&*backend, &k).await.unwrap(), expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finish_in_background_respects_its_byte_budget() {
    let backend = ScriptedBackend::always(Script::default());
    let chunks = payload(64 * 1024, 1024, 8);
    let k = key("budget.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let policy = TeePolicy::new().on_client_gone(ClientGonePolicy::FinishInBackground {
        deadline: Duration::from_secs(5),
        max_bytes: 16 * 1024,
    });
    let (mut body, handle) = tee(upstream(chunks, Duration::ZERO), fill, policy);
    body.next().await.unwrap().unwrap();
    drop(body);

    let outcome = handle.await;
    assert_eq!(
        outcome.abandon_reason(),
        Some(AbandonReason::BackgroundBudget)
    );
    assert!(backend.get(&k).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_error_is_passed_on_and_never_committed() {
    let backend = ScriptedBackend::always(Script::default());
    let chunks = payload(8 * 1024, 1024, 9);
    let expected = concat(&chunks);
    let k = key("upstream-error.tgz");

    let fill = Fill::begin(&*backend, &k, WriteOptions::new())
        .await
        .unwrap();
    let (body, handle) = tee(
        failing_upstream(chunks, Duration::ZERO),
        fill,
        TeePolicy::new(),
    );
    let (received, err) = drain(body).await;

    assert!(received == expected);
    assert!(matches!(err, Some(BodyError::Upstream(_))), "{err:?}");
    assert_eq!(
        handle.await.abandon_reason(),
        Some(AbandonReason::UpstreamFailed)
    );
    assert!(backend.get(&k).await.unwrap().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_or_overlong_upstream_is_an_error_and_never_committed() {
    let backend = ScriptedBackend::always(Script::default());
    // 1024 and 2048 are chunk boundaries: the body passes its declared
    // length exactly there before the rest arrives.
    for (declared, sent) in [
        (10_000u64, 5_000usize),
        (1_000, 5_000),
        (1_024, 5_000),
        (2_048, 5_000),
    ] {
        let chunks = payload(sent, 1024, 10);
        let k = key(&format!("length-{declared}-{sent}.tgz"));

        let options = WriteOptions::new().expected_len(declared);
        let fill = Fill::begin(&*backend, &k, options).await.unwrap();
        let (body, handle) = tee(upstream(chunks, Duration::ZERO), fill, TeePolicy::new());
        let (received, err) = drain(body).await;

        match err {
            Some(BodyError::Truncated {
                expected,
                received: got,
            }) => {
                assert!(declared > sent as u64);
                assert_eq!((expected, got), (declared, sent as u64));
                assert_eq!(received.len(), sent);
            }
            Some(BodyError::TooLong { expected, .. }) => {
                assert!(declared < sent as u64);
                assert_eq!(expected, declared);
                // Never more than declared plus the chunk that crossed it.
                assert!(received.len() as u64 <= declared + 1024);
            }
            other => panic!("declared {declared}, sent {sent}: {other:?}"),
        }
        assert_eq!(
            handle.await.abandon_reason(),
            Some(AbandonReason::UpstreamLength)
        );
        assert_nothing_left(&*backend, &k).await;
    }
}

/// What one of the concurrent tees does.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Healthy,
    Fails,
    Stalls,
    Panics,
    Slow,
    ClientLeaves,
    UpstreamFails,
}

const MODES: [Mode; 7] = [
    Mode::Healthy,
    Mode::Fails,
    Mode::Stalls,
    Mode::Panics,
    Mode::Slow,
    Mode::ClientLeaves,
    Mode::UpstreamFails,
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_concurrent_tees_with_mixed_faults_leave_nothing_behind() {
    let mode_of = |name: &str| MODES[name.trim_end_matches(".tgz").parse::<usize>().unwrap() % 7];
    let backend = ScriptedBackend::new(move |k| match mode_of(k.name()) {
        Mode::Fails => Script {
            fail_after: Some((8 * 1024, ErrorKind::NoSpace)),
            ..Script::default()
        },
        Mode::Stalls => Script {
            stall_after: Some(8 * 1024),
            ..Script::default()
        },
        Mode::Panics => Script {
            panic_on_write: Some(1),
            ..Script::default()
        },
        Mode::Slow => Script {
            delay_per_write: Some(Duration::from_millis(30)),
            ..Script::default()
        },
        _ => Script::default(),
    });
    let cache = Cache::with_config(
        backend.clone(),
        TeePolicy::new().buffer_bytes(16 * 1024),
        // The breaker would bypass most fills here; this test is about the tee.
        safedisk_core::BreakerConfig::new().failure_threshold(u32::MAX),
    );
    let baseline = tokio::runtime::Handle::current()
        .metrics()
        .num_alive_tasks();

    let mut requests = Vec::new();
    for i in 0..256usize {
        let cache = cache.clone();
        requests.push(tokio::spawn(async move {
            let k = key(&format!("{i}.tgz"));
            let mode = MODES[i % 7];
            let chunks = payload(64 * 1024, 4 * 1024, i as u8);
            let expected = concat(&chunks);
            let source = match mode {
                Mode::UpstreamFails => failing_upstream(chunks, Duration::from_millis(1)),
                _ => upstream(chunks, Duration::from_millis(1)),
            };
            let options = WriteOptions::new().idle_deadline(Duration::from_millis(200));
            let (mut body, handle) = cache.tee(&k, options, source).await;

            let mut received = Vec::new();
            let mut failed = false;
            while let Some(item) = body.next().await {
                match item {
                    Ok(chunk) => received.extend_from_slice(&chunk),
                    Err(_) => {
                        failed = true;
                        break;
                    }
                }
                if matches!(mode, Mode::ClientLeaves) && received.len() >= 16 * 1024 {
                    break;
                }
            }
            drop(body);
            let outcome = handle.await;
            (k, mode, expected, received, failed, outcome)
        }));
    }

    for request in requests {
        let (k, mode, expected, received, failed, outcome) = request.await.unwrap();
        match mode {
            Mode::ClientLeaves => assert!(expected.starts_with(&received)),
            Mode::UpstreamFails => assert!(failed && received == expected),
            _ => assert!(
                !failed && received == expected,
                "{k}: {mode:?} client bytes"
            ),
        }
        let visible = read_entry(&*backend, &k).await;
        if matches!(mode, Mode::UpstreamFails) {
            assert_eq!(
                outcome.abandon_reason(),
                Some(AbandonReason::UpstreamFailed)
            );
        }
        match (mode, &outcome) {
            (Mode::Healthy, FillOutcome::Committed { summary, .. }) => {
                assert_eq!(summary.len, expected.len() as u64);
                assert_eq!(visible.as_deref(), Some(&expected[..]));
            }
            (Mode::Healthy, other) => panic!("{k}: healthy fill ended {other:?}"),
            (Mode::Slow, FillOutcome::Committed { .. }) => {
                assert_eq!(visible.as_deref(), Some(&expected[..]));
            }
            (_, FillOutcome::Committed { .. }) => panic!("{k}: {mode:?} fill committed"),
            _ => assert!(visible.is_none(), "{k}: {mode:?} left a readable entry"),
        }
    }

    assert_eq!(backend.pending().await.unwrap(), 0);
    let alive = settle_tasks(baseline, Duration::from_secs(2)).await;
    assert!(
        alive <= baseline,
        "{alive} tasks alive, baseline {baseline}"
    );
    assert!(backend.begins.load(Ordering::SeqCst) == 256);
}
