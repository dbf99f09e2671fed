//! The scheduling decisions of one engine step, as a pure function of the running batch, the
//! queue, the KV pool and the budgets: which running sequences are preempted for blocks, which
//! waiting ones are refused (they can never fit), deferred (a running sequence is computing
//! their next prefix block) or admitted (with how many cached blocks), and how many tokens each
//! sequence of the resulting batch feeds. No tensors, no I/O, no clocks: the batcher describes
//! its sequences as views, executes the plan, and reports what it did.
//!
//! The rules, in the order they apply:
//! 1. Every running sequence reserves the blocks this step's tokens need, oldest first; while
//!    the pool cannot give them, the most recently admitted sequence is preempted (possibly the
//!    one reserving) and goes back to the front of the queue.
//! 2. A step that preempted admits nothing (the pool is short).
//! 3. Waiting sequences are admitted in arrival order while the batch has room, the step's
//!    prompt-token budget allows (the first admission always may) and their uncached blocks
//!    fit (cached blocks idle in the prefix cache count as available until taken). Exceptions: one that can never fit the pool is refused; one whose next prefix block
//!    a running (or just admitted) sequence is computing waits for it and keeps its place;
//!    one on probation is admitted only while no other sequence on probation runs.
//! 4. Decoding sequences feed their pending tokens; prefilling ones share the step's prompt
//!    budget in batch order, each at least one token.

use crate::model::kv_cache::{blocks_for, BLOCK_TOKENS};
use std::collections::HashSet;

/// What the planner knows of a running sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunningView {
    /// Blocks it must add to hold this step's tokens.
    pub need: usize,
    /// Blocks the pool regains if it is preempted (those that nothing else holds).
    pub frees: usize,
    /// On probation (a step failed with it).
    pub suspect: bool,
    /// Still prefilling (its prompt, or a recomputation): the prompt budget applies.
    pub prompt: bool,
    /// Tokens waiting to be fed.
    pub pending: usize,
    /// Chain hashes of the prefix blocks it is computing and has not registered yet.
    pub computing: Vec<u64>,
}

/// What the planner knows of a waiting sequence.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WaitingView {
    /// Tokens it would feed (its prompt, or everything after a preemption).
    pub pending: usize,
    /// Blocks its prompt and `max_tokens` take together.
    pub max_blocks: usize,
    pub suspect: bool,
    /// Leading full blocks of `pending` the prefix cache holds (never the last token's block).
    pub cached: usize,
    /// Of those, the ones idle now (held by the cache alone): they count as available until
    /// this sequence takes them.
    pub idle_cached: usize,
    /// Chain hashes of the full blocks after the cached ones, up to the last token's block:
    /// the first is the block it would next take from the cache, all are the blocks it
    /// computes once admitted.
    pub uncached: Vec<u64>,
}

/// The pool as the step finds it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolView {
    pub capacity: usize,
    /// Blocks an allocation could get now (free, or idle in the prefix cache).
    pub available: usize,
}

/// The step's limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Budgets {
    /// Running sequences at most.
    pub max_batch: usize,
    /// Prompt tokens admitted in one step at most (beyond the first admission).
    pub prefill_chunk: usize,
    /// Prompt tokens fed this step when some sequence decodes (the pacer's chunk); when none
    /// does, `prefill_chunk`.
    pub paced_chunk: usize,
}

/// One admission: the waiting sequence at `index` (in the queue as the planner saw it) with
/// its first `cached` blocks taken from the prefix cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admission {
    pub index: usize,
    pub cached: usize,
}

/// What the step does.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StepPlan {
    /// The last `preempt` running sequences go back to the front of the queue (the last
    /// admitted first to leave, so the queue keeps their admission order).
    pub preempt: usize,
    /// Waiting sequences (by index) refused for good: they can never fit the pool.
    pub refuse: Vec<usize>,
    /// Waiting sequences admitted, in queue order.
    pub admit: Vec<Admission>,
    /// Waiting sequences passed over because a running one computes their next block.
    pub deferred: usize,
    /// Tokens each sequence of the resulting batch feeds: the running ones that stay, in
    /// order, then the admitted ones.
    pub feeds: Vec<usize>,
    /// The prompt tokens the step's prefilling sequences share (rule 4's budget).
    pub prefill_budget: usize,
}

