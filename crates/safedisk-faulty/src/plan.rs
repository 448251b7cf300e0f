//! Fault plans: what to inject, where, and when; and their text form.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use safedisk_core::ErrorKind;

/// Where in a backend's or an object store's life a fault is injected.
///
/// Backend points are reached by [`Faulty`](crate::Faulty), store points
/// by [`FaultyStore`](crate::FaultyStore); [`Begin`](Self::Begin),
/// [`Abort`](Self::Abort), [`Get`](Self::Get) and [`Remove`](Self::Remove)
/// exist at both layers. A wrapper ignores the rules for points it never
/// reaches, so one plan can drive both layers of a stack.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultPoint {
    /// Starting a fill (`begin`), or creating a multipart upload
    /// (`put_multipart`) at the store.
    Begin,
    /// Every write of a fill (`write`).
    Write,
    /// The nth write of each fill, counting from 1 (`write@nth=N`).
    WriteNth(u64),
    /// Every write that would take a fill past this many bytes
    /// (`write@after=SIZE`): the bytes up to the limit fit, the rest do
    /// not, as on a device with that much room.
    WriteAfter(u64),
    /// Commit, before the inner backend publishes (`commit`): a fault here
    /// leaves nothing published.
    Commit,
    /// Commit, after the inner backend published (`commit@published`): a
    /// fault here reaches a caller whose entry is in fact published, the
    /// ambiguous acknowledgement of a lost reply.
    CommitPublished,
    /// Aborting a fill, or a multipart upload at the store (`abort`).
    Abort,
    /// Opening an entry or an object (`get`).
    Get,
    /// Removing an entry or deleting an object (`remove`).
    Remove,
    /// Sweeping a dead process's leftovers (`recover`).
    Recover,
    /// A single-request object put, before it reaches the store (`put`).
    Put,
    /// A single-request object put, after the store stored it
    /// (`put@published`).
    PutPublished,
    /// Every part upload of a multipart upload (`part`).
    Part,
    /// The nth part upload of each multipart upload, counting from 1
    /// (`part@nth=N`).
    PartNth(u64),
    /// Completing a multipart upload, before it reaches the store
    /// (`complete`).
    Complete,
    /// Completing a multipart upload, after the store published the object
    /// (`complete@published`).
    CompletePublished,
    /// Listing objects (`list`).
    List,
}

/// What happens when a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FaultAction {
    /// Fail with an error of this kind and no OS error (`error=KIND`, with
    /// the kind's [`ErrorKind::as_str`] name).
    Error(ErrorKind),
    /// Fail with an I/O error carrying this raw OS error number, classified
    /// as the real error would be (`enospc`, `edquot`, `eio`, ..., or
    /// `errno=N`).
    Errno(i32),
    /// Store only a prefix of the chunk, then fail with
    /// [`ErrorKind::ShortWrite`] (`short`). The prefix is the bytes up to
    /// the limit at a [`WriteAfter`](FaultPoint::WriteAfter) point, half
    /// the chunk elsewhere.
    ShortWrite,
    /// Never finish: the call stays pending until its future is dropped
    /// (`stall`). No task or timer is left behind.
    Stall,
    /// Wait this long, then carry on (`delay=DURATION`).
    Delay(Duration),
    /// Pass bytes at no more than this many bytes per second
    /// (`rate=SIZE/s`), by sleeping before each chunk.
    Throughput(u64),
    /// Flip one byte of what a get returns, at an offset drawn from the
    /// rule's seeded generator (`corrupt`).
    Corrupt,
    /// Die as a killed process would (`crash`): the inner writer is told to
    /// [`crash`](safedisk_core::CacheWriter::crash), leaving on storage what
    /// a dead process leaves, and the call fails with
    /// [`ErrorKind::Aborted`]. At the store the upload is abandoned without
    /// another request.
    Crash,
}

