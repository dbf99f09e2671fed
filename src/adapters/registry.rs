//! The adapter registry: name → adapter state for every folder in the adapters root. Adapters
//! are discovered eagerly (every scan) and loaded lazily (on first use), kept within a byte
//! budget by evicting the least recently used adapter that no request holds, and reloaded
//! transparently when asked for again.
//!
//! Invariant: a loaded adapter is an `Arc`; a reload or eviction drops only the registry's
//! reference, so a running request keeps the version it started with.

use super::{load_adapter_on, LoraAdapter};
use crate::model::{DecoderConfig, FrozenProjections};
use candle_core::Device;
use dashmap::DashMap;
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

/// Longest adapter name accepted.
pub const MAX_NAME_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    #[error("adapter `{0}` does not exist")]
    NotFound(String),
    #[error("invalid adapter name `{0}`: use 1-128 letters, digits, `.`, `_` or `-`, not starting with `.`")]
    InvalidName(String),
    #[error("adapter `{name}` failed to load: {error}")]
    LoadFailed { name: String, error: String },
    #[error(
        "adapter `{name}` ({size} bytes) does not fit the adapter memory budget of {budget} bytes"
    )]
    TooLarge { name: String, size: usize, budget: usize },
    #[error("the adapter memory budget ({budget} bytes) is held by running requests; retry later")]
    BudgetExhausted { budget: usize },
    #[error("path `{0}` is not a folder inside the adapters root")]
    OutsideRoot(String),
    #[error("adapter `{name}` has no version {version} resident (resident: {resident:?}); the server keeps the last `adapter_versions` versions of a name")]
    VersionNotFound { name: String, version: u64, resident: Vec<u64> },
}

/// Where an adapter stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AdapterState {
    /// Known and valid-looking on disk, not in memory.
    Available,
    Loaded,
    Failed,
}

/// What `/v1/adapters` shows of one adapter.
#[derive(Debug, Clone, Serialize)]
pub struct AdapterInfo {
    pub name: String,
    pub version: u64,
    pub state: AdapterState,
    /// The folder on the server; shown to the admin key only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub targets: Vec<String>,
    /// Versions of this name resident now, addressable as `name@N` (oldest first).
    pub versions: Vec<u64>,
    /// A DoRA adapter (`use_dora`: its scale enters the weight norm, scale 0 still applies
    /// the magnitude, and its place in a mix matters).
    pub dora: Option<bool>,
    pub size_bytes: Option<usize>,
    pub error: Option<String>,
    /// When a request last used it (Unix seconds; `None`: not since the server started).
    pub last_used: Option<u64>,
}

/// Files' sizes and modification times: a change means a new version.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Fingerprint(Vec<(u64, Option<SystemTime>)>);

/// How long a folder's files must stay untouched before a first use loads a changed version:
/// a folder copied file by file passes through half-written states that must not become
/// versions of their own.
pub const SETTLE: Duration = Duration::from_millis(100);

/// How long ago the newest change to the adapter files in `dir` was (`None`: no files, or a
/// clock that runs backwards). The inode change time counts too, since a copy that preserves
/// modification times (`cp -p`, `rsync -a`) still sets it.
fn quiet_for(dir: &Path) -> Option<Duration> {
    let newest = [super::loader::CONFIG_FILE, super::loader::WEIGHTS_FILE]
        .iter()
        .filter_map(|f| std::fs::metadata(dir.join(f)).ok())
        .flat_map(|m| {
            #[cfg(unix)]
            let changed = {
                use std::os::unix::fs::MetadataExt;
                u64::try_from(m.ctime()).ok().map(|s| {
                    SystemTime::UNIX_EPOCH
                        + Duration::new(s, m.ctime_nsec().clamp(0, 999_999_999) as u32)
                })
            };
            #[cfg(not(unix))]
            let changed = None;
            [m.modified().ok(), changed]
        })
        .flatten()
        .max()?;
    SystemTime::now().duration_since(newest).ok()
}

fn fingerprint(dir: &Path) -> Option<Fingerprint> {
    let files = [super::loader::CONFIG_FILE, super::loader::WEIGHTS_FILE];
    let parts: Vec<_> = files
        .iter()
        .map(|f| {
            std::fs::metadata(dir.join(f))
                .ok()
                .map(|m| (m.len(), m.modified().ok()))
                .unwrap_or((0, None))
        })
        .collect();
    // A folder with neither file is not an adapter (yet); one with only the weights is listed
    // with its error (the missing config) until the config appears.
    (parts.iter().any(|p| p.1.is_some())).then_some(Fingerprint(parts))
}

