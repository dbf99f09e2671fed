//! Training clients on the serving process (the online-training loop's trainer side, in the
//! shape Tinker-style trainers drive): a client owns one LoRA's parameters and AdamW state over
//! the engine's own frozen model; `forward_backward` on token sequences with a named loss adds
//! to its gradients and returns per-token log-probabilities, `optim_step` applies them, `save`
//! writes the adapter as a new version of a name (served at once) and the client's state for
//! a restart. Passes run on the engine thread as background work ([`crate::engine::Background`],
//! one command per slice, yielding to serving as fine-tuning jobs do); validation is the HTTP
//! edge's (`api::training`).

use crate::adapters::registry::Registry;
use crate::adapters::PeftConfig;
use crate::model::lora::{AdapterMix, LoraAdapter};
use crate::model::{BatchInput, Decoder, DecoderConfig, Exec, StepLora};
use crate::train::optim::{clip_grad_norm, AdamW};
use crate::train::params::LoraParams;
use candle_core::{DType, Tensor, Var, D};
use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use tokio::sync::oneshot;

/// Rows whose logits are computed together when only their log-probabilities are wanted.
const CHUNK: usize = 64;

/// Training clients a server holds at once: each keeps its weights, AdamW moments and
/// gradients (about 4× its adapter's size) in memory.
pub const MAX_CLIENTS: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum OnlineError {
    #[error("no training client `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("training is unavailable on this server: {0}")]
    Unavailable(String),
    #[error("training failed: {0}")]
    Failed(String),
    #[error("this server holds {0} training clients, its limit; delete one first")]
    Full(usize),
}

impl From<candle_core::Error> for OnlineError {
    fn from(e: candle_core::Error) -> Self {
        OnlineError::Failed(e.to_string())
    }
}

impl From<anyhow::Error> for OnlineError {
    fn from(e: anyhow::Error) -> Self {
        OnlineError::Failed(e.to_string())
    }
}

type Result<T> = std::result::Result<T, OnlineError>;

/// The loss of a `forward_backward`, by the names Tinker-style trainers use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Loss {
    /// `−Σ_i w_i · log p(t_i)`.
    CrossEntropy,
    /// `−Σ_i exp(log p(t_i) − q_i) · A_i`, with `q_i` the sampler's log-probability: its
    /// gradient is the importance-weighted policy gradient.
    ImportanceSampling,
}

/// One sequence of a pass, validated: per-token values are aligned with `tokens` (entry `i`
/// is about predicting token `i`; entry 0, which nothing predicts, is 0).
#[derive(Debug, Clone)]
pub struct Datum {
    pub tokens: Vec<u32>,
    /// Cross-entropy weights, or advantages for importance sampling.
    pub weights: Vec<f32>,
    /// The sampler's log-probabilities (importance sampling).
    pub sampler_logprobs: Vec<f32>,
}

/// What a `forward_backward` answers.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PassOut {
    pub loss: f64,
    /// Per datum, per token: `log p(t_i | t_<i)`; `None` for the first token.
    pub logprobs: Vec<Vec<Option<f32>>>,
    /// Tokens whose weight is not zero (what the loss sums over).
    pub loss_tokens: usize,
    /// Passes accumulated since the last `optim_step`, this one included.
    pub accumulated: usize,
}

/// AdamW's hyper-parameters for one `optim_step`.
#[derive(Debug, Clone, Copy)]
pub struct AdamParams {
    pub learning_rate: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip; 0 = off.
    pub max_grad_norm: f64,
}

/// How a new client starts.
#[derive(Debug, Clone)]
pub enum Start {
    /// Fresh LoRA (`B = 0`: the base model) of this config, `A` drawn from `seed`.
    Fresh { config: PeftConfig, seed: u64 },
    /// The weights of a served adapter version, with its config.
    From { adapter: Arc<LoraAdapter>, config: PeftConfig },
}

/// What `/v1/training/clients` shows of one client.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ClientInfo {
    pub id: String,
    pub object: &'static str,
    /// The adapter name `save` writes versions of.
    pub adapter: String,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: serde_json::Value,
    pub steps: u64,
    /// Passes accumulated since the last `optim_step`.
    pub accumulated: usize,
    /// Versions `save` made, newest last.
    pub saved_versions: Vec<u64>,
}

struct Trainable {
    params: LoraParams,
    vars: Vec<Var>,
    opt: AdamW,
    grads: Vec<Option<Tensor>>,
}