impl StepPlan {
    /// What each sequence of `batch` feeds under this plan's budget: the plan's own feeds
    /// when the batch is the one planned, the same rule applied to the batch that runs when
    /// the pool turned out shorter than planned (fewer admitted, more preempted).
    pub fn feeds_for(&self, batch: &[(bool, usize)]) -> Vec<usize> {
        if batch.len() == self.feeds.len() {
            return self.feeds.clone();
        }
        feeds(batch, self.prefill_budget)
    }
}

/// Plans one step. `waiting` is consumed only as far as admission looks, so views may be
/// built lazily.
pub fn plan(
    running: &[RunningView],
    waiting: impl IntoIterator<Item = WaitingView>,
    pool: PoolView,
    b: &Budgets,
) -> StepPlan {
    let mut plan = StepPlan::default();
    let mut available = pool.available;
    let kept = reserve(running, &mut available, &mut plan);
    let mut batch: Vec<(bool, usize)> =
        running[..kept].iter().map(|r| (r.prompt, r.pending)).collect();
    if plan.preempt == 0 {
        admit(&running[..kept], waiting, pool.capacity, available, b, &mut plan, &mut batch);
    }
    let decoding = running[..kept].iter().any(|r| !r.prompt);
    plan.prefill_budget = if decoding { b.paced_chunk } else { b.prefill_chunk };
    plan.feeds = feeds(&batch, plan.prefill_budget);
    plan
}

/// Rule 4: what each sequence of a batch (`(prefilling, pending tokens)`, in order) feeds when
/// prefilling ones share `budget` prompt tokens.
pub fn feeds(batch: &[(bool, usize)], mut budget: usize) -> Vec<usize> {
    batch
        .iter()
        .map(|&(prompt, pending)| {
            if !prompt {
                return pending;
            }
            let take = pending.min(budget.max(1));
            budget = budget.saturating_sub(take);
            take
        })
        .collect()
}

/// Rule 1: the running sequences' reservations, preempting from the back while short.
/// Returns how many stay; `available` is left with what the pool still has.
fn reserve(running: &[RunningView], available: &mut usize, plan: &mut StepPlan) -> usize {
    let mut kept = running.len();
    let mut i = 0;
    while i < kept {
        while *available < running[i].need && i < kept {
            kept -= 1;
            plan.preempt += 1;
            *available += running[kept].frees;
        }
        if i < kept {
            *available -= running[i].need;
        }
        i += 1;
    }
    kept
}

