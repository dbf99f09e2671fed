//! `loraplex serve`: binds the HTTP server at once (so `/health` answers while the model loads),
//! loads the model and the adapter registry on a background thread, and on SIGTERM/SIGINT
//! stops intake (503), lets running requests finish (bounded), then exits.

use crate::adapters::registry::Registry;
use crate::api::{self, AppState, Backend};
use crate::config::ServeConfig;
use crate::engine::Engine;
use crate::model::load::load_model;
use crate::model::{parse_device, WeightFormat};
use actix_web::{web, App, HttpServer};
use anyhow::Context;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

/// Loads the model, starts the engine thread, the registry and its watcher.
pub fn load_backend(
    cfg: &ServeConfig,
    metrics: Option<Arc<crate::metrics::Metrics>>,
) -> anyhow::Result<Backend> {
    let device = parse_device(&cfg.device)?;
    let format = WeightFormat::parse(&cfg.dtype, &device)?;
    let started = Instant::now();
    let loaded = load_model(&cfg.model, format, &device)
        .with_context(|| format!("loading model `{}`", cfg.model))?;
    let model_cfg = loaded.model.cfg.clone();
    tracing::info!(model = %loaded.id, %format, secs = started.elapsed().as_secs_f32(), "model loaded");
    let mut registry = Registry::new(
        &cfg.adapters,
        model_cfg.clone(),
        Some(loaded.model.projections()),
        device,
        cfg.adapter_budget_bytes,
    )
    .with_context(|| format!("opening adapters folder `{}`", cfg.adapters.display()))?
    .with_versions_kept(cfg.adapter_versions)
    .with_mixes(&cfg.mixes);
    if let Some(m) = &metrics {
        registry = registry.with_metrics(m.clone());
    }
    let registry = Arc::new(registry);
    crate::adapters::watcher::spawn(registry.clone(), cfg.rescan_interval)?;
    tracing::info!(root = %registry.root().display(), adapters = registry.list().len(), "adapter registry ready");
    let tokenizer = Arc::new(loaded.tokenizer);
    let started = Instant::now();
    let grammars =
        crate::structured::Grammars::with_options(&tokenizer, model_cfg.vocab_size, cfg.grammars)
            .map(Arc::new)
            .map_err(|e| e.to_string());
    match &grammars {
        Ok(_) => tracing::info!(secs = started.elapsed().as_secs_f32(), "structured outputs ready"),
        Err(e) => tracing::warn!(error = %e, "structured outputs unavailable"),
    }
    let trainable = match format {
        WeightFormat::Quantized(_) => Err(format!(
            "`--dtype {}` keeps candle-quantized weights, whose matmul has no backward; serve with --dtype auto (packed), f32 or bf16 to fine-tune",
            cfg.dtype
        )),
        _ => Ok(()),
    };
    let fine_tuning = Arc::new(
        crate::finetune::FineTuning::open(
            &cfg.state_dir,
            registry.clone(),
            tokenizer.clone(),
            loaded.id.clone(),
            model_cfg.clone(),
            trainable.clone(),
        )
        .with_context(|| format!("opening the state folder `{}`", cfg.state_dir.display()))?,
    );
    let training = Arc::new(
        crate::online::TrainingClients::open(
            cfg.state_dir.join("training"),
            registry.clone(),
            model_cfg.clone(),
            trainable.clone(),
        )
        .with_context(|| format!("opening the state folder `{}`", cfg.state_dir.display()))?,
    );
    let background: Arc<dyn crate::engine::Background> =
        Arc::new(crate::engine::Backgrounds::new(vec![fine_tuning.clone(), training.clone()]));
    let engine = Engine::start_with(
        loaded.model,
        tokenizer.clone(),
        cfg.engine.clone(),
        metrics,
        Some(background),
    )?;
    fine_tuning.attach(engine.clone());
    training.attach(engine.clone());
    Ok(Backend {
        engine,
        tokenizer,
        registry,
        model_id: loaded.id,
        architecture: model_cfg.arch.name.clone(),
        context_len: model_cfg.max_position_embeddings,
        vocab: model_cfg.vocab_size,
        grammars,
        fine_tuning: Some(fine_tuning),
        training: Some(training),
    })
}

/// The metrics registry of a server with this configuration.
pub fn new_metrics(cfg: &ServeConfig) -> anyhow::Result<Arc<crate::metrics::Metrics>> {
    let build = [
        env!("CARGO_PKG_VERSION"),
        option_env!("LORAPLEX_GIT_COMMIT").unwrap_or("unknown"),
        cfg.device.as_str(),
        cfg.dtype.as_str(),
        cfg.model.as_str(),
    ];
    let mut m = crate::metrics::Metrics::new(cfg.metrics_adapter_cap, cfg.gateway_metrics, build)?;
    m.enabled = cfg.metrics;
    Ok(Arc::new(m))
}

pub fn run(cfg: ServeConfig) -> anyhow::Result<()> {
    let backend: Arc<OnceLock<Backend>> = Arc::new(OnceLock::new());
    let metrics = new_metrics(&cfg)?;
    let state = web::Data::new(AppState::new(&cfg, backend.clone(), metrics.clone()));
    if cfg.api_key.is_none() && cfg.admin_key.is_none() {
        if cfg.loopback() {
            tracing::warn!(
                "no API key set: serving on loopback only ({}); set --api-key to expose it",
                cfg.host
            );
        } else {
            tracing::warn!(
                "no API key set and bound to {}: anyone who reaches it can use it",
                cfg.host
            );
        }
    }
    crate::runtime::log_panics();
    let drain_timeout = cfg.drain_timeout;
    actix_web::rt::System::new().block_on(async move {
        let server =
            HttpServer::new(move || App::new().app_data(state.clone()).configure(api::configure))
                .disable_signals()
                .shutdown_timeout(drain_timeout.as_secs().max(1))
                .bind((cfg.host.as_str(), cfg.port))
                .with_context(|| format!("binding {}:{}", cfg.host, cfg.port))?
                .run();
        tracing::info!("listening on http://{}:{}", cfg.host, cfg.port);
        let handle = server.handle();
        let loading = backend.clone();
        let engine_metrics = metrics.enabled.then_some(metrics);
        std::thread::Builder::new().name("loraplex-loader".into()).spawn(
            move || match load_backend(&cfg, engine_metrics) {
                Ok(b) => {
                    let _ = loading.set(b);
                    tracing::info!("ready");
                }
                Err(e) => {
                    tracing::error!("{e:#}");
                    std::process::exit(1);
                }
            },
        )?;
        actix_web::rt::spawn(async move {
            shutdown_signal().await;
            tracing::info!("shutdown requested: refusing new requests, draining running ones");
            if let Some(b) = backend.get() {
                b.engine.drain();
                let deadline = Instant::now() + drain_timeout;
                while !b.engine.is_idle() && Instant::now() < deadline {
                    actix_web::rt::time::sleep(Duration::from_millis(50)).await;
                }
                // A running fine-tuning job checkpoints and resumes when the server restarts.
                if let Some(ft) = b.fine_tuning.clone() {
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(5));
                    let _ = actix_web::web::block(move || ft.stop(wait)).await;
                }
            }
            handle.stop(true).await;
        });
        server.await.context("server error")
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
