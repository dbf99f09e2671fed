//! The adapter-algebra routes (admin): `POST /v1/adapters/merge` (PEFT's
//! `add_weighted_adapter` over adapters the registry serves) and
//! `POST /v1/adapters/{name}/compress` (truncated SVD to a smaller rank). Each writes a PEFT
//! folder into the adapters root (atomically) and registers it, so it serves at once; the
//! maths is `adapters::algebra`'s.

use super::body::json_body;
use super::error::ApiError;
use super::AppState;
use crate::adapters::algebra::{self, AlgebraError, Combination, MergeSpec, SignMethod, Source};
use crate::adapters::registry::{validate_name, Registry};
use actix_web::{web, HttpRequest, HttpResponse};
use serde::Deserialize;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

type Data = web::Data<AppState>;

/// Whether a merge or compression is running. One runs at a time in the whole process: a
/// pruned SVD merge of the default model takes minutes of a core, and each more would take
/// another core from the engine thread.
static BUSY: AtomicBool = AtomicBool::new(false);

/// The right to run one algebra job, released when dropped (also on a panic's unwind).
struct Slot;

impl Slot {
    fn acquire() -> Result<Self, ApiError> {
        if BUSY.swap(true, Ordering::AcqRel) {
            return Err(ApiError::overloaded(
                "an adapter merge or compression is running; one runs at a time — retry when it \
                 has answered",
            )
            .with_code("merge_in_progress"));
        }
        Ok(Slot)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        BUSY.store(false, Ordering::Release);
    }
}

/// `add_weighted_adapter`'s arguments, by PEFT's names.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeBody {
    /// The new adapter's name.
    name: String,
    adapters: Vec<String>,
    weights: Vec<f64>,
    /// PEFT's default is `svd`.
    #[serde(default = "default_combination")]
    combination_type: Combination,
    svd_rank: Option<usize>,
    svd_clamp: Option<f64>,
    density: Option<f64>,
    #[serde(default)]
    majority_sign_method: SignMethod,
    /// DARE's draws (ours: PEFT draws from torch's global generator).
    #[serde(default)]
    seed: u64,
    /// Replace an adapter of that name (a new version of it).
    #[serde(default)]
    overwrite: bool,
}