/// When a rule whose point is reached actually fires.
///
/// Counts are per rule, over the life of the wrapper: the third time a
/// rule's point is reached is the third time for that rule, whichever fill
/// or upload reached it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
#[non_exhaustive]
pub enum Trigger {
    /// Every time. The default, printed as nothing.
    #[default]
    Always,
    /// The first time only (`once`).
    Once,
    /// The nth time only, counting from 1 (`nth=N`).
    Nth(u64),
    /// Every kth time: the kth, the 2kth, ... (`every=K`).
    Every(u64),
    /// Each time with this probability, drawn from a generator seeded by
    /// the plan's seed and the rule's index (`p=P`).
    Probability(f64),
}

/// One rule of a plan: a point, an action and a trigger.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultRule {
    point: FaultPoint,
    action: FaultAction,
    trigger: Trigger,
}

/// Why a rule was refused by [`FaultRule::new`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct InvalidRule {
    reason: String,
}

impl InvalidRule {
    fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
        }
    }
}

impl FaultRule {
    /// A rule, checked as a whole.
    ///
    /// # Errors
    ///
    /// When the action does not apply at the point (a short write at
    /// `get`, corruption at `write`), or a number is out of range: an nth
    /// or every of zero, a probability outside `0..=1`, a rate of zero, an
    /// errno that is not positive.
    pub fn new(
        point: FaultPoint,
        action: FaultAction,
        trigger: Trigger,
    ) -> Result<Self, InvalidRule> {
        if let FaultPoint::WriteNth(0) | FaultPoint::PartNth(0) = point {
            return Err(InvalidRule::new("nth of a point counts from 1"));
        }
        match action {
            FaultAction::Errno(n) if n <= 0 => {
                return Err(InvalidRule::new(format!("errno {n} is not positive")));
            }
            FaultAction::Throughput(0) => {
                return Err(InvalidRule::new("a rate of 0 never finishes; use stall"));
            }
            _ => {}
        }
        if !action.applies_at(point) {
            return Err(InvalidRule::new(format!(
                "{} does not apply at {point}",
                action.name()
            )));
        }
        match trigger {
            Trigger::Nth(0) | Trigger::Every(0) => {
                return Err(InvalidRule::new("nth and every count from 1"));
            }
            Trigger::Probability(p) if !is_probability(p) => {
                return Err(InvalidRule::new(format!("probability {p} is not in 0..=1")));
            }
            _ => {}
        }
        Ok(Self {
            point,
            action,
            trigger,
        })
    }

    /// Where the rule applies.
    pub fn point(&self) -> FaultPoint {
        self.point
    }

    /// What it does.
    pub fn action(&self) -> FaultAction {
        self.action
    }

    /// When it fires.
    pub fn trigger(&self) -> Trigger {
        self.trigger
    }
}

fn is_probability(p: f64) -> bool {
    // Negative zero would print as "-0", which the text form refuses.
    (0.0..=1.0).contains(&p) && p.is_sign_positive()
}

