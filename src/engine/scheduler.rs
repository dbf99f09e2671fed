//! The pure admission planner: which waiting sequences join the next step. No IO, no tensors.

/// How many of `waiting` (prompt lengths, in arrival order) join a step that already runs
/// `running` sequences. Arrival order is kept (no overtaking, so nothing starves); at least one
/// sequence is admitted when there is room, even if its prompt alone exceeds the prefill budget.
pub fn admit(waiting: &[usize], running: usize, max_batch: usize, max_prefill_tokens: usize) -> usize {
    let mut tokens = 0;
    let mut n = 0;
    for &len in waiting {
        if running + n >= max_batch || (n > 0 && tokens + len > max_prefill_tokens) {
            break;
        }
        tokens += len;
        n += 1;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::admit;

    #[test]
    fn never_exceeds_the_batch_size() {
        assert_eq!(admit(&[1; 10], 30, 32, 1000), 2);
        assert_eq!(admit(&[1; 10], 32, 32, 1000), 0);
    }

    #[test]
    fn respects_the_prefill_budget_but_always_makes_progress() {
        assert_eq!(admit(&[600, 600, 600], 0, 32, 1000), 1);
        assert_eq!(admit(&[5000], 0, 32, 1000), 1, "an oversized prompt still runs, alone");
        assert_eq!(admit(&[300, 300, 300, 300], 0, 32, 1000), 3);
    }

    #[test]
    fn keeps_arrival_order() {
        // Everything that fits in order joins; a short prompt behind one that does not fit waits
        // its turn rather than overtaking it.
        assert_eq!(admit(&[900, 50, 10], 0, 32, 1000), 3);
        assert_eq!(admit(&[900, 200, 10], 0, 32, 1000), 1);
    }
}