fn default_combination() -> Combination {
    Combination::Svd
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CompressBody {
    rank: usize,
    /// The new adapter's name; `{name}-r{rank}` when absent.
    name: Option<String>,
    #[serde(default)]
    overwrite: bool,
}

impl From<AlgebraError> for ApiError {
    fn from(e: AlgebraError) -> Self {
        let msg = e.to_string();
        match e {
            AlgebraError::Invalid(_) => {
                ApiError::invalid_value("body", msg).with_code("invalid_merge")
            }
            AlgebraError::Incompatible(_) => {
                ApiError::invalid_value("adapters", msg).with_code("incompatible_adapters")
            }
            AlgebraError::Adapter(_) => {
                ApiError::invalid_value("adapters", msg).with_code("adapter_load_failed")
            }
        }
    }
}

/// The new name must be valid and free (unless `overwrite`).
fn check_target(registry: &Registry, name: &str, overwrite: bool) -> Result<(), ApiError> {
    validate_name(name)?;
    if !overwrite && (registry.info(name).is_some() || registry.root().join(name).exists()) {
        return Err(ApiError::conflict(format!(
            "adapter `{name}` exists; pass `overwrite: true` to replace it with a new version"
        ))
        .with_param("name"));
    }
    Ok(())
}

/// Each named adapter as the registry validated it, read back for the algebra.
fn sources(registry: &Registry, names: &[String]) -> Result<Vec<Source>, ApiError> {
    names
        .iter()
        .map(|n| {
            let adapter = registry.acquire(n)?;
            Ok(Source::read(&adapter.path, n, registry.decoder_config())?)
        })
        .collect()
}

/// Writes `merged` as the PEFT folder `name` (with `provenance` beside it) and serves it.
fn publish(
    registry: &Registry,
    name: &str,
    merged: &algebra::Merged,
    provenance: serde_json::Value,
) -> Result<(), ApiError> {
    let dir = registry.root().join(name);
    let text = serde_json::to_vec_pretty(&provenance).map_err(ApiError::internal)?;
    crate::adapters::writer::save_modules(
        &dir,
        &merged.config,
        &merged.modules,
        &[("loraplex_merge.json", text)],
    )
    .map_err(ApiError::internal)?;
    registry.register(name, name)?;
    Ok(())
}

fn answer(
    registry: &Registry,
    name: &str,
    provenance: serde_json::Value,
) -> Result<HttpResponse, ApiError> {
    let info =
        registry.info(name).ok_or_else(|| ApiError::internal("adapter vanished after writing"))?;
    let mut body = serde_json::to_value(info).map_err(ApiError::internal)?;
    body["created_from"] = provenance;
    Ok(HttpResponse::Ok().json(body))
}

pub async fn merge(
    req: HttpRequest,
    state: Data,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: MergeBody = json_body(&req, payload, &state.limits).await?;
    let registry: Arc<Registry> = state.backend()?.registry.clone();
    let spec = MergeSpec {
        combination: body.combination_type,
        weights: body.weights.clone(),
        svd_rank: body.svd_rank,
        svd_clamp: body.svd_clamp,
        density: body.density,
        majority_sign_method: body.majority_sign_method,
        seed: body.seed,
    };
    let name = body.name.clone();
    let reg = registry.clone();
    let slot = Slot::acquire()?;
    let provenance = web::block(move || -> Result<serde_json::Value, ApiError> {
        let _slot = slot;
        check_target(&reg, &body.name, body.overwrite)?;
        if body.adapters.len() > algebra::MAX_SOURCES {
            return Err(AlgebraError::Invalid(format!(
                "`adapters` names {} adapters; at most {} merge at once",
                body.adapters.len(),
                algebra::MAX_SOURCES
            ))
            .into());
        }
        let sources = sources(&reg, &body.adapters)?;
        let merged = algebra::merge(&sources, &spec)?;
        let provenance = json!({
            "operation": "add_weighted_adapter",
            "adapters": body.adapters,
            "weights": body.weights,
            "combination_type": spec.combination,
            "svd_rank": spec.svd_rank,
            "svd_clamp": spec.svd_clamp,
            "density": spec.density,
            "majority_sign_method": spec.majority_sign_method,
            "seed": spec.seed,
            "rank": merged.rank,
            "modules": merged.modules.len(),
        });
        publish(&reg, &body.name, &merged, provenance.clone())?;
        Ok(provenance)
    })
    .await
    .map_err(ApiError::internal)??;
    answer(&registry, &name, provenance)
}

pub async fn compress(
    req: HttpRequest,
    state: Data,
    path: web::Path<String>,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let body: CompressBody = json_body(&req, payload, &state.limits).await?;
    let registry: Arc<Registry> = state.backend()?.registry.clone();
    let source_name = path.into_inner();
    let name = body.name.clone().unwrap_or_else(|| format!("{source_name}-r{}", body.rank));
    let (reg, target) = (registry.clone(), name.clone());
    let slot = Slot::acquire()?;
    let provenance = web::block(move || -> Result<serde_json::Value, ApiError> {
        let _slot = slot;
        check_target(&reg, &target, body.overwrite)?;
        let source = sources(&reg, std::slice::from_ref(&source_name))?
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("no source read"))?;
        let merged = algebra::compress(&source, body.rank)?;
        let provenance = json!({
            "operation": "compress",
            "adapter": source_name,
            "rank": merged.rank,
            "min_energy_kept": merged.min_energy_kept,
            "modules": merged.modules.len(),
        });
        publish(&reg, &target, &merged, provenance.clone())?;
        Ok(provenance)
    })
    .await
    .map_err(ApiError::internal)??;
    answer(&registry, &name, provenance)
}

#[cfg(test)]
mod tests {
    use super::Slot;

    #[test]
    fn one_algebra_job_runs_at_a_time() {
        let first = Slot::acquire().unwrap();
        let e = Slot::acquire().err().unwrap();
        assert_eq!(e.body()["error"]["code"], "merge_in_progress");
        drop(first);
        let again = Slot::acquire();
        assert!(again.is_ok(), "released when dropped");
    }
}