/// A seed and a list of rules: everything needed to replay the same faults.
///
/// Every rule whose point is reached counts that arrival and asks its
/// trigger; the rules that fire are then applied in plan order. Delays and
/// rate limits add up and let the call go on; corruption marks the read;
/// the first failing action (an error, a short write, a stall, a crash)
/// ends the call, and rules after it are not applied.
///
/// The same seed and plan inject the same faults for the same sequence of
/// operations: probabilities and corrupted offsets come from one
/// generator per rule, seeded from the plan's seed and the rule's index.
///
/// # Text form
///
/// ```text
/// seed=42; write@after=1MiB:enospc; commit:stall; write@nth=3:eio/once; get:corrupt/p=0.25
/// ```
///
/// An optional `seed=N` (default 0), then rules separated by `;`, each
/// `point:action` with an optional `/trigger`. Whitespace around `;` is
/// ignored and a trailing `;` is allowed.
///
/// - points: `begin`, `write`, `write@nth=N`, `write@after=SIZE`, `commit`,
///   `commit@published`, `abort`, `get`, `remove`, `recover`, `put`,
///   `put@published`, `part`, `part@nth=N`, `complete`,
///   `complete@published`, `list`;
/// - actions: `error=KIND` (an [`ErrorKind::as_str`] name such as
///   `no_space`), an errno name (`enospc`, `edquot`, `eio`, `erofs`,
///   `efbig`, `eacces`, `eperm`, `enoent`, `eexist`, `eintr`, `eagain`,
///   `enomem`, `emfile`, `enfile`, `epipe`, `einval`, `eopnotsupp`,
///   `econnreset`, `etimedout`) or `errno=N`, `short`, `stall`,
///   `delay=DURATION`, `rate=SIZE/s`, `corrupt`, `crash`;
/// - triggers: `once`, `nth=N`, `every=K`, `p=P` with `P` in `0..=1`;
///   none means always;
/// - sizes are bytes with an optional `KiB`, `MiB`, `GiB` or `TiB`;
///   durations need a unit: `ns`, `us`, `ms` or `s`.
///
/// [`Display`](fmt::Display) prints the canonical form (the seed always,
/// the largest exact unit, errno names where known) and
/// [`FromStr`] reads it back to an equal plan.
///
/// ```
/// use safedisk_faulty::{FaultAction, FaultPlan, FaultPoint};
///
/// let plan: FaultPlan = "write@after=1024KiB:errno=28; commit:stall".parse()?;
/// assert_eq!(plan.rules()[0].point(), FaultPoint::WriteAfter(1 << 20));
/// assert_eq!(plan.rules()[0].action(), FaultAction::Errno(28));
/// assert_eq!(plan.to_string(), "seed=0; write@after=1MiB:enospc; commit:stall");
///
/// let err = "write:xx".parse::<FaultPlan>().unwrap_err();
/// assert_eq!(err.position(), 6);
/// # Ok::<(), safedisk_faulty::ParseError>(())
/// ```
#[derive(Debug, Clone, PartialEq, Default)]
pub struct FaultPlan {
    seed: u64,
    rules: Vec<FaultRule>,
}

impl FaultPlan {
    /// A plan with no rules and this seed.
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            rules: Vec::new(),
        }
    }

    /// Adds a rule at the end.
    #[must_use]
    pub fn rule(mut self, rule: FaultRule) -> Self {
        self.rules.push(rule);
        self
    }

    /// The seed of the plan's generators.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// The rules, in the order they are applied.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }
}

/// Errno numbers with names in the text form (Linux values).
const ERRNO_NAMES: [(&str, i32); 19] = [
    ("eperm", 1),
    ("enoent", 2),
    ("eintr", 4),
    ("eio", 5),
    ("eagain", 11),
    ("enomem", 12),
    ("eacces", 13),
    ("eexist", 17),
    ("einval", 22),
    ("enfile", 23),
    ("emfile", 24),
    ("efbig", 27),
    ("enospc", 28),
    ("erofs", 30),
    ("epipe", 32),
    ("eopnotsupp", 95),
    ("econnreset", 104),
    ("etimedout", 110),
    ("edquot", 122),
];

const SIZE_UNITS: [(&str, u64); 4] = [
    ("TiB", 1 << 40),
    ("GiB", 1 << 30),
    ("MiB", 1 << 20),
    ("KiB", 1 << 10),
];

const DURATION_UNITS: [(&str, u128); 4] = [
    ("s", 1_000_000_000),
    ("ms", 1_000_000),
    ("us", 1_000),
    ("ns", 1),
];

impl FaultPoint {
    fn base_name(self) -> &'static str {
        match self {
            Self::Begin => "begin",
            Self::Write | Self::WriteNth(_) | Self::WriteAfter(_) => "write",
            Self::Commit | Self::CommitPublished => "commit",
            Self::Abort => "abort",
            Self::Get => "get",
            Self::Remove => "remove",
            Self::Recover => "recover",
            Self::Put | Self::PutPublished => "put",
            Self::Part | Self::PartNth(_) => "part",
            Self::Complete | Self::CompletePublished => "complete",
            Self::List => "list",
        }
    }

    fn is_write(self) -> bool {
        matches!(self, Self::Write | Self::WriteNth(_) | Self::WriteAfter(_))
    }

    fn is_part(self) -> bool {
        matches!(self, Self::Part | Self::PartNth(_))
    }
}