#[derive(Debug)]
struct Entry {
    dir: PathBuf,
    fingerprint: Option<Fingerprint>,
    version: u64,
    loaded: Option<Arc<LoraAdapter>>,
    error: Option<String>,
    /// Logical clock of the last use (LRU).
    last_used: u64,
    /// Wall-clock time of the last use (Unix seconds), for the operators' view.
    last_used_at: Option<u64>,
    /// Bytes when last loaded (kept after eviction for reporting).
    size_bytes: Option<usize>,
    rank: Option<usize>,
    alpha: Option<f64>,
    targets: Vec<String>,
    dora: Option<bool>,
    /// Earlier versions still resident (oldest first), at most `versions_kept − 1`: requests
    /// address them as `name@N`.
    history: Vec<Arc<LoraAdapter>>,
    /// Unloaded through vLLM's `/v1/unload_lora_adapter`: not listed, not served (404) until
    /// loaded again or its folder changes.
    withdrawn: bool,
}

impl Entry {
    /// Records what a successful load or validation learned about the folder's adapter.
    fn describe(&mut self, a: &LoraAdapter) {
        self.error = None;
        self.rank = Some(a.rank);
        self.alpha = Some(a.alpha);
        self.targets = a.target_names().into_iter().map(str::to_string).collect();
        self.dora = Some(a.modules.iter().flatten().any(|w| w.dora.is_some()));
        self.size_bytes = Some(a.size_bytes);
    }
}

/// Counters of adapter lifecycle events (read by metrics).
#[derive(Debug, Default)]
pub struct RegistryStats {
    pub loads_ok: AtomicU64,
    pub loads_failed: AtomicU64,
    pub evictions: AtomicU64,
    pub reloads: AtomicU64,
}

pub struct Registry {
    root: PathBuf,
    entries: DashMap<String, Entry>,
    cfg: DecoderConfig,
    /// The base model's frozen projections, which DoRA adapters' norms are computed against;
    /// `None` loads by shape only (DoRA refused).
    base: Option<FrozenProjections>,
    device: Device,
    budget_bytes: usize,
    clock: AtomicU64,
    /// Serialises loads so that budget accounting sees one load at a time.
    load_lock: Mutex<()>,
    /// Serialises rescans: when `rescan` returns, every folder it saw has been validated, even
    /// one that a concurrent rescan (the watcher's) observed first.
    rescan_lock: Mutex<()>,
    pub stats: RegistryStats,
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Named mixes over these adapters (`mixes.toml` in the root is reread by [`Registry::rescan`]).
    mixes: super::mixes::MixTable,
    /// Versions of a name kept resident (the current one included).
    versions_kept: usize,
    /// This instance's folder under [`VERSIONS_DIR`].
    archive: String,
}

/// Where each loaded version's files are kept (`<root>/.versions/<instance>/<name>/<N>/`), so any
/// resident version can be downloaded byte for byte after its folder changed. Hidden: never an
/// adapter. Per server instance (`<host>-<pid>`): replicas sharing the folder count versions
/// each on their own.
pub const VERSIONS_DIR: &str = ".versions";

/// This process's archive folder name: `<host>-<pid>`.
fn instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::env::var("HOSTNAME"))
        .unwrap_or_default();
    let host: String =
        host.trim().chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
    format!("{host}-{}", std::process::id())
}

/// Removes this instance's archive (versions count from 1 in each run) and those of instances
/// on this host whose process is gone.
fn clean_archives(root: &Path, me: &str) {
    let Ok(rd) = std::fs::read_dir(root.join(VERSIONS_DIR)) else { return };
    let host = me.rsplit_once('-').map_or("", |(h, _)| h);
    for d in rd.filter_map(|d| d.ok()) {
        let name = d.file_name().to_string_lossy().into_owned();
        let dead = match name.rsplit_once('-') {
            Some((h, pid)) if h == host => {
                pid.parse::<u32>().is_ok_and(|p| !Path::new(&format!("/proc/{p}")).exists())
            }
            _ => false,
        };
        if name == me || (dead && Path::new("/proc/self").exists()) {
            let _ = std::fs::remove_dir_all(d.path());
        }
    }
}

