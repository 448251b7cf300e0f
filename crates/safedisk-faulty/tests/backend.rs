//! `Faulty` around the memory backend, driven through `Fill`: every action
//! fires at its point and trigger, and nowhere else.

mod support;

use std::time::Duration;

use bytes::Bytes;
use safedisk_core::{CacheBackend, ErrorKind, Fill, WriteOptions};
use safedisk_faulty::{FaultAction, FaultPoint, Faulty};
use support::{Leftovers, faulty, fill, fill_with, key, plan, read};

const TEN: &[u8] = b"0123456789";

#[tokio::test]
async fn an_errno_at_the_nth_write_fails_that_write_of_each_fill() {
    let backend = faulty("write@nth=3:eio");
    let k = key("a");

    let err = fill(&backend, &k, &[TEN; 5]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(err.raw_os_error(), Some(5));
    assert_eq!(err.backend(), "memory");
    assert!(
        err.to_string()
            .contains("injected by fault rule 0, write@nth=3:eio")
    );

    // Two writes never reach the third; a later fill reaches it again.
    fill(&backend, &key("b"), &[TEN; 2]).await.unwrap();
    assert!(fill(&backend, &key("c"), &[TEN; 3]).await.is_err());

    let records = backend.records();
    assert_eq!(records.len(), 2);
    assert_eq!(records[0].rule, 0);
    assert_eq!(records[0].point, FaultPoint::WriteNth(3));
    assert_eq!(records[0].key, "test:a");
    assert_eq!(records[0].bytes, 20);
    assert_eq!(records[1].key, "test:c");
    assert_eq!(read(&backend, &k).await, None);
    assert_eq!(read(&backend, &key("b")).await.unwrap().len(), 20);
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn a_limit_fails_the_write_that_would_pass_it() {
    let backend = faulty("write@after=25:enospc");

    // Exactly 25 bytes fit.
    fill(&backend, &key("fits"), &[TEN, TEN, b"abcde"])
        .await
        .unwrap();
    assert!(backend.records().is_empty());

    let err = fill(&backend, &key("full"), &[TEN, TEN, TEN])
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoSpace);
    assert_eq!(err.raw_os_error(), Some(28));
    assert_eq!(backend.records()[0].bytes, 20);
    assert_eq!(read(&backend, &key("full")).await, None);
}

#[tokio::test]
async fn a_short_write_stores_the_prefix_then_fails() {
    let backend = faulty("write@after=25:short; write@nth=1:short");
    let inner = backend.inner().clone();

    // Bypass Fill to look at the inner writer's bytes before the abort.
    let mut writer = backend
        .begin(&key("a"), &WriteOptions::new())
        .await
        .unwrap();
    let err = writer
        .write(Bytes::from_static(b"abcdefghi"))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShortWrite);
    assert_eq!(inner.used_bytes(), 4, "half of 9 bytes");

    writer.write(Bytes::from_static(TEN)).await.unwrap();
    let err = writer
        .write(Bytes::from_static(&[b'x'; 20]))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ShortWrite);
    assert!(err.to_string().contains("stored 11 of 20 bytes"), "{err}");
    assert_eq!(
        inner.used_bytes(),
        4 + 10 + 11,
        "exactly up to the limit of 25"
    );

    writer.abort().await.unwrap();
    assert_eq!(inner.used_bytes(), 0);
    assert_eq!(backend.pending().await.unwrap(), 0);
}

/// Which of `n` begins fail under `text`.
async fn begin_failures(text: &str, n: usize) -> Vec<usize> {
    let backend = faulty(text);
    let mut failed = Vec::new();
    for i in 1..=n {
        if Fill::begin(&backend, &key("k"), WriteOptions::new())
            .await
            .is_err()
        {
            failed.push(i);
        }
    }
    assert_eq!(backend.records().len(), failed.len());
    failed
}