impl fmt::Display for FaultPoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.base_name())?;
        match self {
            Self::WriteNth(n) | Self::PartNth(n) => write!(f, "@nth={n}"),
            Self::WriteAfter(size) => write!(f, "@after={}", Size(*size)),
            Self::CommitPublished | Self::PutPublished | Self::CompletePublished => {
                f.write_str("@published")
            }
            _ => Ok(()),
        }
    }
}

impl FaultAction {
    /// Whether the action means something at `point`. Errors, stalls and
    /// delays apply everywhere; the others where their words make sense.
    pub fn applies_at(self, point: FaultPoint) -> bool {
        use FaultPoint as P;
        match self {
            Self::Error(_) | Self::Errno(_) | Self::Stall | Self::Delay(_) => true,
            Self::ShortWrite => point.is_write() || point.is_part(),
            Self::Throughput(_) => {
                point.is_write() || point.is_part() || matches!(point, P::Get | P::Put)
            }
            Self::Corrupt => point == P::Get,
            Self::Crash => {
                point.is_write()
                    || point.is_part()
                    || matches!(
                        point,
                        P::Begin
                            | P::Commit
                            | P::CommitPublished
                            | P::Abort
                            | P::Complete
                            | P::CompletePublished
                    )
            }
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Error(_) | Self::Errno(_) => "an error",
            Self::ShortWrite => "a short write",
            Self::Stall => "a stall",
            Self::Delay(_) => "a delay",
            Self::Throughput(_) => "a rate limit",
            Self::Corrupt => "corruption",
            Self::Crash => "a crash",
        }
    }
}

impl fmt::Display for FaultAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Error(kind) => write!(f, "error={}", kind.as_str()),
            Self::Errno(n) => match ERRNO_NAMES.iter().find(|(_, e)| e == n) {
                Some((name, _)) => f.write_str(name),
                None => write!(f, "errno={n}"),
            },
            Self::ShortWrite => f.write_str("short"),
            Self::Stall => f.write_str("stall"),
            Self::Delay(d) => write!(f, "delay={}", DurationText(*d)),
            Self::Throughput(rate) => write!(f, "rate={}/s", Size(*rate)),
            Self::Corrupt => f.write_str("corrupt"),
            Self::Crash => f.write_str("crash"),
        }
    }
}

impl fmt::Display for Trigger {
    /// Prints the trigger without its leading `/`; [`Always`](Self::Always)
    /// prints as `always`, although a rule omits it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Always => f.write_str("always"),
            Self::Once => f.write_str("once"),
            Self::Nth(n) => write!(f, "nth={n}"),
            Self::Every(k) => write!(f, "every={k}"),
            // f64's Display is the shortest text that reads back exactly.
            Self::Probability(p) => write!(f, "p={p}"),
        }
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.point, self.action)?;
        match self.trigger {
            Trigger::Always => Ok(()),
            trigger => write!(f, "/{trigger}"),
        }
    }
}

impl fmt::Display for FaultPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "seed={}", self.seed)?;
        for rule in &self.rules {
            write!(f, "; {rule}")?;
        }
        Ok(())
    }
}

/// A byte count printed in the largest binary unit that divides it.
struct Size(u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, scale) in SIZE_UNITS {
            if self.0 != 0 && self.0.is_multiple_of(scale) {
                return write!(f, "{}{unit}", self.0 / scale);
            }
        }
        write!(f, "{}", self.0)
    }
}

/// A duration printed in the largest unit that divides it.
struct DurationText(Duration);

impl fmt::Display for DurationText {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nanos = self.0.as_nanos();
        let (unit, scale) = DURATION_UNITS
            .into_iter()
            .find(|(_, scale)| nanos.is_multiple_of(*scale))
            .unwrap_or(("ns", 1));
        write!(f, "{}{unit}", nanos / scale)
    }
}

/// Why a plan's text was refused: where, and what was expected there.
///
/// Prints as `at 14: expected an action (...), found "xx"`; the position is
/// a byte offset into the text.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at {at}: expected {expected}, found {found}")]
pub struct ParseError {
    at: usize,
    expected: String,
    found: String,
}