/// `name` or `name@N` → the name and the version asked for.
pub fn split_ref(r: &str) -> Result<(&str, Option<u64>), RegistryError> {
    match r.rsplit_once('@') {
        None => validate_name(r).map(|()| (r, None)),
        Some((name, v)) => {
            validate_name(name)?;
            match v.parse::<u64>() {
                Ok(n) if n >= 1 && !v.starts_with('+') => Ok((name, Some(n))),
                _ => Err(RegistryError::InvalidName(format!(
                    "{}: a version is `@` and a number from 1",
                    r.escape_debug()
                ))),
            }
        }
    }
}

/// A plain folder name: no separators, no `..`, no NUL, not hidden.
pub fn validate_name(name: &str) -> Result<(), RegistryError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidName(name.escape_debug().to_string()))
    }
}

impl Registry {
    /// A registry over `root` (created if missing) for a base model of shape `cfg` with
    /// frozen projections `base`.
    pub fn new(
        root: &Path,
        cfg: DecoderConfig,
        base: Option<FrozenProjections>,
        device: Device,
        budget_bytes: usize,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = root.canonicalize()?;
        let mixes = super::mixes::MixTable::new(&root, &[]);
        let reg = Self {
            root,
            entries: DashMap::new(),
            cfg,
            base,
            device,
            budget_bytes,
            clock: AtomicU64::new(1),
            load_lock: Mutex::new(()),
            rescan_lock: Mutex::new(()),
            stats: RegistryStats::default(),
            metrics: None,
            mixes,
            versions_kept: 2,
            archive: instance(),
        };
        clean_archives(&reg.root, &reg.archive.clone());
        reg.rescan();
        Ok(reg)
    }

    /// Keeps `k` (at least 1) versions of each name resident.
    pub fn with_versions_kept(mut self, k: usize) -> Self {
        self.versions_kept = k.max(1);
        self
    }

    /// The loaded copy of `e` becomes history (a folder change made a new version): kept while
    /// fewer than `versions_kept − 1` earlier versions are, so `name@N` still serves it.
    fn retire(&self, e: &mut Entry) {
        let Some(old) = e.loaded.take() else { return };
        self.stats.reloads.fetch_add(1, Ordering::Relaxed);
        if let Some(m) = &self.metrics {
            m.adapter_reloads.inc();
        }
        e.history.push(old);
        let keep = self.versions_kept - 1;
        let drop_n = e.history.len().saturating_sub(keep);
        e.history.drain(..drop_n);
    }