struct Client {
    id: String,
    adapter: String,
    config: PeftConfig,
    /// Built on the engine thread at the first command (it needs the model's device and base).
    start: Option<Start>,
    /// Restored from the state folder at the first command after a restart.
    restore: Option<PathBuf>,
    live: Option<Trainable>,
    steps: u64,
    accumulated: usize,
    saved_versions: Vec<u64>,
}

enum Command {
    ForwardBackward {
        client: Arc<Mutex<Client>>,
        data: Vec<Datum>,
        loss: Loss,
        reply: oneshot::Sender<Result<PassOut>>,
    },
    OptimStep {
        client: Arc<Mutex<Client>>,
        adam: AdamParams,
        reply: oneshot::Sender<Result<ClientInfo>>,
    },
    /// The current weights as a detached adapter (for `sample` and `save`).
    Snapshot { client: Arc<Mutex<Client>>, reply: oneshot::Sender<Result<Arc<LoraAdapter>>> },
}

/// The training clients of one server.
pub struct TrainingClients {
    dir: PathBuf,
    registry: Arc<Registry>,
    cfg: DecoderConfig,
    trainable: std::result::Result<(), String>,
    clients: Mutex<HashMap<String, Arc<Mutex<Client>>>>,
    queue: Mutex<VecDeque<Command>>,
    engine: OnceLock<crate::engine::Engine>,
    serial: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Saved {
    id: String,
    adapter: String,
    config: serde_json::Value,
    steps: u64,
    saved_versions: Vec<u64>,
}

impl TrainingClients {
    /// The clients under `dir` (`<state>/training`): those saved before a restart come back,
    /// their weights and optimizer state restored at their first use.
    pub fn open(
        dir: PathBuf,
        registry: Arc<Registry>,
        cfg: DecoderConfig,
        trainable: std::result::Result<(), String>,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let mut clients = HashMap::new();
        for e in std::fs::read_dir(&dir)?.filter_map(|e| e.ok()) {
            let Ok(text) = std::fs::read(e.path().join("client.json")) else { continue };
            let Ok(s) = serde_json::from_slice::<Saved>(&text) else { continue };
            let Ok(config) = PeftConfig::from_json(&s.config.to_string()) else { continue };
            let client = Client {
                id: s.id.clone(),
                adapter: s.adapter,
                config,
                start: None,
                restore: Some(e.path().join("state")),
                live: None,
                steps: s.steps,
                accumulated: 0,
                saved_versions: s.saved_versions,
            };
            clients.insert(s.id, Arc::new(Mutex::new(client)));
        }
        Ok(Self {
            dir,
            registry,
            cfg,
            trainable,
            clients: Mutex::new(clients),
            queue: Mutex::new(VecDeque::new()),
            engine: OnceLock::new(),
            serial: AtomicU64::new(0),
        })
    }

    pub fn attach(&self, engine: crate::engine::Engine) {
        let _ = self.engine.set(engine);
    }

    pub fn decoder_config(&self) -> &DecoderConfig {
        &self.cfg
    }

    /// A new client saving to adapter `adapter` (default: its id).
    pub fn create(&self, start: Start, adapter: Option<String>) -> Result<ClientInfo> {
        self.trainable.clone().map_err(OnlineError::Unavailable)?;
        let config = match &start {
            Start::Fresh { config, .. } | Start::From { config, .. } => config.clone(),
        };
        crate::train::params::check_targets(&self.cfg, &config).map_err(OnlineError::Invalid)?;
        if config.use_dora {
            return Err(OnlineError::Invalid(
                "training clients train plain LoRA; `use_dora` is for fine-tuning jobs".into(),
            ));
        }
        let n = self.serial.fetch_add(1, Ordering::Relaxed);
        let id = format!("tc-{:x}{n:x}", crate::finetune::objects::now());
        let adapter = adapter.unwrap_or_else(|| id.clone());
        crate::adapters::registry::validate_name(&adapter)
            .map_err(|e| OnlineError::Invalid(e.to_string()))?;
        let client = Client {
            id: id.clone(),
            adapter,
            config,
            start: Some(start),
            restore: None,
            live: None,
            steps: 0,
            accumulated: 0,
            saved_versions: Vec::new(),
        };
        let info = info(&client);
        let mut clients = lock(&self.clients);
        if clients.len() >= MAX_CLIENTS {
            return Err(OnlineError::Full(MAX_CLIENTS));
        }
        clients.insert(id, Arc::new(Mutex::new(client)));
        Ok(info)
    }