impl ParseError {
    /// Byte offset of the offending text.
    pub fn position(&self) -> usize {
        self.at
    }

    /// What the parser expected there.
    pub fn expected(&self) -> &str {
        &self.expected
    }

    /// What it found: a quoted token, or `end of input`.
    pub fn found(&self) -> &str {
        &self.found
    }
}

impl FromStr for FaultPlan {
    type Err = ParseError;

    fn from_str(text: &str) -> Result<Self, ParseError> {
        Parser { text, pos: 0 }.plan()
    }
}

const EXPECTED_POINT: &str = "a point (begin, write, write@nth=N, write@after=SIZE, commit, \
     commit@published, abort, get, remove, recover, put, part, complete, list, ...)";
const EXPECTED_ACTION: &str = "an action (enospc, edquot, eio, errno=N, error=KIND, short, \
     stall, delay=DURATION, rate=SIZE/s, corrupt, crash, ...)";
const EXPECTED_TRIGGER: &str = "a trigger (once, nth=N, every=K, p=P)";

struct Parser<'a> {
    text: &'a str,
    pos: usize,
}

impl<'a> Parser<'a> {
    fn plan(mut self) -> Result<FaultPlan, ParseError> {
        let mut plan = FaultPlan::default();

        self.skip_space();
        if self.eat("seed=") {
            plan.seed = self.number("a seed (a whole number)")?;
            self.end_of_item()?;
        }

        while !self.at_end() {
            let rule = self.rule()?;
            plan.rules.push(rule);
            self.end_of_item()?;
        }
        Ok(plan)
    }

    /// After an item: the end, or a `;` and maybe the end.
    fn end_of_item(&mut self) -> Result<(), ParseError> {
        self.skip_space();
        if self.at_end() {
            return Ok(());
        }
        if !self.eat(";") {
            return Err(self.fail(self.pos, "\";\" between rules"));
        }
        self.skip_space();
        Ok(())
    }

    fn rule(&mut self) -> Result<FaultRule, ParseError> {
        let start = self.pos;
        let point = self.point()?;

        if !self.eat(":") {
            return Err(self.fail(self.pos, "\":\" and an action after the point"));
        }
        let action_at = self.pos;
        let action = self.action()?;
        if !action.applies_at(point) {
            let expected = format!("an action that applies at {point} ({})", actions_at(point));
            return Err(self.fail(action_at, &expected));
        }

        let trigger = if self.eat("/") {
            self.trigger()?
        } else {
            Trigger::Always
        };

        // Every check of `FaultRule::new` was made above at its position;
        // this is a last guard, pointing at the rule.
        FaultRule::new(point, action, trigger).map_err(|e| self.fail(start, &e.to_string()))
    }

    fn point(&mut self) -> Result<FaultPoint, ParseError> {
        use FaultPoint as P;

        let at = self.pos;
        let word = self.word();
        let base = match word {
            "begin" => P::Begin,
            "write" => P::Write,
            "commit" => P::Commit,
            "abort" => P::Abort,
            "get" => P::Get,
            "remove" => P::Remove,
            "recover" => P::Recover,
            "put" => P::Put,
            "part" => P::Part,
            "complete" => P::Complete,
            "list" => P::List,
            _ => return Err(self.fail(at, EXPECTED_POINT)),
        };
        if !self.text[self.pos..].starts_with('@') {
            return Ok(base);
        }

        let qualifier_at = self.pos + 1;
        let qualified = match base {
            P::Write => "nth=N or after=SIZE",
            P::Part => "nth=N",
            P::Commit | P::Put | P::Complete => "published",
            _ => return Ok(base),
        };
        self.pos = qualifier_at;
        let expected = format!("a qualifier of {word} ({qualified})");
        let point = match (base, self.word()) {
            (P::Write, "nth") => P::WriteNth(self.count_after_equals()?),
            (P::Part, "nth") => P::PartNth(self.count_after_equals()?),
            (P::Write, "after") => {
                self.equals()?;
                P::WriteAfter(self.size()?)
            }
            (P::Commit, "published") => P::CommitPublished,
            (P::Put, "published") => P::PutPublished,
            (P::Complete, "published") => P::CompletePublished,
            _ => return Err(self.fail(qualifier_at, &expected)),
        };
        Ok(point)
    }