/// Rules 2 and 3: admissions from the queue into `batch`.
fn admit(
    kept: &[RunningView],
    waiting: impl IntoIterator<Item = WaitingView>,
    capacity: usize,
    mut available: usize,
    b: &Budgets,
    plan: &mut StepPlan,
    batch: &mut Vec<(bool, usize)>,
) {
    let mut computing: HashSet<u64> =
        kept.iter().flat_map(|r| r.computing.iter().copied()).collect();
    let mut suspect_running = kept.iter().any(|r| r.suspect);
    let mut tokens = 0;
    for (index, w) in waiting.into_iter().enumerate() {
        if batch.len() >= b.max_batch {
            break;
        }
        if w.max_blocks > capacity {
            plan.refuse.push(index);
            continue;
        }
        if w.suspect && suspect_running {
            break;
        }
        if w.uncached.first().is_some_and(|h| computing.contains(h)) {
            plan.deferred += 1;
            continue;
        }
        let todo = w.pending - w.cached * BLOCK_TOKENS;
        let need = blocks_for(w.pending) - w.cached + w.idle_cached;
        if (!plan.admit.is_empty() && tokens + todo > b.prefill_chunk) || need > available {
            break;
        }
        available -= need;
        tokens += todo;
        suspect_running |= w.suspect;
        computing.extend(w.uncached.iter().copied());
        plan.admit.push(Admission { index, cached: w.cached });
        batch.push((true, todo));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn budgets() -> Budgets {
        Budgets { max_batch: 4, prefill_chunk: 64, paced_chunk: 8 }
    }

    fn decoding(need: usize, frees: usize) -> RunningView {
        RunningView { need, frees, pending: 1, ..Default::default() }
    }

    fn waiting(pending: usize) -> WaitingView {
        WaitingView { pending, max_blocks: blocks_for(pending + 8), ..Default::default() }
    }

    #[test]
    fn admission_keeps_arrival_order_within_the_budgets() {
        let w = vec![waiting(40), waiting(20), waiting(30), waiting(5)];
        let p = plan(&[], w, PoolView { capacity: 100, available: 100 }, &budgets());
        // 40 + 20 fit the 64-token chunk; the third would pass it and stops admission.
        assert_eq!(p.admit.iter().map(|a| a.index).collect::<Vec<_>>(), [0, 1]);
        assert_eq!(p.feeds, [40, 20]);
        // The first admission always may, whatever its size; the blocks still must fit.
        let p =
            plan(&[], vec![waiting(500)], PoolView { capacity: 100, available: 40 }, &budgets());
        assert_eq!(p.admit.len(), 1);
        assert_eq!(p.feeds, [64], "fed in chunks");
        let p =
            plan(&[], vec![waiting(500)], PoolView { capacity: 100, available: 20 }, &budgets());
        assert!(p.admit.is_empty());
    }

    /// The batcher runs the plan's feeds; when the pool turned out shorter and fewer run, the
    /// plan's own budget decides theirs (the batcher computes none).
    #[test]
    fn a_shorter_batch_feeds_under_the_plans_budget() {
        let running = [decoding(0, 1)];
        let w = vec![waiting(40), waiting(20)];
        let p = plan(&running, w, PoolView { capacity: 100, available: 100 }, &budgets());
        assert_eq!((p.prefill_budget, p.feeds.as_slice()), (8, &[1, 8, 1][..]));
        assert_eq!(p.feeds_for(&[(false, 1), (true, 40), (true, 20)]), p.feeds);
        // Only the first admission ran: it takes the paced budget alone.
        assert_eq!(p.feeds_for(&[(false, 1), (true, 40)]), [1, 8]);
    }

    #[test]
    fn a_sequence_that_can_never_fit_is_refused_and_the_next_goes_on() {
        let w = vec![WaitingView { max_blocks: 101, ..waiting(10) }, waiting(10)];
        let p = plan(&[], w, PoolView { capacity: 100, available: 100 }, &budgets());
        assert_eq!(p.refuse, [0]);
        assert_eq!(p.admit, [Admission { index: 1, cached: 0 }]);
    }

    #[test]
    fn the_most_recently_admitted_is_preempted_and_nothing_is_admitted_then() {
        let running = [decoding(1, 5), decoding(1, 3), decoding(1, 2)];
        let p =
            plan(&running, vec![waiting(4)], PoolView { capacity: 100, available: 1 }, &budgets());
        // The first takes the only free block; the second is short: the last goes, its 2
        // blocks serve the second.
        assert_eq!(p.preempt, 1);
        assert!(p.admit.is_empty());
        assert_eq!(p.feeds, [1, 1]);
        // A sequence short of blocks with nothing behind it preempts itself.
        let p =
            plan(&[decoding(2, 4)], vec![], PoolView { capacity: 100, available: 1 }, &budgets());
        assert_eq!((p.preempt, p.feeds.len()), (1, 0));
    }

    #[test]
    fn a_prefix_being_computed_defers_its_followers() {
        let leader = WaitingView { uncached: vec![11, 12, 13], ..waiting(60) };
        let follower = WaitingView { uncached: vec![11, 12, 13], ..waiting(60) };
        let other = WaitingView { uncached: vec![21], ..waiting(20) };
        let b = Budgets { prefill_chunk: 512, ..budgets() };
        let p = plan(
            &[],
            vec![leader, follower.clone(), follower, other],
            PoolView { capacity: 100, available: 100 },
            &b,
        );
        assert_eq!(p.admit.iter().map(|a| a.index).collect::<Vec<_>>(), [0, 3]);
        assert_eq!(p.deferred, 2);
        // Once the leader has registered its blocks, the follower takes them from the cache.
        let follower = WaitingView { cached: 3, uncached: vec![], ..waiting(60) };
        let p =
            plan(&[decoding(0, 0)], vec![follower], PoolView { capacity: 100, available: 100 }, &b);
        assert_eq!(p.admit, [Admission { index: 0, cached: 3 }]);
        assert_eq!(p.feeds, [1, 8], "its 12 uncached tokens, paced while another decodes");
    }

    #[test]
    fn one_sequence_on_probation_runs_at_a_time() {
        let suspect = WaitingView { suspect: true, ..waiting(10) };
        let p = plan(
            &[],
            vec![suspect.clone(), suspect.clone()],
            PoolView { capacity: 100, available: 100 },
            &budgets(),
        );
        assert_eq!(p.admit.len(), 1);
        let running = [RunningView { suspect: true, ..decoding(0, 1) }];
        let p =
            plan(&running, vec![suspect], PoolView { capacity: 100, available: 100 }, &budgets());
        assert!(p.admit.is_empty());
    }

    #[test]
    fn decoding_sequences_feed_their_token_and_prompts_share_the_paced_budget() {
        let running =
            [decoding(0, 1), RunningView { prompt: true, pending: 100, ..Default::default() }];
        let p = plan(
            &running,
            vec![waiting(30)],
            PoolView { capacity: 100, available: 100 },
            &budgets(),
        );
        // The paced chunk (8) goes to the first prompt; the admitted one still gets a token.
        assert_eq!(p.feeds, [1, 8, 1]);
    }

    /// Random batches, queues and pools: whatever the plan, it never allocates more than the
    /// pool has, never passes the batch size, admits in queue order, refuses exactly what can
    /// never fit before it stops, preempts only from the back and only while short, and gives
    /// every prompt at least one token within the budget.
    #[test]
    fn random_plans_keep_every_invariant() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for case in 0..5000 {
            let b = Budgets {
                max_batch: rng.random_range(1..8),
                prefill_chunk: rng.random_range(1..200),
                paced_chunk: rng.random_range(1..50),
            };
            let pool = PoolView { capacity: rng.random_range(1..60), available: 0 };
            let pool = PoolView { available: rng.random_range(0..=pool.capacity), ..pool };
            let running: Vec<RunningView> = (0..rng.random_range(0..b.max_batch + 1))
                .map(|_| RunningView {
                    need: rng.random_range(0..3),
                    frees: rng.random_range(0..6),
                    suspect: rng.random_bool(0.1),
                    prompt: rng.random_bool(0.3),
                    pending: rng.random_range(1..100),
                    computing: (0..rng.random_range(0..3))
                        .map(|_| rng.random_range(0..6))
                        .collect(),
                })
                .collect();
            let waiting: Vec<WaitingView> = (0..rng.random_range(0..8))
                .map(|_| {
                    let pending = rng.random_range(1..120);
                    let full = (pending - 1) / BLOCK_TOKENS;
                    let cached = rng.random_range(0..=full);
                    WaitingView {
                        pending,
                        max_blocks: blocks_for(pending) + rng.random_range(0..70),
                        suspect: rng.random_bool(0.1),
                        cached,
                        idle_cached: rng.random_range(0..=cached),
                        uncached: (cached..full).map(|_| rng.random_range(0..6)).collect(),
                    }
                })
                .collect();
            let p = plan(&running, waiting.clone(), pool, &b);
            let kept = running.len() - p.preempt;
            let what = format!("case {case}: {running:?} {waiting:?} {pool:?} {b:?} → {p:?}");
            // Preemption: from the back, and only while short (one fewer victim would not do).
            let frees: usize = running[kept..].iter().map(|r| r.frees).sum();
            let needs: usize = running[..kept].iter().map(|r| r.need).sum();
            assert!(needs <= pool.available + frees, "{what}");
            if p.preempt > 0 {
                let with_one_more: usize = running[..=kept].iter().map(|r| r.need).sum();
                let frees_less: usize = running[kept + 1..].iter().map(|r| r.frees).sum();
                assert!(with_one_more > pool.available + frees_less, "preempted too many: {what}");
                assert!(p.admit.is_empty(), "{what}");
            }
            // Admission: the batch size, queue order, blocks within what is left, the suspects.
            assert!(kept + p.admit.len() <= b.max_batch.max(running.len()), "{what}");
            assert!(p.admit.windows(2).all(|w| w[0].index < w[1].index), "{what}");
            let admitted_need: usize = p
                .admit
                .iter()
                .map(|a| {
                    blocks_for(waiting[a.index].pending) - a.cached + waiting[a.index].idle_cached
                })
                .sum();
            assert!(needs + admitted_need <= pool.available + frees, "blocks leak: {what}");
            let suspects = running[..kept].iter().filter(|r| r.suspect).count()
                + p.admit.iter().filter(|a| waiting[a.index].suspect).count();
            let new_suspects = p.admit.iter().filter(|a| waiting[a.index].suspect).count();
            assert!(new_suspects == 0 || suspects == 1, "two on probation: {what}");
            // Refusals: exactly the never-fits the planner looked at, all before it stopped.
            let looked =
                p.admit.last().map_or(0, |a| a.index + 1).max(p.refuse.last().map_or(0, |r| r + 1));
            for (i, w) in waiting.iter().enumerate().take(looked) {
                assert_eq!(p.refuse.contains(&i), w.max_blocks > pool.capacity, "{what}");
            }
            // Feeds: one per sequence, decoders their pending, prompts ≥ 1 and within budget.
            assert_eq!(p.feeds.len(), kept + p.admit.len(), "{what}");
            let decoding = running[..kept].iter().any(|r| !r.prompt);
            let budget = if decoding { b.paced_chunk } else { b.prefill_chunk };
            let prompts: Vec<usize> = running[..kept]
                .iter()
                .zip(&p.feeds)
                .filter(|(r, _)| r.prompt)
                .map(|(_, &f)| f)
                .chain(p.feeds[kept..].iter().copied())
                .collect();
            assert!(prompts.iter().all(|&f| f >= 1), "{what}");
            assert!(
                prompts.iter().sum::<usize>() <= budget.max(prompts.len()) + prompts.len(),
                "{what}"
            );
            for (r, &f) in running[..kept].iter().zip(&p.feeds) {
                assert!(f <= r.pending && (r.prompt || f == r.pending), "{what}");
            }
        }
    }
}

