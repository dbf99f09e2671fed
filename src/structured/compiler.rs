//! Where grammars compile: a few threads of their own, each with a stack large enough for
//! llguidance's recursion over any grammar the bounds of [`super::limits`] admit (the stack
//! is reserved address space, touched only as deep as a compile goes). A request waits for
//! its compile up to the time budget and is then answered; a compile that overran keeps its
//! thread until llguidance returns, and its result is dropped. A panic inside llguidance
//! fails that compile only. Nothing here runs on the engine thread or on the HTTP workers.

use super::{ConstraintSpec, Grammar, StructuredError};
use crate::kernels::alloc::retained;
use llguidance::{Matcher, ParserFactory};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Stack of each compile thread. Measured need at the bounds (examples/stack_probe.rs): a
/// 64 KiB chain of Lark rules 12–14 MiB, a chain of 1,000 `$ref`s under 8 MiB; the default
/// 2 MiB of a pool thread overflowed at 500 rules or 300 `$ref`s.
pub const COMPILE_STACK_BYTES: usize = 256 << 20;
/// Compiles waiting for a thread at most; more are answered 503 at once.
const QUEUE: usize = 64;
/// A compile error's message is cut to this many characters (llguidance's messages can echo
/// the whole grammar).
const MESSAGE_CHARS: usize = 240;

/// What a compile thread hands back: the grammar and the bytes it keeps.
pub struct Compiled {
    pub grammar: Grammar,
    pub bytes: usize,
}

struct Job {
    spec: ConstraintSpec,
    deadline: Instant,
    started: Arc<AtomicBool>,
    reply: SyncSender<Result<Compiled, StructuredError>>,
}

pub struct Compiler {
    jobs: SyncSender<Job>,
    budget: Duration,
}

impl Compiler {
    /// `threads` compile threads over `factory`; each compile may take `budget`.
    pub fn start(
        factory: Arc<ParserFactory>,
        threads: usize,
        budget: Duration,
    ) -> Result<Self, StructuredError> {
        let (jobs, rx) = mpsc::sync_channel::<Job>(QUEUE);
        let rx = Arc::new(Mutex::new(rx));
        for i in 0..threads.max(1) {
            let (rx, factory) = (rx.clone(), factory.clone());
            std::thread::Builder::new()
                .name(format!("grammar-compile-{i}"))
                .stack_size(COMPILE_STACK_BYTES)
                .spawn(move || work(&rx, &factory))
                .map_err(|e| {
                    StructuredError::Tokenizer(format!("starting a compile thread: {e}"))
                })?;
        }
        Ok(Self { jobs, budget })
    }

    pub fn budget(&self) -> Duration {
        self.budget
    }

    /// Compiles `spec` on a compile thread, waiting at most the budget.
    pub fn compile(&self, spec: ConstraintSpec) -> Result<Compiled, StructuredError> {
        let deadline = Instant::now() + self.budget;
        let started = Arc::new(AtomicBool::new(false));
        let (reply, answer) = mpsc::sync_channel(1);
        let job = Job { spec, deadline, started: started.clone(), reply };
        match self.jobs.try_send(job) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => return Err(StructuredError::Busy),
            Err(TrySendError::Disconnected(_)) => {
                return Err(StructuredError::Tokenizer("the compile threads have stopped".into()))
            }
        }
        wait(&answer, deadline, &started, self.budget)
    }
}

fn wait(
    answer: &Receiver<Result<Compiled, StructuredError>>,
    deadline: Instant,
    started: &AtomicBool,
    budget: Duration,
) -> Result<Compiled, StructuredError> {
    match answer.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
        Ok(r) => r,
        Err(RecvTimeoutError::Timeout) if started.load(Ordering::SeqCst) => {
            Err(StructuredError::Timeout { budget })
        }
        Err(RecvTimeoutError::Timeout) => Err(StructuredError::Busy),
        Err(RecvTimeoutError::Disconnected) => Err(StructuredError::Busy),
    }
}

fn work(rx: &Mutex<Receiver<Job>>, factory: &ParserFactory) {
    loop {
        let job = match rx.lock() {
            Ok(rx) => match rx.recv() {
                Ok(job) => job,
                Err(_) => return,
            },
            Err(_) => return,
        };
        // Its request has already been answered.
        if Instant::now() >= job.deadline {
            continue;
        }
        job.started.store(true, Ordering::SeqCst);
        let spec = job.spec;
        let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let started = Instant::now();
            let (grammar, bytes) = retained(|| build(factory, &spec));
            grammar.map(|fresh| Compiled {
                grammar: Grammar { fresh, compile_time: started.elapsed() },
                bytes,
            })
        }))
        .unwrap_or_else(|_| Err(internal("the grammar compiler panicked")));
        let _ = job.reply.try_send(out);
    }
}

/// Compiles and computes the first mask, so a grammar that compiles but cannot start is
/// refused while its request is validated, not after it queued.
fn build(factory: &ParserFactory, spec: &ConstraintSpec) -> Result<Matcher, StructuredError> {
    let parser = factory
        .create_parser(super::top_level(spec)?)
        .map_err(|e| compile_error(&e.to_string()))?;
    let mut fresh = Matcher::new(Ok(parser));
    if let Some(e) = fresh.get_error() {
        return Err(compile_error(&e));
    }
    fresh.compute_mask().map_err(|e| compile_error(&e.to_string()))?;
    Ok(fresh)
}

fn internal(detail: &str) -> StructuredError {
    tracing::warn!(%detail, "grammar compile failed inside llguidance");
    StructuredError::Compile("the grammar compiler failed on this input".into())
}

/// llguidance's message as one short line: its panics (with backtraces) are logged, not
/// shown; its first line is kept, cut to [`MESSAGE_CHARS`].
pub fn compile_error(msg: &str) -> StructuredError {
    if msg.starts_with("panic:") || msg.contains("<backtrace>") {
        return internal(msg);
    }
    StructuredError::Compile(one_line(msg))
}

/// The first non-empty line of `msg`, at most [`MESSAGE_CHARS`] characters.
pub fn one_line(msg: &str) -> String {
    let line = msg.lines().map(str::trim).find(|l| !l.is_empty()).unwrap_or("unknown error");
    match line.char_indices().nth(MESSAGE_CHARS) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_one_short_line_and_panics_are_not_shown() {
        let long = format!("at 1(8): invalid regex \"{}\"\n   1 | start: ((((", "(".repeat(5000));
        let StructuredError::Compile(m) = compile_error(&long) else { panic!() };
        assert!(m.chars().count() <= MESSAGE_CHARS + 1 && !m.contains('\n'), "{m}");
        let StructuredError::Compile(m) =
            compile_error("panic: assertion failed\n<backtrace>\n 0: std::rt\n</backtrace>")
        else {
            panic!()
        };
        assert_eq!(m, "the grammar compiler failed on this input");
    }
}