    fn action(&mut self) -> Result<FaultAction, ParseError> {
        use FaultAction as A;

        let at = self.pos;
        let word = self.word();
        if let Some((_, errno)) = ERRNO_NAMES.iter().find(|(name, _)| *name == word) {
            return Ok(A::Errno(*errno));
        }
        let action = match word {
            "error" => {
                self.equals()?;
                let kind_at = self.pos;
                let name = self.word();
                let kind = ErrorKind::ALL.into_iter().find(|k| k.as_str() == name);
                match kind {
                    Some(kind) => A::Error(kind),
                    None => {
                        return Err(self.fail(
                            kind_at,
                            "an error kind (no_space, quota_exceeded, io, read_only, ...)",
                        ));
                    }
                }
            }
            "errno" => {
                self.equals()?;
                let number_at = self.pos;
                let n: u64 = self.number("an errno number")?;
                match i32::try_from(n) {
                    Ok(n) if n > 0 => A::Errno(n),
                    _ => return Err(self.fail(number_at, "an errno from 1 to 2147483647")),
                }
            }
            "short" => A::ShortWrite,
            "stall" => A::Stall,
            "delay" => {
                self.equals()?;
                A::Delay(self.duration()?)
            }
            "rate" => {
                self.equals()?;
                let rate_at = self.pos;
                let rate = self.size()?;
                if rate == 0 {
                    return Err(self.fail(rate_at, "a rate above 0 (use stall to stop)"));
                }
                if !self.eat("/s") {
                    return Err(self.fail(self.pos, "\"/s\" after the rate"));
                }
                A::Throughput(rate)
            }
            "corrupt" => A::Corrupt,
            "crash" => A::Crash,
            _ => return Err(self.fail(at, EXPECTED_ACTION)),
        };
        Ok(action)
    }

    fn trigger(&mut self) -> Result<Trigger, ParseError> {
        let at = self.pos;
        let trigger = match self.word() {
            "once" => Trigger::Once,
            "nth" => Trigger::Nth(self.count_after_equals()?),
            "every" => Trigger::Every(self.count_after_equals()?),
            "p" => {
                self.equals()?;
                Trigger::Probability(self.probability()?)
            }
            _ => return Err(self.fail(at, EXPECTED_TRIGGER)),
        };
        Ok(trigger)
    }

    /// `=N` with N at least 1.
    fn count_after_equals(&mut self) -> Result<u64, ParseError> {
        self.equals()?;
        let at = self.pos;
        match self.number("a count (1 or more)")? {
            0 => Err(self.fail(at, "a count (1 or more)")),
            n => Ok(n),
        }
    }

    fn equals(&mut self) -> Result<(), ParseError> {
        if self.eat("=") {
            Ok(())
        } else {
            Err(self.fail(self.pos, "\"=\""))
        }
    }

