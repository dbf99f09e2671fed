//! How one sequence fails without taking its batch with it: the typed failure a client receives
//! ([`SequenceError`]), and the test-only hook that injects faults into chosen rows
//! ([`FaultInjection`]).
//!
//! The isolation rule (docs/RELIABILITY.md): anything that goes wrong for one row — non-finite
//! values, a sampler or stop-string error, a panic while handling its token — ends that
//! sequence with its error and frees its blocks; the other rows of the step keep exactly the
//! tokens they would have had. A failure of the step itself (the forward, the logits) re-queues
//! every sequence in it for recomputation; a sequence fails only if a step fails again while it
//! is on probation (see `Batcher`).

use super::EngineError;
use std::sync::atomic::{AtomicBool, Ordering};

/// Why the engine ended one sequence with an error. Converted once at the API edge into the
/// OpenAI error shape (status, type, code).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SequenceError {
    /// The row's logits, or the residual stream they come from, held NaN or infinity: what
    /// this sequence's adapter mix (or, without one, the base model) computed overflowed f32.
    #[error("the model's values for this sequence overflowed 32-bit floats{}", if *.with_adapters { " (its adapter mix computes values beyond their range)" } else { "" })]
    NonFinite { with_adapters: bool },
    /// Choosing or reporting this row's token failed (penalties, sampler, log-probabilities,
    /// detokenization, stop strings).
    #[error("choosing the next token failed: {0}")]
    Token(String),
    /// The structured-output grammar failed for this row (its mask or its state).
    #[error("the structured-output grammar failed: {0}")]
    Grammar(String),
    /// Handling this row panicked; the panic is caught so the batch survives it.
    #[error("the engine hit a bug while handling this sequence: {0}")]
    Panic(String),
    /// A forward step failed, the sequence was recomputed on probation, and a step failed
    /// again while it was in it.
    #[error("a forward step failed twice with this sequence in the batch: {0}")]
    StepFailed(String),
    /// The engine could not set the sequence up (a bug: e.g. its cached prefix did not fit).
    #[error("internal engine error for this sequence: {0}")]
    Internal(String),
    /// Refused at admission (the engine checks this at submission too).
    #[error(transparent)]
    Refused(EngineError),
    /// A fault injected by a test ([`FaultInjection`]).
    #[error("injected fault")]
    Injected,
}

impl SequenceError {
    /// The message of a caught panic payload.
    pub fn from_panic(payload: Box<dyn std::any::Any + Send>) -> Self {
        let msg = payload
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic without a message".into());
        SequenceError::Panic(msg)
    }
}

/// Which fault a [`FaultInjection`] causes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The row's logits become NaN.
    RowNan,
    /// Choosing the row's token returns an error.
    RowError,
    /// Choosing the row's token panics.
    RowPanic,
    /// Every forward step that includes the row fails (a fault the row causes).
    StepError,
    /// Every forward step that includes the row panics.
    StepPanic,
    /// The first forward step that includes the row fails, later ones succeed (a transient
    /// fault: nobody should fail).
    StepOnce,
    /// The HTTP handler panics after validating the request (before it reaches the engine).
    HandlerPanic,
}

/// Test-only: makes every sequence whose prompt contains `marker` (a token-id subsequence)
/// fault as `kind` says. Production configurations never set it.
#[derive(Debug)]
pub struct FaultInjection {
    pub marker: Vec<u32>,
    pub kind: FaultKind,
    fired: AtomicBool,
}

impl FaultInjection {
    pub fn new(marker: Vec<u32>, kind: FaultKind) -> Self {
        Self { marker, kind, fired: AtomicBool::new(false) }
    }

    /// The fault for a sequence with these prompt ids, if it is a marked one.
    pub fn fault_for(&self, prompt_ids: &[u32]) -> Option<FaultKind> {
        let marked = !self.marker.is_empty()
            && prompt_ids.windows(self.marker.len()).any(|w| w == self.marker.as_slice());
        marked.then_some(self.kind)
    }

    /// Whether a step holding a marked row must fail now (a one-shot fault fires once).
    pub fn step_fails(&self) -> bool {
        match self.kind {
            FaultKind::StepError | FaultKind::StepPanic => true,
            FaultKind::StepOnce => !self.fired.swap(true, Ordering::SeqCst),
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_match_subsequences_and_one_shot_faults_fire_once() {
        let f = FaultInjection::new(vec![5, 6], FaultKind::StepOnce);
        assert_eq!(f.fault_for(&[1, 5, 6, 7]), Some(FaultKind::StepOnce));
        assert_eq!(f.fault_for(&[5, 1, 6]), None);
        assert!(f.step_fails());
        assert!(!f.step_fails());
        assert!(FaultInjection::new(vec![], FaultKind::RowNan).fault_for(&[1]).is_none());
    }

    #[test]
    fn panic_payloads_become_messages() {
        let e = std::panic::catch_unwind(|| panic!("boom {}", 7)).unwrap_err();
        assert_eq!(SequenceError::from_panic(e), SequenceError::Panic("boom 7".into()));
    }
}