/// Whether the engine runs a background slice (a training pass) before its next step: at full
/// speed once no sequence has run for [`IDLE_GRACE`] (a closed-loop client's next request
/// arrives well within it, so a gap between requests is not idleness); while sequences run,
/// once `gap` steps have passed since the last slice (0 = never while serving) and, so that
/// slices take at most [`BACKGROUND_SHARE`] of the time, once the time since the last slice is
/// `(1 - share) / share` times what it took.
pub fn background_due(
    batch_empty: bool,
    idle_for: std::time::Duration,
    steps_since: usize,
    gap: usize,
    since_last: std::time::Duration,
    last_took: std::time::Duration,
) -> bool {
    if batch_empty {
        return idle_for >= IDLE_GRACE;
    }
    let rest = last_took.mul_f64((1.0 - BACKGROUND_SHARE) / BACKGROUND_SHARE);
    gap > 0 && steps_since >= gap && since_last >= rest
}

/// The most of the engine's time background work takes while sequences run.
pub const BACKGROUND_SHARE: f64 = 0.1;

/// How long no sequence must have run before background work takes the engine at full speed.
pub const IDLE_GRACE: std::time::Duration = std::time::Duration::from_millis(500);

#[cfg(test)]
mod background_tests {
    use super::background_due;
    use std::time::Duration;

    #[test]
    fn background_work_yields_to_sequences() {
        let (s, ms) = (Duration::from_secs, Duration::from_millis);
        let idle = |for_| background_due(true, for_, 0, 200, s(0), s(5));
        assert!(idle(ms(500)) && idle(s(60)), "an idle engine trains at full speed");
        assert!(!idle(ms(100)), "a gap between two requests is not idleness");
        let busy = |steps, gap, since, took| background_due(false, s(0), steps, gap, since, took);
        assert!(!busy(199, 200, s(100), ms(1)));
        assert!(busy(200, 200, s(100), ms(1)));
        assert!(!busy(10_000, 0, s(100), ms(1)), "gap 0: never while serving");
        // A 1 s slice waits 9 s: at most a tenth of the time while serving.
        assert!(!busy(500, 200, ms(8_900), s(1)));
        assert!(busy(500, 200, ms(9_000), s(1)));
    }
}