    fn size(&mut self) -> Result<u64, ParseError> {
        let at = self.pos;
        let value: u64 = self.number("a size (bytes, or a number with KiB, MiB, GiB, TiB)")?;

        let unit_at = self.pos;
        let unit = self.letters();
        if unit.is_empty() {
            return Ok(value);
        }
        let Some((_, scale)) = SIZE_UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(self.fail(unit_at, "a size unit (KiB, MiB, GiB, TiB) or none"));
        };
        value
            .checked_mul(*scale)
            .ok_or_else(|| self.fail(at, "a size below 16EiB"))
    }

    fn duration(&mut self) -> Result<Duration, ParseError> {
        let at = self.pos;
        let value: u128 = self.number("a duration (a number and ns, us, ms or s)")?;

        let unit_at = self.pos;
        let unit = self.letters();
        let Some((_, scale)) = DURATION_UNITS.iter().find(|(name, _)| *name == unit) else {
            return Err(self.fail(unit_at, "a duration unit (ns, us, ms, s)"));
        };
        let nanos = value
            .checked_mul(*scale)
            .ok_or_else(|| self.fail(at, "a shorter duration"))?;
        let secs = u64::try_from(nanos / 1_000_000_000)
            .map_err(|_| self.fail(at, "a shorter duration"))?;
        let subsec = (nanos % 1_000_000_000) as u32;
        Ok(Duration::new(secs, subsec))
    }

    fn probability(&mut self) -> Result<f64, ParseError> {
        const EXPECTED: &str = "a probability from 0 to 1";

        let at = self.pos;
        let digits = |s: &str| s.bytes().take_while(u8::is_ascii_digit).count();
        let mut len = digits(&self.text[at..]);
        if len > 0 && self.text[at + len..].starts_with('.') {
            len += 1 + digits(&self.text[at + len + 1..]);
        }
        let p: f64 = self.text[at..at + len]
            .parse()
            .map_err(|_| self.fail(at, EXPECTED))?;
        if !is_probability(p) {
            return Err(self.fail(at, EXPECTED));
        }
        self.pos = at + len;
        Ok(p)
    }

    fn number<N: FromStr>(&mut self, expected: &str) -> Result<N, ParseError> {
        let at = self.pos;
        let len = self.text[at..]
            .bytes()
            .take_while(u8::is_ascii_digit)
            .count();
        if len == 0 {
            return Err(self.fail(at, expected));
        }
        let value = self.text[at..at + len]
            .parse()
            .map_err(|_| self.fail(at, "a smaller number"))?;
        self.pos = at + len;
        Ok(value)
    }

    /// A run of lowercase letters, digits and `_`: a keyword.
    fn word(&mut self) -> &'a str {
        let rest = &self.text[self.pos..];
        let len = rest
            .bytes()
            .take_while(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        self.pos += len;
        &rest[..len]
    }

    /// A run of ASCII letters: a unit.
    fn letters(&mut self) -> &'a str {
        let rest = &self.text[self.pos..];
        let len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        self.pos += len;
        &rest[..len]
    }

    fn eat(&mut self, token: &str) -> bool {
        if self.text[self.pos..].starts_with(token) {
            self.pos += token.len();
            true
        } else {
            false
        }
    }

    fn skip_space(&mut self) {
        let rest = &self.text[self.pos..];
        self.pos += rest.len() - rest.trim_start().len();
    }

    fn at_end(&self) -> bool {
        self.pos == self.text.len()
    }

    fn fail(&self, at: usize, expected: &str) -> ParseError {
        ParseError {
            at,
            expected: expected.to_owned(),
            found: found_at(self.text, at),
        }
    }
}

/// The token at `at`, quoted: up to the next separator, or the separator
/// itself; `end of input` past the end.
fn found_at(text: &str, at: usize) -> String {
    let rest = &text[at..];
    let Some(first) = rest.chars().next() else {
        return "end of input".to_owned();
    };
    let is_separator = |c: char| c.is_whitespace() || ";:/@=".contains(c);
    let token = if is_separator(first) {
        &rest[..first.len_utf8()]
    } else {
        let len = rest.find(is_separator).unwrap_or(rest.len());
        &rest[..len]
    };
    format!("{token:?}")
}