    fn client(&self, id: &str) -> Result<Arc<Mutex<Client>>> {
        lock(&self.clients).get(id).cloned().ok_or_else(|| OnlineError::NotFound(id.to_string()))
    }

    pub fn info(&self, id: &str) -> Result<ClientInfo> {
        let c = self.client(id)?;
        let info = info(&lock(&c));
        Ok(info)
    }

    pub fn list(&self) -> Vec<ClientInfo> {
        let mut v: Vec<ClientInfo> = lock(&self.clients).values().map(|c| info(&lock(c))).collect();
        v.sort_by(|a, b| a.id.cmp(&b.id));
        v
    }

    fn submit(&self, c: Command) {
        lock(&self.queue).push_back(c);
        if let Some(e) = self.engine.get() {
            e.wake();
        }
    }

    pub async fn forward_backward(
        &self,
        id: &str,
        data: Vec<Datum>,
        loss: Loss,
    ) -> Result<PassOut> {
        let client = self.client(id)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Command::ForwardBackward { client, data, loss, reply });
        rx.await.map_err(|_| OnlineError::Failed("the engine stopped".into()))?
    }

    pub async fn optim_step(&self, id: &str, adam: AdamParams) -> Result<ClientInfo> {
        let client = self.client(id)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Command::OptimStep { client, adam, reply });
        rx.await.map_err(|_| OnlineError::Failed("the engine stopped".into()))?
    }

    /// The current weights as an adapter a request can mix (nothing saved).
    pub async fn snapshot(&self, id: &str) -> Result<Arc<LoraAdapter>> {
        let client = self.client(id)?;
        let (reply, rx) = oneshot::channel();
        self.submit(Command::Snapshot { client, reply });
        rx.await.map_err(|_| OnlineError::Failed("the engine stopped".into()))?
    }

    /// Writes the current weights as a new version of the client's adapter (registered: the
    /// next request serves it) and the client's state for a restart. Blocking (disk IO).
    pub fn save(&self, id: &str) -> Result<(String, u64)> {
        let client = self.client(id)?;
        let mut c = lock(&client);
        let Some(live) = &c.live else {
            return Err(OnlineError::Failed("the client has no weights yet".into()));
        };
        let dir = self.registry.root().join(&c.adapter);
        crate::adapters::writer::save_modules(&dir, &c.config, &live.params.export()?, &[])
            .map_err(|e| OnlineError::Failed(e.to_string()))?;
        let served = self
            .registry
            .register(&c.adapter, &c.adapter)
            .map_err(|e| OnlineError::Failed(e.to_string()))?;
        let state = self.dir.join(&c.id);
        std::fs::create_dir_all(&state).map_err(|e| OnlineError::Failed(e.to_string()))?;
        crate::train::run::save_state(&state.join("state"), &live.params, &live.opt)?;
        c.saved_versions.push(served.version);
        let saved = Saved {
            id: c.id.clone(),
            adapter: c.adapter.clone(),
            config: c.config.to_peft_json(),
            steps: c.steps,
            saved_versions: c.saved_versions.clone(),
        };
        let tmp = state.join("client.json.tmp");
        std::fs::write(
            &tmp,
            serde_json::to_vec(&saved).map_err(|e| OnlineError::Failed(e.to_string()))?,
        )
        .and_then(|()| std::fs::rename(&tmp, state.join("client.json")))
        .map_err(|e| OnlineError::Failed(e.to_string()))?;
        Ok((c.adapter.clone(), served.version))
    }

    /// Drops a client and its saved state (the adapter versions it saved stay served).
    pub fn delete(&self, id: &str) -> Result<()> {
        lock(&self.clients).remove(id).ok_or_else(|| OnlineError::NotFound(id.to_string()))?;
        let _ = std::fs::remove_dir_all(self.dir.join(id));
        Ok(())
    }
}

fn info(c: &Client) -> ClientInfo {
    let targets = c.config.to_peft_json()["target_modules"].clone();
    ClientInfo {
        id: c.id.clone(),
        object: "training.client",
        adapter: c.adapter.clone(),
        rank: c.config.r,
        alpha: c.config.lora_alpha,
        target_modules: targets,
        steps: c.steps,
        accumulated: c.accumulated,
        saved_versions: c.saved_versions.clone(),
    }
}

