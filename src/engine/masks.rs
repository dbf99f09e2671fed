//! Token masks of constrained sequences (structured outputs), computed on helper threads while
//! the step's forward runs, so that they stay off the critical path: each constrained row that
//! samples this step gets the set of tokens its grammar allows next. A mask that fails (or a
//! helper that panics) fails its own sequence only, when that row chooses its token.

use super::sequence::Sequence;
use crate::structured::{Matcher, TokenMask};
use std::time::{Duration, Instant};

/// A constrained sequence's grammar state, and the mask for the token it samples next.
pub struct Constrained {
    /// `None` only while the helper holds it (or after the helper lost it).
    pub matcher: Option<Matcher>,
    pub mask: Option<Result<TokenMask, String>>,
}

impl Constrained {
    pub fn new(matcher: Matcher) -> Self {
        Self { matcher: Some(matcher), mask: None }
    }
}

/// The time masks took this step.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MaskTimes {
    /// Computing the masks: the busiest helper's time.
    pub compute: Duration,
    /// How long the engine waited for the helper after its forward.
    pub wait: Duration,
}

/// Matchers lent to the helper for one step: `(row, matcher)`.
pub struct Jobs(Vec<(usize, Matcher)>);

/// Takes the matchers of the rows of `running` that sample this step (`samples`).
pub fn take(running: &mut [Sequence], samples: &[bool]) -> Jobs {
    let mut jobs = Vec::new();
    for (row, (s, _)) in running.iter_mut().zip(samples).enumerate().filter(|(_, (_, &x))| x) {
        if let Some(c) = s.constraint.as_mut() {
            c.mask = None;
            if let Some(m) = c.matcher.take() {
                jobs.push((row, m));
            }
        }
    }
    Jobs(jobs)
}

/// Stack of each mask helper: llguidance's lexer recurses over a grammar's regular
/// expressions; the space is reserved, and touched only as deep as a mask goes.
const HELPER_STACK_BYTES: usize = 64 << 20;

/// Runs `forward` while the masks of `jobs` are computed beside it, split over up to as many
/// helpers as the machine has threads: when the forward ends first, the engine waits for the
/// slowest helper's share rather than for every mask in a row.
pub fn beside<T>(jobs: Jobs, forward: impl FnOnce() -> T) -> (T, Done, MaskTimes) {
    if jobs.0.is_empty() {
        return (forward(), Done::default(), MaskTimes::default());
    }
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 8);
    let per = jobs.0.len().div_ceil(threads);
    let mut shares: Vec<Vec<(usize, Matcher)>> = Vec::new();
    let mut rest = jobs.0;
    while !rest.is_empty() {
        let tail = rest.split_off(per.min(rest.len()));
        shares.push(std::mem::replace(&mut rest, tail));
    }
    std::thread::scope(|scope| {
        let helpers: Vec<_> = shares
            .into_iter()
            .map(|share| {
                let b = std::thread::Builder::new().stack_size(HELPER_STACK_BYTES);
                // A helper that cannot start computes nothing: its rows fail when they choose.
                b.spawn_scoped(scope, move || compute(share)).ok()
            })
            .collect();
        let out = forward();
        let waiting = Instant::now();
        let (mut done, mut compute) = (Done::default(), Duration::ZERO);
        for h in helpers.into_iter().flatten() {
            if let Ok((part, took)) = h.join() {
                done.0.extend(part.0);
                compute = compute.max(took);
            }
        }
        let times = MaskTimes { compute, wait: waiting.elapsed() };
        (out, done, times)
    })
}

/// Hands every matcher back to its sequence with its mask. A matcher the helper lost (it
/// panicked outside the guarded call) leaves its sequence without one: that row fails when it
/// chooses its token.
pub fn put_back(running: &mut [Sequence], done: Done) {
    for (row, matcher, mask) in done.0 {
        if let Some(c) = running.get_mut(row).and_then(|s| s.constraint.as_mut()) {
            c.matcher = Some(matcher);
            c.mask = Some(mask);
        }
    }
}

/// What the helper returns: each row's matcher and mask.
#[derive(Default)]
pub struct Done(Vec<(usize, Matcher, Result<TokenMask, String>)>);

fn compute(jobs: Vec<(usize, Matcher)>) -> (Done, Duration) {
    let started = Instant::now();
    let done = jobs
        .into_iter()
        .map(|(row, mut m)| {
            let mask = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| m.compute_mask()))
                .map_err(|_| "computing the token mask panicked".to_string())
                .and_then(|r| r.map_err(|e| crate::structured::compiler::one_line(&e.to_string())));
            (row, m, mask)
        })
        .collect();
    (Done(done), started.elapsed())
}
