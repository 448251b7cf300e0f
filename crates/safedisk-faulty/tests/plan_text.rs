//! The text form of fault plans: printing and parsing agree for every
//! plan, and no input makes the parser panic.

use std::time::Duration;

use proptest::prelude::*;
use safedisk_core::ErrorKind;
use safedisk_faulty::{FaultAction, FaultPlan, FaultPoint, FaultRule, Trigger};

fn point() -> impl Strategy<Value = FaultPoint> {
    use FaultPoint as P;
    prop_oneof![
        Just(P::Begin),
        Just(P::Write),
        (1..=u64::MAX).prop_map(P::WriteNth),
        any::<u64>().prop_map(P::WriteAfter),
        Just(P::Commit),
        Just(P::CommitPublished),
        Just(P::Abort),
        Just(P::Get),
        Just(P::Remove),
        Just(P::Recover),
        Just(P::Put),
        Just(P::PutPublished),
        Just(P::Part),
        (1..=u64::MAX).prop_map(P::PartNth),
        Just(P::Complete),
        Just(P::CompletePublished),
        Just(P::List),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        any::<u64>().prop_map(Duration::from_nanos),
        (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
        (0..100_000u64).prop_map(Duration::from_millis),
    ]
}

fn action() -> impl Strategy<Value = FaultAction> {
    use FaultAction as A;
    prop_oneof![
        prop::sample::select(ErrorKind::ALL.to_vec()).prop_map(A::Error),
        (1..=i32::MAX).prop_map(A::Errno),
        prop::sample::select(vec![5, 27, 28, 30, 122]).prop_map(A::Errno),
        Just(A::ShortWrite),
        Just(A::Stall),
        duration().prop_map(A::Delay),
        (1..=u64::MAX).prop_map(A::Throughput),
        prop::sample::select(vec![1024, 1 << 20, 3 << 30]).prop_map(A::Throughput),
        Just(A::Corrupt),
        Just(A::Crash),
    ]
}

fn trigger() -> impl Strategy<Value = Trigger> {
    prop_oneof![
        Just(Trigger::Always),
        Just(Trigger::Once),
        (1..=u64::MAX).prop_map(Trigger::Nth),
        (1..=u64::MAX).prop_map(Trigger::Every),
        (0.0..=1.0f64).prop_map(Trigger::Probability),
        prop::sample::select(vec![0.0, 0.25, 0.5, 1.0]).prop_map(Trigger::Probability),
    ]
}

fn rule() -> impl Strategy<Value = FaultRule> {
    (point(), action(), trigger())
        .prop_filter_map("action does not apply at the point", |(p, a, t)| {
            FaultRule::new(p, a, t).ok()
        })
}

fn plan() -> impl Strategy<Value = FaultPlan> {
    (any::<u64>(), prop::collection::vec(rule(), 0..8)).prop_map(|(seed, rules)| {
        rules
            .into_iter()
            .fold(FaultPlan::new(seed), |plan, rule| plan.rule(rule))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn parse_of_print_is_the_same_plan(plan in plan()) {
        let text = plan.to_string();
        let parsed: FaultPlan = text.parse().map_err(|e| {
            TestCaseError::fail(format!("{text:?} does not parse: {e}"))
        })?;
        prop_assert_eq!(&parsed, &plan);
        prop_assert_eq!(parsed.to_string(), text);
    }

    #[test]
    fn any_text_parses_or_fails_inside_the_text(text in "[a-z0-9@=:;/. _KMGiBs-]{0,40}") {
        if let Err(err) = text.parse::<FaultPlan>() {
            prop_assert!(err.position() <= text.len(), "{err} for {text:?}");
            let head = format!("at {}: expected ", err.position());
            prop_assert!(err.to_string().starts_with(&head), "{}", err);
        }
    }

    #[test]
    fn a_rule_cut_short_fails_at_the_cut(rule in rule(), cut in 0usize..100) {
        let text = format!("seed=1; {rule}");
        let cut = 8 + cut % (text.len() - 8);
        let short = &text[..cut];
        // Some prefixes are whole rules themselves ("get:eio/nth=12" cut to
        // "get:eio/nth=1"); the others must fail, and no later than the cut.
        if let Err(err) = short.parse::<FaultPlan>() {
            prop_assert!(err.position() <= cut, "{err} for {short:?}");
        }
    }
}