impl crate::engine::Background for TrainingClients {
    fn pending(&self) -> bool {
        !lock(&self.queue).is_empty()
    }

    fn run_slice(&self, model: &Decoder) {
        let Some(cmd) = lock(&self.queue).pop_front() else { return };
        let client = match &cmd {
            Command::ForwardBackward { client, .. }
            | Command::OptimStep { client, .. }
            | Command::Snapshot { client, .. } => client.clone(),
        };
        // The engine thread never waits for the HTTP side (a `save` writing files holds the
        // client): a busy client's command goes back in the queue.
        let guard = match client.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                lock(&self.queue).push_back(cmd);
                return;
            }
        };
        match cmd {
            Command::ForwardBackward { data, loss, reply, .. } => {
                answer(reply, || pass(&mut *ready(guard, model)?, model, &data, loss))
            }
            Command::OptimStep { adam, reply, .. } => {
                answer(reply, || step(&mut *ready(guard, model)?, adam))
            }
            Command::Snapshot { reply, .. } => answer(reply, || {
                let c = ready(guard, model)?;
                let live =
                    c.live.as_ref().ok_or_else(|| OnlineError::Failed("no weights".into()))?;
                let adapter = live
                    .params
                    .detached_adapter(&model.cfg, &c.adapter)
                    .map_err(|e| OnlineError::Failed(e.to_string()))?;
                Ok(Arc::new(adapter))
            }),
        }
    }
}

/// Runs one command and sends its outcome; a panic inside fails that command alone.
fn answer<T>(reply: oneshot::Sender<Result<T>>, f: impl FnOnce() -> Result<T>) {
    let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f))
        .unwrap_or_else(|_| Err(OnlineError::Failed("the command panicked".into())));
    let _ = reply.send(out);
}

/// The locked client with its parameters built (fresh, from an adapter, or restored) if needed.
fn ready<'a>(mut c: MutexGuard<'a, Client>, model: &Decoder) -> Result<MutexGuard<'a, Client>> {
    if c.live.is_some() {
        return Ok(c);
    }
    let base = model.projections();
    let (seed, from) = match c.start.take() {
        Some(Start::Fresh { seed, .. }) => (seed, None),
        Some(Start::From { adapter, .. }) => (0, Some(adapter)),
        None => (0, None),
    };
    let params =
        LoraParams::init_on(&model.cfg, c.config.clone(), seed, model.device(), Some(&base))?;
    if let Some(a) = from {
        params.load_from(&model.cfg, &a).map_err(OnlineError::Invalid)?;
    }
    let vars = params.vars();
    let mut opt = AdamW::new(&vars, 0.0)?;
    if let Some(dir) = c.restore.take() {
        crate::train::run::load_state(&dir, &params, &mut opt)?;
    }
    let grads = vec![None; vars.len()];
    c.live = Some(Trainable { params, vars, opt, grads });
    Ok(c)
}