    /// Version `version` of `name`: the current one (loaded if needed) or a resident earlier one.
    fn acquire_version(&self, name: &str, version: u64) -> Result<Arc<LoraAdapter>, RegistryError> {
        let current = self.entries.get(name).map(|e| e.version);
        if current == Some(version) {
            let a = self.acquire(name)?;
            if a.version == version {
                return Ok(a);
            }
        }
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(mut e) = self.entries.get_mut(name) {
            if let Some(a) = e.history.iter().find(|a| a.version == version).cloned() {
                e.last_used = now;
                e.last_used_at = Some(unix_now());
                return Ok(a);
            }
        }
        let resident = self.entries.get(name).map(|e| resident_versions(&e)).unwrap_or_default();
        if current.is_none() {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        Err(RegistryError::VersionNotFound { name: name.to_string(), version, resident })
    }

    /// The file `file` (`adapter_config.json` or `adapter_model.safetensors`) of `name` or
    /// `name@N` as it was loaded, byte for byte: from the version archive, else (a current
    /// version not loaded yet) the folder's own.
    pub fn version_file(&self, r: &str, file: &str) -> Result<(u64, PathBuf), RegistryError> {
        let (name, version) = split_ref(r)?;
        let e = self
            .entries
            .get(name)
            .filter(|e| !e.withdrawn)
            .ok_or_else(|| RegistryError::NotFound(name.to_string()))?;
        let version = version.unwrap_or(e.version);
        let archived = self
            .root
            .join(VERSIONS_DIR)
            .join(&self.archive)
            .join(name)
            .join(version.to_string())
            .join(file);
        if archived.is_file() {
            return Ok((version, archived));
        }
        if version == e.version && e.loaded.is_none() {
            return Ok((version, e.dir.join(file)));
        }
        Err(RegistryError::VersionNotFound {
            name: name.to_string(),
            version,
            resident: resident_versions(&e),
        })
    }

    /// Copies the files of `name`'s version `version` (just loaded from `dir`) into the archive,
    /// and drops archived versions no longer resident.
    /// `before`: the folder's fingerprint when the load began; a folder that changed since
    /// holds another version's files, which are not archived as this one's.
    fn archive(
        &self,
        name: &str,
        version: u64,
        dir: &Path,
        adapter: &LoraAdapter,
        before: Option<&Fingerprint>,
    ) {
        let base = self.root.join(VERSIONS_DIR).join(&self.archive).join(name);
        let to = base.join(version.to_string());
        if !to.exists() {
            let tmp = base.join(format!(".{version}.partial"));
            let copied = std::fs::create_dir_all(&tmp).is_ok()
                && [super::loader::CONFIG_FILE, super::loader::WEIGHTS_FILE]
                    .iter()
                    .all(|f| std::fs::copy(dir.join(f), tmp.join(f)).is_ok())
                && before.is_some()
                && fingerprint(dir).as_ref() == before;
            if !copied || std::fs::rename(&tmp, &to).is_err() {
                let _ = std::fs::remove_dir_all(&tmp);
                tracing::warn!(adapter = name, version, "could not archive the version's files");
            }
        }
        let keep: Vec<u64> = self
            .entries
            .get(name)
            .map(|e| resident_versions(&e))
            .unwrap_or_default()
            .into_iter()
            .chain([adapter.version])
            .collect();
        if let Ok(rd) = std::fs::read_dir(&base) {
            for d in rd.filter_map(|d| d.ok()) {
                let v = d.file_name().to_string_lossy().parse::<u64>().ok();
                if v.is_some_and(|v| !keep.contains(&v)) {
                    let _ = std::fs::remove_dir_all(d.path());
                }
            }
        }
    }

    /// Adds the configured mixes (`name → members`), fixed for the registry's life.
    pub fn with_mixes(mut self, configured: &[(String, Vec<super::mixes::MixMember>)]) -> Self {
        self.mixes = super::mixes::MixTable::new(&self.root, configured);
        self.rescan();
        self
    }

    pub fn mixes(&self) -> &super::mixes::MixTable {
        &self.mixes
    }

    /// The named mix `name`, unless an adapter folder holds that name: the adapter always
    /// wins, a mix never shadows it.
    pub fn mix(&self, name: &str) -> Option<super::mixes::MixInfo> {
        if self.entries.contains_key(name) {
            return None;
        }
        self.mixes.get(name)
    }

    /// Every named mix, sorted; one whose name an adapter folder holds is listed as refused.
    pub fn mix_list(&self) -> Vec<super::mixes::MixInfo> {
        let mut list = self.mixes.list();
        for m in list.iter_mut().filter(|m| m.error.is_none() && self.entries.contains_key(&m.name))
        {
            m.error = Some(super::mixes::NAME_TAKEN.into());
        }
        list
    }

    /// Names a router may find resident here: every loaded adapter, and every valid mix
    /// whose adapters are all loaded. Sorted.
    pub fn resident_models(&self) -> Vec<String> {
        let mut names: Vec<String> =
            self.entries.iter().filter(|e| e.loaded.is_some()).map(|e| e.key().clone()).collect();
        let loaded = |n: &str| self.entries.get(n).is_some_and(|e| e.loaded.is_some());
        for m in self.mix_list() {
            if m.error.is_none()
                && !m.adapters.is_empty()
                && m.adapters.iter().all(|a| loaded(&a.name))
            {
                names.push(m.name);
            }
        }
        names.sort();
        names
    }

    /// How many adapters fit the budget together at the size of the largest one seen (at least
    /// 1): what the gateway protocol's `max_lora` means here, since the budget is in bytes.
    pub fn max_resident(&self) -> usize {
        let largest = self.entries.iter().filter_map(|e| e.size_bytes).max().unwrap_or(0);
        self.budget_bytes.checked_div(largest).unwrap_or(self.entries.len()).max(1)
    }

    /// Reports lifecycle events (loads, evictions, reloads) to `metrics` too.
    pub fn with_metrics(mut self, metrics: Arc<crate::metrics::Metrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The base model's shape, which every adapter here is checked against.
    pub fn decoder_config(&self) -> &DecoderConfig {
        &self.cfg
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// `dir` resolved (symlinks followed) and checked to lie inside the root.
    fn inside_root(&self, dir: &Path) -> Option<PathBuf> {
        let real = dir.canonicalize().ok()?;
        (real.starts_with(&self.root) && real != self.root && real.is_dir()).then_some(real)
    }

    /// Loads the adapter in `dir` after checking that its files, links resolved, lie inside
    /// the root too (a linked file could otherwise make the server read any file it can).
    fn load_checked(&self, dir: &Path, name: &str, device: &Device) -> Result<LoraAdapter, String> {
        for f in [super::loader::CONFIG_FILE, super::loader::WEIGHTS_FILE] {
            if let Ok(real) = dir.join(f).canonicalize() {
                if !real.starts_with(&self.root) {
                    return Err(format!("`{f}` links to a file outside the adapters folder"));
                }
            }
        }
        load_adapter_on(dir, name, &self.cfg, device, self.base.as_ref())
            .map_err(|e| self.relative(&e.to_string()))
    }

    /// `message` with the adapters root left out of the paths it names (errors are shown to
    /// inference clients, who must not learn the server's file layout).
    fn relative(&self, message: &str) -> String {
        message.replace(&format!("{}{}", self.root.display(), std::path::MAIN_SEPARATOR), "")
    }

    /// Syncs the registry with the folders under the root: new folders appear, changed ones get
    /// a new version (their loaded copy is dropped; running requests keep theirs), removed ones
    /// disappear. Returns the names whose state changed.
    pub fn rescan(&self) -> Vec<String> {
        let _guard = self.rescan_lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = Vec::new();
        let mut seen = std::collections::HashSet::new();
        if let Ok(rd) = std::fs::read_dir(&self.root) {
            for e in rd.filter_map(|e| e.ok()) {
                let name = e.file_name().to_string_lossy().into_owned();
                if validate_name(&name).is_err() {
                    continue;
                }
                let path = self.root.join(&name);
                let Some(dir) = self.inside_root(&path) else { continue };
                let Some(fp) = fingerprint(&dir) else { continue };
                seen.insert(name.clone());
                if self.observe(&name, dir, fp) {
                    self.validate(&name);
                    changed.push(name);
                }
            }
        }
        let gone: Vec<String> = self
            .entries
            .iter()
            .filter(|e| !seen.contains(e.key()))
            .map(|e| e.key().clone())
            .collect();
        for name in gone {
            // Only folder-backed entries under the root are removed when their folder goes.
            if self.entries.get(&name).is_some_and(|e| fingerprint(&e.dir).is_none()) {
                self.entries.remove(&name);
                changed.push(name);
            }
        }
        changed.extend(self.mixes.rescan(&|n: &str| self.entries.contains_key(n)));
        changed
    }

    /// Records the current fingerprint of `name`; true if it is new or changed.
    fn observe(&self, name: &str, dir: PathBuf, fp: Fingerprint) -> bool {
        match self.entries.get_mut(name) {
            Some(e) if e.fingerprint.as_ref() == Some(&fp) && e.dir == dir => false,
            Some(mut e) => {
                e.fingerprint = Some(fp);
                e.dir = dir;
                e.version += 1;
                e.error = None;
                e.withdrawn = false;
                self.retire(&mut e);
                true
            }
            None => {
                self.entries.insert(
                    name.to_string(),
                    Entry {
                        dir,
                        fingerprint: Some(fp),
                        version: 1,
                        loaded: None,
                        error: None,
                        last_used: 0,
                        last_used_at: None,
                        size_bytes: None,
                        rank: None,
                        alpha: None,
                        targets: Vec::new(),
                        dora: None,
                        history: Vec::new(),
                        withdrawn: false,
                    },
                );
                true
            }
        }
    }

    /// Checks a new or changed folder at once (a full load on the CPU, then dropped), so that
    /// `/v1/adapters` shows a broken adapter's error before any request needs it; the lazy load
    /// on first use stays the one that counts against the budget.
    fn validate(&self, name: &str) {
        let Some((dir, version)) = self.entries.get(name).map(|e| (e.dir.clone(), e.version))
        else {
            return;
        };
        let result = self.load_checked(&dir, name, &Device::Cpu);
        let Some(mut e) = self.entries.get_mut(name) else { return };
        if e.version != version {
            return; // changed again meanwhile: the next rescan checks the new files
        }
        match result {
            Ok(a) => e.describe(&a),
            Err(err) => {
                tracing::warn!(adapter = name, error = %err, "adapter folder is not a valid adapter");
                e.error = Some(err);
            }
        }
    }

    /// The adapter `name`, loading it if needed. Blocking (disk IO): call off the async runtime.
    /// `name@N` asks for version `N` ([`Registry::acquire_version`]).
    pub fn acquire(&self, name: &str) -> Result<Arc<LoraAdapter>, RegistryError> {
        if let (base, Some(v)) = split_ref(name)? {
            return self.acquire_version(base, v);
        }
        if self.entries.get(name).is_some_and(|e| e.withdrawn) {
            return Err(RegistryError::NotFound(name.to_string()));
        }
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        if let Some(mut e) = self.entries.get_mut(name) {
            if let Some(a) = e.loaded.clone() {
                e.last_used = now;
                e.last_used_at = Some(unix_now());
                return Ok(a);
            }
        }
        // Not loaded: make sure we know the folder's current state (it may be brand new).
        let path = self.root.join(name);
        let dir = self.inside_root(&path);
        let fp = self.settled_fingerprint(name, dir.as_deref());
        match (dir, fp) {
            (Some(dir), Some(fp)) => {
                self.observe(name, dir, fp);
            }
            _ => {
                self.entries.remove(name);
                return Err(RegistryError::NotFound(name.to_string()));
            }
        }
        // A broken folder is retried only once its files change (observe clears the error).
        if let Some(error) = self.entries.get(name).and_then(|e| e.error.clone()) {
            return Err(RegistryError::LoadFailed { name: name.to_string(), error });
        }
        self.load(name, now)
    }

    /// The fingerprint of `dir`, waiting (a few [`SETTLE`]s at most) for files that changed
    /// since the registry last looked to stop changing.
    fn settled_fingerprint(&self, name: &str, dir: Option<&Path>) -> Option<Fingerprint> {
        let dir = dir?;
        let deadline = Instant::now() + 20 * SETTLE;
        loop {
            let fp = fingerprint(dir)?;
            let known = self.entries.get(name).is_some_and(|e| e.fingerprint.as_ref() == Some(&fp));
            match quiet_for(dir) {
                Some(quiet) if !known && quiet < SETTLE && Instant::now() < deadline => {
                    std::thread::sleep(SETTLE - quiet)
                }
                _ => return Some(fp),
            }
        }
    }

    fn load(&self, name: &str, now: u64) -> Result<Arc<LoraAdapter>, RegistryError> {
        let _guard = self.load_lock.lock().unwrap_or_else(|p| p.into_inner());
        let (dir, version) = match self.entries.get(name) {
            Some(e) if e.loaded.is_some() => {
                return e.loaded.clone().ok_or_else(|| RegistryError::NotFound(name.into()))
            }
            Some(e) => (e.dir.clone(), e.version),
            None => return Err(RegistryError::NotFound(name.to_string())),
        };
        let started = Instant::now();
        let before = fingerprint(&dir);
        let result = self.load_checked(&dir, name, &self.device);
        let Some(mut e) = self.entries.get_mut(name) else {
            return Err(RegistryError::NotFound(name.to_string()));
        };
        match result {
            Err(err) => {
                self.stats.loads_failed.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.adapter_loads.with_label_values(&["error"]).inc();
                }
                let error = err;
                tracing::warn!(adapter = name, %error, "adapter failed to load");
                e.error = Some(error.clone());
                Err(RegistryError::LoadFailed { name: name.to_string(), error })
            }
            Ok(mut adapter) => {
                let size = adapter.size_bytes;
                if size > self.budget_bytes {
                    return Err(RegistryError::TooLarge {
                        name: name.to_string(),
                        size,
                        budget: self.budget_bytes,
                    });
                }
                drop(e);
                self.make_room(size, name)?;
                adapter.version = version;
                let adapter = Arc::new(adapter);
                let Some(mut e) = self.entries.get_mut(name) else {
                    return Err(RegistryError::NotFound(name.to_string()));
                };
                e.describe(&adapter);
                e.last_used = now;
                e.last_used_at = Some(unix_now());
                e.loaded = Some(adapter.clone());
                drop(e);
                self.archive(name, version, &dir, &adapter, before.as_ref());
                self.stats.loads_ok.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.adapter_loads.with_label_values(&["ok"]).inc();
                    m.adapter_load_duration.observe(started.elapsed().as_secs_f64());
                }
                tracing::info!(
                    adapter = name,
                    version,
                    size,
                    ms = started.elapsed().as_millis() as u64,
                    "adapter loaded"
                );
                Ok(adapter)
            }
        }
    }

    /// Bytes of loaded adapters, earlier resident versions included.
    pub fn resident_bytes(&self) -> usize {
        self.entries
            .iter()
            .map(|e| e.loaded.iter().chain(&e.history).map(|a| a.size_bytes).sum::<usize>())
            .sum()
    }

    /// Evicts least recently used, unheld adapters until `incoming` more bytes fit.
    fn make_room(&self, incoming: usize, except: &str) -> Result<(), RegistryError> {
        while self.resident_bytes() + incoming > self.budget_bytes {
            // Earlier versions go first (oldest first, the loading name's too), then whole
            // adapters, least recently used; nothing a request holds.
            let unheld = |a: &Arc<LoraAdapter>| Arc::strong_count(a) == 1;
            let old = self
                .entries
                .iter()
                .filter(|e| e.history.iter().any(unheld))
                .min_by_key(|e| e.last_used)
                .map(|e| e.key().clone());
            if let Some(mut e) = old.and_then(|n| self.entries.get_mut(&n)) {
                if let Some(i) = e.history.iter().position(unheld) {
                    e.history.remove(i);
                    continue;
                }
            }
            let victim = self
                .entries
                .iter()
                .filter(|e| e.key() != except)
                .filter(|e| e.loaded.as_ref().is_some_and(unheld))
                .min_by_key(|e| e.last_used)
                .map(|e| e.key().clone());
            let Some(victim) = victim else {
                return Err(RegistryError::BudgetExhausted { budget: self.budget_bytes });
            };
            if let Some(mut e) = self.entries.get_mut(&victim) {
                e.loaded = None;
                self.stats.evictions.fetch_add(1, Ordering::Relaxed);
                if let Some(m) = &self.metrics {
                    m.adapter_evictions.inc();
                }
                tracing::info!(adapter = victim, "adapter evicted (LRU)");
            }
        }
        Ok(())
    }

    /// Loads (or reloads, as a new version) `name` from `rel_path` inside the root.
    pub fn register(&self, name: &str, rel_path: &str) -> Result<Arc<LoraAdapter>, RegistryError> {
        validate_name(name)?;
        let rel = Path::new(rel_path);
        if rel.is_absolute()
            || rel.components().any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(RegistryError::OutsideRoot(rel_path.escape_debug().to_string()));
        }
        let dir = self
            .inside_root(&self.root.join(rel))
            .ok_or_else(|| RegistryError::OutsideRoot(rel_path.escape_debug().to_string()))?;
        let fp = fingerprint(&dir).ok_or_else(|| RegistryError::LoadFailed {
            name: name.into(),
            error: "no adapter_config.json in the folder".into(),
        })?;
        if !self.observe(name, dir, fp) {
            // Same files: an explicit reload still makes a new version.
            if let Some(mut e) = self.entries.get_mut(name) {
                e.version += 1;
                e.withdrawn = false;
                self.retire(&mut e);
            }
        }
        let now = self.clock.fetch_add(1, Ordering::Relaxed);
        self.load(name, now)
    }