/// The actions that apply at `point`, for error messages.
fn actions_at(point: FaultPoint) -> String {
    let candidates = [
        (FaultAction::ShortWrite, "short"),
        (FaultAction::Throughput(1), "rate"),
        (FaultAction::Corrupt, "corrupt"),
        (FaultAction::Crash, "crash"),
    ];
    let mut names = vec!["errors", "stall", "delay"];
    names.extend(
        candidates
            .into_iter()
            .filter(|(action, _)| action.applies_at(point))
            .map(|(_, name)| name),
    );
    names.join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(text: &str) -> String {
        text.parse::<FaultPlan>().unwrap_err().to_string()
    }

    #[test]
    fn canonical_text_prints_back_identically() {
        for text in [
            "seed=42; write@after=1MiB:enospc; commit:stall; write@nth=3:eio/once; \
             get:corrupt/p=0.25",
            "seed=0",
            "seed=7; begin:error=no_space/every=2; commit@published:crash/nth=5",
            "seed=1; part@nth=2:short; complete@published:errno=999; put:rate=1536KiB/s",
            "seed=3; write:delay=200ms/p=1; get:delay=2s/p=0; remove:delay=1500us; \
             recover:delay=7ns; list:stall; abort:crash; put@published:edquot",
        ] {
            let plan: FaultPlan = text.parse().unwrap();
            assert_eq!(plan.to_string(), text);
        }
    }

    #[test]
    fn other_spellings_read_to_the_same_plan() {
        let plan: FaultPlan = "  write@after=2048KiB:errno=28 ;commit:stall;"
            .parse()
            .unwrap();
        assert_eq!(
            plan.to_string(),
            "seed=0; write@after=2MiB:enospc; commit:stall"
        );
        let plan: FaultPlan = "get:delay=1000ms".parse().unwrap();
        assert_eq!(plan.to_string(), "seed=0; get:delay=1s");
        assert_eq!("".parse::<FaultPlan>().unwrap(), FaultPlan::new(0));
    }

    #[test]
    fn errors_point_at_the_bad_token_and_say_what_was_expected() {
        assert_eq!(
            parse_err("seed=42; write:xx"),
            format!("at 15: expected {EXPECTED_ACTION}, found \"xx\"")
        );
        assert_eq!(
            parse_err("wrote:eio"),
            format!("at 0: expected {EXPECTED_POINT}, found \"wrote\"")
        );
        assert_eq!(
            parse_err("get:short"),
            "at 4: expected an action that applies at get (errors, stall, delay, rate, \
             corrupt), found \"short\""
        );
        assert_eq!(
            parse_err("write:eio/twice"),
            format!("at 10: expected {EXPECTED_TRIGGER}, found \"twice\"")
        );
        assert_eq!(
            parse_err("write@after=1MB:eio"),
            "at 13: expected a size unit (KiB, MiB, GiB, TiB) or none, found \"MB\""
        );
        assert_eq!(
            parse_err("commit:delay=5"),
            "at 14: expected a duration unit (ns, us, ms, s), found end of input"
        );
        assert_eq!(
            parse_err("write:eio commit:stall"),
            "at 10: expected \";\" between rules, found \"commit\""
        );
        assert_eq!(
            parse_err("commit"),
            "at 6: expected \":\" and an action after the point, found end of input"
        );
        assert_eq!(
            parse_err("get:corrupt/p=1.5"),
            "at 14: expected a probability from 0 to 1, found \"1.5\""
        );
        assert_eq!(
            parse_err("write@nth=0:eio"),
            "at 10: expected a count (1 or more), found \"0\""
        );
        assert_eq!(
            parse_err("write@before=3:eio"),
            "at 6: expected a qualifier of write (nth=N or after=SIZE), found \"before\""
        );
        assert_eq!(
            parse_err("begin:error=disk_on_fire"),
            "at 12: expected an error kind (no_space, quota_exceeded, io, read_only, ...), \
             found \"disk_on_fire\""
        );
        assert_eq!(
            parse_err("put:rate=0/s"),
            "at 9: expected a rate above 0 (use stall to stop), found \"0\""
        );
        assert_eq!(
            parse_err("seed=x"),
            "at 5: expected a seed (a whole number), found \"x\""
        );
        assert_eq!(
            parse_err("write@after=99999999999999999999:eio"),
            "at 12: expected a smaller number, found \"99999999999999999999\""
        );
    }

    #[test]
    fn rules_refuse_actions_that_do_not_apply() {
        let err = FaultRule::new(FaultPoint::Write, FaultAction::Corrupt, Trigger::Always);
        assert_eq!(
            err.unwrap_err().to_string(),
            "corruption does not apply at write"
        );
        assert!(FaultRule::new(FaultPoint::Get, FaultAction::Corrupt, Trigger::Nth(0)).is_err());
        assert!(
            FaultRule::new(
                FaultPoint::Get,
                FaultAction::Corrupt,
                Trigger::Probability(-0.0)
            )
            .is_err()
        );
        assert!(FaultRule::new(FaultPoint::Get, FaultAction::Errno(0), Trigger::Once).is_err());
    }
}