/// One forward/backward over `data`: the loss's gradients added to the client's.
fn pass(c: &mut Client, model: &Decoder, data: &[Datum], loss: Loss) -> Result<PassOut> {
    let live = c.live.as_mut().ok_or_else(|| OnlineError::Failed("no weights".into()))?;
    let adapter = Arc::new(
        live.params
            .as_adapter(&model.cfg, &c.adapter)
            .map_err(|e| OnlineError::Failed(e.to_string()))?,
    );
    let mixes = vec![AdapterMix::single(adapter, 1.0); data.len()];
    let lora = StepLora::Training { mixes, dropout: 0.0, seed: 0 };
    let mut input = BatchInput::default();
    for d in data {
        input.push(&d.tokens);
    }
    let hidden = model
        .forward_in(Exec::Differentiable, &input, None, &lora)
        .map_err(|e| OnlineError::Failed(e.to_string()))?;
    let dev = hidden.device().clone();
    // Row `offset + i − 1` predicts token `i`; the weighted rows go through the graph, the
    // others only give their log-probabilities (detached, in chunks).
    let (mut graph_rows, mut graph_targets, mut graph_w, mut graph_q) =
        (vec![], vec![], vec![], vec![]);
    // `(datum, token)` of each graph row, and `(row, target, datum, token)` of each other row.
    let mut graph_at: Vec<(usize, usize)> = Vec::new();
    let mut plain: Vec<(u32, u32, usize, usize)> = Vec::new();
    let mut offset = 0u32;
    for (k, d) in data.iter().enumerate() {
        for i in 1..d.tokens.len() {
            let row = offset + i as u32 - 1;
            if d.weights[i] != 0.0 {
                graph_at.push((k, i));
                graph_rows.push(row);
                graph_targets.push(d.tokens[i]);
                graph_w.push(d.weights[i]);
                graph_q.push(d.sampler_logprobs.get(i).copied().unwrap_or(0.0));
            } else {
                plain.push((row, d.tokens[i], k, i));
            }
        }
        offset += d.tokens.len() as u32;
    }
    let mut logprobs: Vec<Vec<Option<f32>>> =
        data.iter().map(|d| vec![None; d.tokens.len()]).collect();
    let mut loss_value = 0.0;
    if !graph_rows.is_empty() {
        let lp = token_logprobs(model, &hidden, &graph_rows, &graph_targets)?;
        let w = Tensor::new(graph_w.as_slice(), &dev)?;
        let l = match loss {
            Loss::CrossEntropy => (lp.clone() * &w)?.sum_all()?.neg()?,
            Loss::ImportanceSampling => {
                let q = Tensor::new(graph_q.as_slice(), &dev)?;
                ((&lp - &q)?.exp()? * &w)?.sum_all()?.neg()?
            }
        };
        loss_value = l.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !loss_value.is_finite() {
            // Nothing is added: one bad pass must not poison the weights.
            return Err(OnlineError::Invalid(format!(
                "the loss is not finite ({loss_value}); nothing was accumulated"
            )));
        }
        let grads = l.backward()?;
        for (i, v) in live.vars.iter().enumerate() {
            if let Some(g) = grads.get(v.as_tensor()) {
                let g = g.detach();
                live.grads[i] = Some(match live.grads[i].take() {
                    Some(acc) => (acc + g)?,
                    None => g,
                });
            }
        }
        for (&(k, i), v) in graph_at.iter().zip(lp.detach().to_vec1::<f32>()?) {
            logprobs[k][i] = Some(v);
        }
    }
    let hidden = hidden.detach();
    for part in plain.chunks(CHUNK) {
        let rows: Vec<u32> = part.iter().map(|p| p.0).collect();
        let targets: Vec<u32> = part.iter().map(|p| p.1).collect();
        let lp = token_logprobs(model, &hidden, &rows, &targets)?;
        for (p, v) in part.iter().zip(lp.to_vec1::<f32>()?) {
            logprobs[p.2][p.3] = Some(v);
        }
    }
    c.accumulated += 1;
    Ok(PassOut {
        loss: loss_value,
        logprobs,
        loss_tokens: graph_rows.len(),
        accumulated: c.accumulated,
    })
}

/// `log p(targets[j] | hidden row rows[j])` through the head on the training path.
fn token_logprobs(
    model: &Decoder,
    hidden: &Tensor,
    rows: &[u32],
    targets: &[u32],
) -> Result<Tensor> {
    let dev = hidden.device();
    let h = hidden.index_select(&Tensor::new(rows, dev)?, 0)?;
    let logits = model
        .logits_in(Exec::Differentiable, &h)
        .map_err(|e| OnlineError::Failed(e.to_string()))?;
    let lp = candle_nn::ops::log_softmax(&logits, D::Minus1)?;
    Ok(lp.gather(&Tensor::new(targets, dev)?.unsqueeze(1)?, 1)?.squeeze(1)?)
}