    /// Writes `config` and `weights` as the files of adapter `name` (a new folder, or a new
    /// version of an existing one) and loads them, after checking them exactly as a folder is
    /// checked: an invalid pair is refused with nothing written. Blocking.
    pub fn install(
        &self,
        name: &str,
        config: &[u8],
        weights: &[u8],
    ) -> Result<Arc<LoraAdapter>, RegistryError> {
        validate_name(name)?;
        static SERIAL: AtomicU64 = AtomicU64::new(0);
        let n = SERIAL.fetch_add(1, Ordering::Relaxed);
        let tmp = self.root.join(format!(".incoming-{name}-{}-{n}", std::process::id()));
        let io = |e: std::io::Error| RegistryError::LoadFailed {
            name: name.to_string(),
            error: format!("could not write the adapter's files: {e}"),
        };
        let written = std::fs::create_dir_all(&tmp)
            .and_then(|()| std::fs::write(tmp.join(super::loader::CONFIG_FILE), config))
            .and_then(|()| std::fs::write(tmp.join(super::loader::WEIGHTS_FILE), weights));
        let checked = written.map_err(io).and_then(|()| {
            self.load_checked(&tmp, name, &Device::Cpu)
                .map_err(|error| RegistryError::LoadFailed { name: name.to_string(), error })
        });
        if let Err(e) = checked {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(e);
        }
        {
            // Both files land while no rescan looks, the weights first (each rename atomic).
            let _guard = self.rescan_lock.lock().unwrap_or_else(|p| p.into_inner());
            let dir = self.root.join(name);
            let moved = std::fs::create_dir_all(&dir)
                .and_then(|()| {
                    std::fs::rename(
                        tmp.join(super::loader::WEIGHTS_FILE),
                        dir.join(super::loader::WEIGHTS_FILE),
                    )
                })
                .and_then(|()| {
                    std::fs::rename(
                        tmp.join(super::loader::CONFIG_FILE),
                        dir.join(super::loader::CONFIG_FILE),
                    )
                });
            let _ = std::fs::remove_dir_all(&tmp);
            moved.map_err(io)?;
        }
        self.register(name, name)
    }