#[tokio::test]
async fn triggers_pick_the_arrivals_that_fire() {
    assert_eq!(begin_failures("begin:eio", 4).await, [1, 2, 3, 4]);
    assert_eq!(begin_failures("begin:eio/once", 4).await, [1]);
    assert_eq!(begin_failures("begin:eio/nth=3", 6).await, [3]);
    assert_eq!(begin_failures("begin:eio/every=2", 7).await, [2, 4, 6]);
    assert_eq!(
        begin_failures("begin:eio/p=0", 20).await,
        Vec::<usize>::new()
    );
    assert_eq!(begin_failures("begin:eio/p=1", 5).await, [1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn every_kind_and_errno_comes_out_as_injected() {
    for kind in ErrorKind::ALL {
        let backend = faulty(&format!("begin:error={}", kind.as_str()));
        let err = Fill::begin(&backend, &key("k"), WriteOptions::new())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), kind);
        assert_eq!(err.raw_os_error(), None);
        assert_eq!(err.operation(), safedisk_core::Operation::Begin);
    }
    for (name, errno, kind) in [
        ("enospc", 28, ErrorKind::NoSpace),
        ("edquot", 122, ErrorKind::QuotaExceeded),
        ("eio", 5, ErrorKind::Io),
        ("erofs", 30, ErrorKind::ReadOnly),
        ("efbig", 27, ErrorKind::FileTooLarge),
        ("errno=200", 200, ErrorKind::Io),
    ] {
        let backend = faulty(&format!("write:{name}"));
        let err = fill(&backend, &key("k"), &[TEN]).await.unwrap_err();
        assert_eq!(
            (err.kind(), err.raw_os_error()),
            (kind, Some(errno)),
            "{name}"
        );
    }
}

#[tokio::test]
async fn an_error_before_publish_publishes_nothing() {
    let backend = faulty("commit:edquot/nth=2");
    let k = key("a");

    fill(&backend, &k, &[b"old"]).await.unwrap();
    let err = fill(&backend, &k, &[b"new"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::QuotaExceeded);
    assert_eq!(err.operation(), safedisk_core::Operation::Commit);

    assert_eq!(read(&backend, &k).await.unwrap(), b"old");
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn an_error_after_publish_reaches_a_caller_whose_entry_is_published() {
    let backend = faulty("commit@published:eio");
    let k = key("a");

    let err = fill(&backend, &k, &[b"new"]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!(read(&backend, &k).await.unwrap(), b"new");
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn a_failed_abort_releases_nothing() {
    let inner = Leftovers::default();
    let counts = inner.counts.clone();
    let backend = Faulty::new(inner, plan("abort:eio"));

    let fill = Fill::begin(&backend, &key("a"), WriteOptions::new())
        .await
        .unwrap();
    let err = fill.abort().await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
    assert_eq!((counts.crashes(), counts.aborts()), (1, 0));
    assert_eq!(
        backend.pending().await.unwrap(),
        1,
        "the leftover is pending"
    );
    assert_eq!(backend.recover().await.unwrap().removed.len(), 1);
    assert_eq!(backend.pending().await.unwrap(), 0);
}

#[tokio::test]
async fn remove_and_recover_fail_as_injected() {
    let backend = faulty("remove:erofs; recover:error=io/once");
    let k = key("a");
    fill(&backend, &k, &[TEN]).await.unwrap();

    assert_eq!(
        backend.remove(&k).await.unwrap_err().kind(),
        ErrorKind::ReadOnly
    );
    assert!(read(&backend, &k).await.is_some(), "still there");
    assert_eq!(backend.recover().await.unwrap_err().kind(), ErrorKind::Io);
    backend.recover().await.unwrap();
    assert_eq!(backend.name(), "memory");
}

#[tokio::test]
async fn get_errors_and_corruption() {
    let backend = faulty("get:eio/once; get:corrupt/nth=2");
    let k = key("a");
    let bytes: Vec<u8> = (0..=255).collect();
    fill(&backend, &k, &[&bytes[..100], &bytes[100..]])
        .await
        .unwrap();

    assert_eq!(backend.get(&k).await.unwrap_err().kind(), ErrorKind::Io);

    let corrupted = read(&backend, &k).await.unwrap();
    assert_eq!(corrupted.len(), bytes.len());
    let flipped: Vec<usize> = (0..bytes.len())
        .filter(|&i| corrupted[i] != bytes[i])
        .collect();
    assert_eq!(flipped.len(), 1);
    assert_eq!(corrupted[flipped[0]], !bytes[flipped[0]]);

    assert_eq!(read(&backend, &k).await.unwrap(), bytes, "only the 2nd get");

    // The flipped offset is drawn from the seed: the same plan flips the
    // same byte, over any chunking.
    let again = faulty("get:eio/once; get:corrupt/nth=2");
    fill(&again, &k, &[&bytes]).await.unwrap();
    assert!(again.get(&k).await.is_err());
    assert_eq!(read(&again, &k).await.unwrap(), corrupted);
}

#[tokio::test(start_paused = true)]
async fn delays_and_rate_limits_take_their_time() {
    let backend = faulty("write:rate=1KiB/s; get:delay=3s; commit:delay=250ms");
    let k = key("a");

    let started = tokio::time::Instant::now();
    fill(&backend, &k, &[&[7u8; 512][..]; 4]).await.unwrap();
    assert_eq!(started.elapsed(), Duration::from_millis(2250));

    let started = tokio::time::Instant::now();
    backend.get(&k).await.unwrap().unwrap();
    assert_eq!(started.elapsed(), Duration::from_secs(3));

    let kinds: Vec<_> = backend.records().iter().map(|r| r.action).collect();
    assert_eq!(kinds.len(), 6);
    assert_eq!(kinds[0], FaultAction::Throughput(1024));
    assert_eq!(kinds[5], FaultAction::Delay(Duration::from_secs(3)));
}

#[tokio::test(start_paused = true)]
async fn rules_apply_in_order_until_the_first_failure() {
    let backend = faulty("write:delay=1s; write@nth=2:eio; write:delay=2s");

    let started = tokio::time::Instant::now();
    fill(&backend, &key("a"), &[TEN; 3]).await.unwrap_err();
    // Write 1: both delays. Write 2: the first delay, then the error.
    assert_eq!(started.elapsed(), Duration::from_secs(4));
    let rules: Vec<_> = backend.records().iter().map(|r| r.rule).collect();
    assert_eq!(rules, [0, 2, 0, 1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_is_cancelled_by_the_idle_deadline_and_leaves_no_task() {
    let metrics = tokio::runtime::Handle::current().metrics();
    let tasks_before = metrics.num_alive_tasks();
    let options = WriteOptions::new().idle_deadline(Duration::from_millis(100));

    for text in ["begin:stall", "write@nth=2:stall", "commit:stall"] {
        let backend = faulty(text);
        let started = std::time::Instant::now();
        let err = fill_with(&backend, &key("a"), &[TEN; 3], options.clone())
            .await
            .unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Stalled, "{text}");
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{text}: not at the deadline"
        );
        assert_eq!(read(&backend, &key("a")).await, None, "{text}");
        assert_eq!(backend.pending().await.unwrap(), 0, "{text}");
        assert_eq!(backend.records().len(), 1, "{text}");
    }

    // After publish, a stall still costs the caller the deadline, and the
    // entry is there.
    let backend = faulty("commit@published:stall");
    let err = fill_with(&backend, &key("a"), &[TEN], options)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Stalled);
    assert_eq!(read(&backend, &key("a")).await.unwrap(), TEN);

    assert_eq!(metrics.num_alive_tasks(), tasks_before);
}

#[tokio::test]
async fn a_crash_leaves_what_a_dead_process_leaves() {
    for text in [
        "begin:crash/nth=2",
        "write@nth=2:crash",
        "write@after=15:crash",
        "commit:crash/nth=2",
    ] {
        let inner = Leftovers::default();
        let counts = inner.counts.clone();
        let backend = Faulty::new(inner, plan(text));
        let k = key("a");

        // The first fill passes, so an old entry is published.
        fill(&backend, &k, &[b"old"]).await.unwrap();

        let err = fill(&backend, &k, &[TEN; 3]).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Aborted, "{text}");

        // Crashed, not aborted: one leftover for recover, nothing new
        // readable, the old entry intact.
        assert_eq!((counts.crashes(), counts.aborts()), (1, 0), "{text}");
        assert_eq!(read(&backend, &k).await.unwrap(), b"old", "{text}");
        assert_eq!(backend.pending().await.unwrap(), 1, "{text}");
        assert_eq!(backend.recover().await.unwrap().removed.len(), 1, "{text}");
        assert_eq!(backend.pending().await.unwrap(), 0, "{text}");
        assert_eq!(backend.records().len(), 1, "{text}");
    }
}

#[tokio::test]
async fn a_crash_around_the_memory_backend_leaves_nothing() {
    let backend = faulty("write@nth=2:crash");
    let k = key("a");

    let err = fill(&backend, &k, &[TEN; 3]).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Aborted);
    assert_eq!(read(&backend, &k).await, None);
    assert_eq!(backend.pending().await.unwrap(), 0);
    assert_eq!(backend.inner().used_bytes(), 0);
}

/// The outcome of 200 one-write fills under `text`.
async fn outcomes(text: &str) -> (Vec<bool>, Vec<(usize, String, u64)>) {
    let backend = faulty(text);
    let mut committed = Vec::new();
    for i in 0..200 {
        let ok = fill(&backend, &key(&format!("k{i}")), &[TEN]).await.is_ok();
        committed.push(ok);
    }
    let records = backend
        .records()
        .into_iter()
        .map(|r| (r.rule, r.key, r.bytes))
        .collect();
    (committed, records)
}

#[tokio::test]
async fn seeded_probabilities_replay_and_another_seed_differs() {
    let text = "seed=7; write:eio/p=0.3; commit:stall/p=0";
    let first = outcomes(text).await;
    let second = outcomes(text).await;
    assert_eq!(first, second);

    let failures = first.0.iter().filter(|ok| !**ok).count();
    assert!((30..90).contains(&failures), "{failures} of 200 at p=0.3");
    assert_eq!(first.1.len(), failures);

    let other = outcomes("seed=8; write:eio/p=0.3; commit:stall/p=0").await;
    assert_ne!(first.0, other.0);

    // A rule added at the end does not change the draws of the others.
    let longer = "seed=7; write:eio/p=0.3; commit:stall/p=0; begin:delay=0ns/p=0.5";
    let shifted = outcomes(longer).await;
    assert_eq!(first.0, shifted.0);
}