/// AdamW on the accumulated gradients (none: zeros), which are then cleared.
fn step(c: &mut Client, adam: AdamParams) -> Result<ClientInfo> {
    let live = c.live.as_mut().ok_or_else(|| OnlineError::Failed("no weights".into()))?;
    let mut grads: Vec<Tensor> = live
        .vars
        .iter()
        .zip(live.grads.iter_mut())
        .map(|(v, g)| g.take().map_or_else(|| v.as_tensor().zeros_like(), Ok))
        .collect::<candle_core::Result<_>>()?;
    if adam.max_grad_norm > 0.0 {
        clip_grad_norm(&mut grads, adam.max_grad_norm)?;
    }
    live.opt.beta1 = adam.beta1;
    live.opt.beta2 = adam.beta2;
    live.opt.eps = adam.eps;
    live.opt.weight_decay = adam.weight_decay;
    live.opt.step(&live.vars, &grads, adam.learning_rate)?;
    c.steps += 1;
    c.accumulated = 0;
    Ok(info(c))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Background;
    use crate::model::{Decoder, DecoderConfig};

    const ADAM: AdamParams = AdamParams {
        learning_rate: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-12,
        weight_decay: 0.0,
        max_grad_norm: 0.0,
    };

    fn setup(dir: &std::path::Path) -> (Decoder, TrainingClients) {
        let cfg = DecoderConfig::tiny();
        let model = Decoder::random(cfg.clone(), 7, &candle_core::Device::Cpu).unwrap();
        let reg = Registry::new(
            &dir.join("adapters"),
            cfg.clone(),
            Some(model.projections()),
            candle_core::Device::Cpu,
            1 << 30,
        )
        .unwrap();
        let tc = TrainingClients::open(dir.join("training"), Arc::new(reg), cfg, Ok(())).unwrap();
        (model, tc)
    }

    fn fresh(tc: &TrainingClients, rank: usize) -> String {
        let config = PeftConfig::from_json(
            &serde_json::json!({"peft_type": "LORA", "r": rank, "lora_alpha": 8,
                                "target_modules": ["q_proj", "v_proj", "down_proj"]})
            .to_string(),
        )
        .unwrap();
        tc.create(Start::Fresh { config, seed: 3 }, None).unwrap().id
    }

    /// Runs `fut` while this thread serves the engine's part (the commands it queues).
    fn drive<T>(
        tc: &TrainingClients,
        model: &Decoder,
        fut: impl std::future::Future<Output = T>,
    ) -> T {
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let done = std::sync::atomic::AtomicBool::new(false);
        std::thread::scope(|s| {
            s.spawn(|| {
                while !done.load(Ordering::SeqCst) {
                    if tc.pending() {
                        tc.run_slice(model);
                    } else {
                        std::thread::yield_now();
                    }
                }
            });
            let out = rt.block_on(fut);
            done.store(true, Ordering::SeqCst);
            out
        })
    }

    fn datum(tokens: Vec<u32>, seed: u32) -> Datum {
        let n = tokens.len();
        let weights = (0..n)
            .map(
                |i| if i == 0 { 0.0 } else { 0.5 + ((i as u32 * 7 + seed) % 5) as f32 * 0.3 - 0.6 },
            )
            .collect();
        let sampler_logprobs = (0..n).map(|i| -1.0 - (i % 3) as f32 * 0.5).collect();
        Datum { tokens, weights, sampler_logprobs }
    }

    /// B is zero at first (no gradient reaches A); random B values make every gradient show.
    fn randomize_b(tc: &TrainingClients, id: &str) {
        let c = tc.client(id).unwrap();
        let c = lock(&c);
        let live = c.live.as_ref().unwrap();
        for (k, (_, _, b)) in live.params.modules.iter().enumerate() {
            let r = Tensor::randn(0f32, 0.2, b.dims(), b.device()).unwrap();
            let _ = k;
            b.set(&r).unwrap();
        }
    }

    /// Both losses: the gradient `forward_backward` accumulates equals central finite
    /// differences of the loss it reports, on sampled elements of every parameter.
    #[test]
    fn gradients_equal_finite_differences() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tc) = setup(dir.path());
        let id = fresh(&tc, 2);
        let data = vec![datum(vec![1, 5, 9, 3, 7, 2], 1), datum(vec![4, 4, 8, 1], 2)];
        drive(&tc, &model, tc.snapshot(&id)).unwrap();
        randomize_b(&tc, &id);
        for loss in [Loss::CrossEntropy, Loss::ImportanceSampling] {
            let c = tc.client(&id).unwrap();
            lock(&c).live.as_mut().unwrap().grads.iter_mut().for_each(|g| *g = None);
            drive(&tc, &model, tc.forward_backward(&id, data.clone(), loss)).unwrap();
            let (vars, grads) = {
                let c = lock(&c);
                let live = c.live.as_ref().unwrap();
                (live.vars.clone(), live.grads.clone())
            };
            let at = |tc: &TrainingClients| {
                drive(tc, &model, tc.forward_backward(&id, data.clone(), loss)).unwrap().loss
            };
            for (vi, v) in vars.iter().enumerate() {
                let g =
                    grads[vi].as_ref().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let base = v.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
                for e in [0, base.len() / 2, base.len() - 1] {
                    let h = 1e-2f32;
                    let set = |x: f32| {
                        let mut w = base.clone();
                        w[e] = x;
                        v.set(&Tensor::from_vec(w, v.dims(), v.device()).unwrap()).unwrap();
                    };
                    set(base[e] + h);
                    let up = at(&tc);
                    set(base[e] - h);
                    let down = at(&tc);
                    set(base[e]);
                    let fd = (up - down) / (2.0 * h as f64);
                    let tol = 2e-3 + 2e-2 * fd.abs();
                    assert!(
                        (fd - g[e] as f64).abs() < tol,
                        "{loss:?} var {vi} [{e}]: fd {fd} vs {}",
                        g[e]
                    );
                }
            }
        }
    }

    /// Importance sampling with every advantage 0 leaves the weights exactly as they were.
    #[test]
    fn zero_advantages_change_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tc) = setup(dir.path());
        let id = fresh(&tc, 4);
        drive(&tc, &model, tc.snapshot(&id)).unwrap();
        randomize_b(&tc, &id);
        let weights = |tc: &TrainingClients| -> Vec<Vec<f32>> {
            let c = tc.client(&id).unwrap();
            let c = lock(&c);
            c.live
                .as_ref()
                .unwrap()
                .vars
                .iter()
                .map(|v| v.as_tensor().flatten_all().unwrap().to_vec1().unwrap())
                .collect()
        };
        let before = weights(&tc);
        let mut d = datum(vec![1, 5, 9, 3, 7, 2], 1);
        d.weights.iter_mut().for_each(|w| *w = 0.0);
        let out = drive(&tc, &model, tc.forward_backward(&id, vec![d], Loss::ImportanceSampling))
            .unwrap();
        assert_eq!(out.loss, 0.0);
        let adam = ADAM;
        drive(&tc, &model, tc.optim_step(&id, adam)).unwrap();
        assert_eq!(weights(&tc), before);
        // A nonzero advantage does move them.
        let d = datum(vec![1, 5, 9, 3, 7, 2], 1);
        drive(&tc, &model, tc.forward_backward(&id, vec![d], Loss::ImportanceSampling)).unwrap();
        drive(&tc, &model, tc.optim_step(&id, adam)).unwrap();
        assert_ne!(weights(&tc), before);
    }

    /// A saved client comes back after a restart with its weights, moments and step count.
    #[test]
    fn a_restart_resumes_a_client_from_its_last_save() {
        let dir = tempfile::tempdir().unwrap();
        let (model, tc) = setup(dir.path());
        let id = fresh(&tc, 2);
        let d = datum(vec![1, 5, 9, 3, 7, 2], 1);
        let adam = ADAM;
        drive(&tc, &model, tc.forward_backward(&id, vec![d.clone()], Loss::CrossEntropy)).unwrap();
        drive(&tc, &model, tc.optim_step(&id, adam)).unwrap();
        let (name, v) = tc.save(&id).unwrap();
        assert_eq!(v, 1);
        // One more step after the save: the restart comes back to the saved state.
        drive(&tc, &model, tc.forward_backward(&id, vec![d.clone()], Loss::CrossEntropy)).unwrap();
        drive(&tc, &model, tc.optim_step(&id, adam)).unwrap();
        let next_after_save = |tc: &TrainingClients| {
            drive(tc, &model, tc.forward_backward(&id, vec![d.clone()], Loss::CrossEntropy))
                .unwrap();
            drive(tc, &model, tc.optim_step(&id, adam)).unwrap();
            drive(tc, &model, tc.forward_backward(&id, vec![d.clone()], Loss::CrossEntropy))
                .unwrap()
                .loss
        };
        drop(tc);
        let (_, tc2) = setup(dir.path());
        let info = tc2.info(&id).unwrap();
        assert_eq!(
            (info.steps, info.saved_versions.clone(), info.adapter.clone()),
            (1, vec![1], name)
        );
        let resumed = next_after_save(&tc2);
        let (_, tc3) = setup(dir.path());
        assert_eq!(next_after_save(&tc3), resumed, "the same state twice gives the same step");
        // And the saved adapter is the client's weights: served as version 1.
        assert!(dir
            .path()
            .join("adapters")
            .join(&info.adapter)
            .join("adapter_model.safetensors")
            .exists());
    }
}