    /// Drops the loaded copy of `name` (its files stay; it loads again on next use).
    pub fn unload(&self, name: &str) -> Result<AdapterInfo, RegistryError> {
        validate_name(name)?;
        match self.entries.get_mut(name) {
            Some(mut e) => {
                e.loaded = None;
                e.history.clear();
                drop(e);
                self.info(name).ok_or_else(|| RegistryError::NotFound(name.to_string()))
            }
            None => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    /// vLLM's unload: the adapter leaves memory and the list, and requests naming it are 404,
    /// until it is loaded again (`register`) or its folder changes; a second withdrawal is
    /// `NotFound`. (`unload` only frees the memory: the folder stays served.)
    pub fn withdraw(&self, name: &str) -> Result<(), RegistryError> {
        validate_name(name)?;
        match self.entries.get_mut(name) {
            Some(mut e) if !e.withdrawn => {
                e.loaded = None;
                e.history.clear();
                e.withdrawn = true;
                Ok(())
            }
            _ => Err(RegistryError::NotFound(name.to_string())),
        }
    }

    pub fn info(&self, name: &str) -> Option<AdapterInfo> {
        self.entries.get(name).filter(|e| !e.withdrawn).map(|e| to_info(e.key(), &e))
    }

    /// `(known, resident, failed)` adapter counts.
    pub fn counts(&self) -> (usize, usize, usize) {
        let known = self.entries.iter().filter(|e| !e.withdrawn).count();
        let resident = self.entries.iter().filter(|e| e.loaded.is_some()).count();
        let failed =
            self.entries.iter().filter(|e| e.loaded.is_none() && e.error.is_some()).count();
        (known, resident, failed)
    }

    /// Every known adapter, sorted by name.
    pub fn list(&self) -> Vec<AdapterInfo> {
        let mut v: Vec<AdapterInfo> =
            self.entries.iter().filter(|e| !e.withdrawn).map(|e| to_info(e.key(), &e)).collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// The versions of `e` resident now, oldest first.
fn resident_versions(e: &Entry) -> Vec<u64> {
    e.history.iter().chain(&e.loaded).map(|a| a.version).collect()
}

fn to_info(name: &str, e: &Entry) -> AdapterInfo {
    let state = if e.loaded.is_some() {
        AdapterState::Loaded
    } else if e.error.is_some() {
        AdapterState::Failed
    } else {
        AdapterState::Available
    };
    AdapterInfo {
        name: name.to_string(),
        version: e.version,
        state,
        path: Some(e.dir.display().to_string()),
        rank: e.rank,
        alpha: e.alpha,
        targets: e.targets.clone(),
        versions: resident_versions(e),
        dora: e.dora,
        size_bytes: e.size_bytes,
        error: e.error.clone(),
        last_used: e.last_used_at,
    }
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
