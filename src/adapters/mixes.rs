//! Named mixes: `name → [(adapter, scale), …]`, addressable as the request's `model` and listed
//! in `/v1/models`, so a router that sees one name per request can route and cache a mix like
//! any adapter. A mix resolves to exactly the adapters an explicit `adapters` list would, so it
//! batches and shares prefix-cache blocks with the same mix written out by hand.
//!
//! Two sources: `mixes.toml` in the adapters folder (reread on every registry rescan; a changed
//! definition is a new version of that mix, as a changed folder is of an adapter) and the
//! server's `mix` option (fixed for the process). Both use one spec syntax,
//! `adapter:scale,adapter:scale` (a missing `:scale` is 1.0).

use super::registry::validate_name;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::SystemTime;

/// The mixes file in the adapters folder.
pub const MIXES_FILE: &str = "mixes.toml";

/// The error of a mix whose name an adapter folder (or a configured mix) holds.
pub const NAME_TAKEN: &str = "the name is taken by an adapter folder or a configured mix";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MixError {
    #[error("invalid mix `{spec}`: {reason}")]
    Invalid { spec: String, reason: String },
}

fn invalid(spec: &str, reason: impl Into<String>) -> MixError {
    MixError::Invalid { spec: spec.escape_debug().to_string(), reason: reason.into() }
}

/// One adapter of a mix and its scale.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MixMember {
    pub name: String,
    pub scale: f64,
}

/// Parses `adapter:scale,adapter:scale` (whitespace around items is ignored).
pub fn parse_members(spec: &str) -> Result<Vec<MixMember>, MixError> {
    let mut out: Vec<MixMember> = Vec::new();
    for item in spec.split(',').map(str::trim) {
        if item.is_empty() {
            return Err(invalid(spec, "an empty item (expected `adapter:scale,adapter:scale`)"));
        }
        let (name, scale) = match item.split_once(':') {
            Some((n, s)) => (
                n.trim(),
                s.trim().parse::<f64>().map_err(|_| {
                    invalid(spec, format!("scale `{}` of `{}` is not a number", s.trim(), n.trim()))
                })?,
            ),
            None => (item, 1.0),
        };
        super::registry::split_ref(name).map_err(|e| invalid(spec, e.to_string()))?;
        if !scale.is_finite() {
            return Err(invalid(spec, format!("scale of `{name}` must be finite")));
        }
        if out.iter().any(|m| m.name == name) {
            return Err(invalid(spec, format!("adapter `{name}` appears twice")));
        }
        out.push(MixMember { name: name.to_string(), scale });
    }
    Ok(out)
}

/// Parses the option form `name=adapter:scale,adapter:scale`.
pub fn parse_named(spec: &str) -> Result<(String, Vec<MixMember>), MixError> {
    let (name, members) = spec
        .split_once('=')
        .ok_or_else(|| invalid(spec, "expected `name=adapter:scale,adapter:scale`"))?;
    let name = name.trim();
    validate_name(name).map_err(|e| invalid(spec, e.to_string()))?;
    Ok((name.to_string(), parse_members(members)?))
}

/// Where a mix was defined.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MixSource {
    /// The server's `mix` option.
    Config,
    /// `mixes.toml` in the adapters folder.
    File,
}

/// A named mix as `/v1/models` shows it. `error` is set (and the mix refused) when its
/// definition is broken or its name is taken by an adapter folder.
#[derive(Debug, Clone, Serialize)]
pub struct MixInfo {
    pub name: String,
    pub version: u64,
    pub source: MixSource,
    pub adapters: Vec<MixMember>,
    pub error: Option<String>,
}

#[derive(Debug, Default)]
struct FileState {
    /// Length and modification time of `mixes.toml` when last read.
    stamp: Option<(u64, Option<SystemTime>)>,
    mixes: BTreeMap<String, MixInfo>,
}

/// Every named mix. Reads are lock-free in practice (an uncontended `RwLock`); the registry's
/// rescan is the only writer.
#[derive(Debug)]
pub struct MixTable {
    file: PathBuf,
    config: BTreeMap<String, MixInfo>,
    state: RwLock<FileState>,
    /// Saves read, change and replace the file one at a time (two concurrent saves would each
    /// write the file without the other's entry).
    writer: std::sync::Mutex<()>,
}

impl MixTable {
    /// Mixes from the option (`name=spec` each) plus `root/mixes.toml`.
    pub fn new(root: &Path, configured: &[(String, Vec<MixMember>)]) -> Self {
        let config = configured
            .iter()
            .map(|(n, m)| {
                (
                    n.clone(),
                    MixInfo {
                        name: n.clone(),
                        version: 1,
                        source: MixSource::Config,
                        adapters: m.clone(),
                        error: None,
                    },
                )
            })
            .collect();
        Self {
            file: root.join(MIXES_FILE),
            config,
            state: RwLock::new(FileState::default()),
            writer: std::sync::Mutex::new(()),
        }
    }

    /// Rereads `mixes.toml` if it changed; `is_adapter` tells which names adapter folders
    /// hold (such a mix is refused: one name must mean one thing). Returns the mix names whose
    /// definition changed.
    pub fn rescan(&self, is_adapter: &dyn Fn(&str) -> bool) -> Vec<String> {
        let meta = std::fs::metadata(&self.file).ok();
        let stamp = meta.map(|m| (m.len(), m.modified().ok()));
        let mut st = self.state.write().unwrap_or_else(|p| p.into_inner());
        let mut parsed = if st.stamp == stamp && stamp.is_some() {
            st.mixes.clone()
        } else {
            match stamp {
                None => BTreeMap::new(),
                Some(_) => self.read_file(&st.mixes),
            }
        };
        for (name, mix) in parsed.iter_mut() {
            let clash = is_adapter(name) || self.config.contains_key(name);
            let taken = NAME_TAKEN;
            if clash && mix.error.is_none() {
                mix.error = Some(taken.into());
            } else if !clash && mix.error.as_deref() == Some(taken) {
                mix.error = None;
            }
        }
        let mut changed: Vec<String> = parsed
            .iter()
            .filter(|(n, m)| {
                st.mixes
                    .get(*n)
                    .is_none_or(|old| old.adapters != m.adapters || old.error != m.error)
            })
            .map(|(n, _)| n.clone())
            .collect();
        changed.extend(st.mixes.keys().filter(|n| !parsed.contains_key(*n)).cloned());
        st.stamp = stamp;
        st.mixes = parsed;
        changed
    }

    /// Parses the file; a mix whose definition is unchanged keeps its version, a changed one
    /// gets the next.
    fn read_file(&self, old: &BTreeMap<String, MixInfo>) -> BTreeMap<String, MixInfo> {
        let mk = |name: &str, adapters: Vec<MixMember>, error: Option<String>| {
            let version = match old.get(name) {
                Some(o) if o.adapters == adapters => o.version,
                Some(o) => o.version + 1,
                None => 1,
            };
            (
                name.to_string(),
                MixInfo {
                    name: name.to_string(),
                    version,
                    source: MixSource::File,
                    adapters,
                    error,
                },
            )
        };
        let text = match std::fs::read_to_string(&self.file) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %self.file.display(), error = %e, "cannot read the mixes file");
                return old.clone();
            }
        };
        let table: toml::Table = match toml::from_str(&text) {
            Ok(t) => t,
            Err(e) => {
                // Keep serving the last good definitions: a half-saved file must not take
                // every mix away.
                tracing::warn!(file = %self.file.display(), error = %e, "the mixes file is not valid TOML; keeping the previous mixes");
                return old.clone();
            }
        };
        table
            .iter()
            .map(|(name, v)| {
                let def = match v.as_str() {
                    None => Err(format!("`{name}` must be a string `adapter:scale,adapter:scale`")),
                    Some(spec) => validate_name(name)
                        .map_err(|e| e.to_string())
                        .and_then(|_| parse_members(spec).map_err(|e| e.to_string())),
                };
                match def {
                    Ok(members) => mk(name, members, None),
                    Err(e) => {
                        tracing::warn!(mix = %name, error = %e, "invalid mix in the mixes file");
                        let keep =
                            old.get(name.as_str()).map(|o| o.adapters.clone()).unwrap_or_default();
                        mk(name, keep, Some(e))
                    }
                }
            })
            .collect()
    }

    /// The mix `name`, if one is defined (possibly with an error).
    pub fn get(&self, name: &str) -> Option<MixInfo> {
        if let Some(m) = self.config.get(name) {
            return Some(m.clone());
        }
        self.state.read().unwrap_or_else(|p| p.into_inner()).mixes.get(name).cloned()
    }

    /// Writes `name = "spec"` into `mixes.toml` (a new entry or a new definition), keeping the
    /// file's other entries; the registry's next rescan serves it. The file is replaced
    /// through a rename, so the watcher never reads half of it.
    pub fn save(&self, name: &str, members: &[MixMember]) -> Result<(), MixError> {
        let spec =
            members.iter().map(|m| format!("{}:{}", m.name, m.scale)).collect::<Vec<_>>().join(",");
        validate_name(name).map_err(|e| invalid(name, e.to_string()))?;
        parse_members(&spec)?;
        if self.config.contains_key(name) {
            return Err(invalid(name, "a configured mix (the `mix` option) holds this name"));
        }
        let _one_at_a_time = self.writer.lock().unwrap_or_else(|p| p.into_inner());
        let text = std::fs::read_to_string(&self.file).unwrap_or_default();
        let mut table: toml::Table = toml::from_str(&text)
            .map_err(|e| invalid(name, format!("`{MIXES_FILE}` is not valid TOML: {e}")))?;
        table.insert(name.to_string(), toml::Value::String(spec));
        let out = toml::to_string(&table).map_err(|e| invalid(name, e.to_string()))?;
        // A temporary name of this process's own, removed when the write fails.
        let tmp = self.file.with_extension(format!("toml.{}.tmp", std::process::id()));
        let written = std::fs::write(&tmp, out).and_then(|_| std::fs::rename(&tmp, &self.file));
        if written.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        written.map_err(|e| invalid(name, format!("cannot write `{MIXES_FILE}`: {e}")))
    }

    /// Every mix, sorted by name.
    pub fn list(&self) -> Vec<MixInfo> {
        let st = self.state.read().unwrap_or_else(|p| p.into_inner());
        let file = st.mixes.values().filter(|m| !self.config.contains_key(&m.name));
        let mut v: Vec<MixInfo> = self.config.values().chain(file).cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Concurrent saves (two playground tabs, a script) each keep the others' entries: the
    /// read-modify-write of the file is one at a time.
    #[test]
    fn concurrent_saves_lose_no_entry() {
        let dir = tempfile::tempdir().unwrap();
        let table = std::sync::Arc::new(MixTable::new(dir.path(), &[]));
        let threads: Vec<_> = (0..16)
            .map(|i| {
                let t = table.clone();
                std::thread::spawn(move || {
                    for j in 0..8 {
                        let member = MixMember { name: format!("a{i}"), scale: 0.5 };
                        t.save(&format!("mix-{i}-{j}"), &[member]).unwrap();
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let text = std::fs::read_to_string(dir.path().join(MIXES_FILE)).unwrap();
        let table: toml::Table = toml::from_str(&text).unwrap();
        assert_eq!(table.len(), 128, "{text}");
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n != MIXES_FILE)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        let m = parse_members("qa-r8:0.7, all-r16:0.3,x").unwrap();
        assert_eq!(
            m,
            vec![
                MixMember { name: "qa-r8".into(), scale: 0.7 },
                MixMember { name: "all-r16".into(), scale: 0.3 },
                MixMember { name: "x".into(), scale: 1.0 }
            ]
        );
        assert_eq!(
            parse_named("blend=a:2").unwrap(),
            ("blend".into(), vec![MixMember { name: "a".into(), scale: 2.0 }])
        );
        for bad in ["a:x", "a,,b", "a,a", "../a:1", "a:inf", ""] {
            let e = parse_members(bad).unwrap_err().to_string();
            assert!(e.contains("invalid mix"), "{bad}: {e}");
        }
        assert!(parse_named("no-equals").unwrap_err().to_string().contains("name=adapter"));
    }

    #[test]
    fn file_changes_are_versions_and_clashes_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let t = MixTable::new(
            dir.path(),
            &[("cfg".into(), vec![MixMember { name: "a".into(), scale: 1.0 }])],
        );
        let none = |_: &str| false;
        assert!(t.rescan(&none).is_empty());
        std::fs::write(dir.path().join(MIXES_FILE), "m1 = \"a:0.5,b:0.5\"\nm2 = \"a\"\n").unwrap();
        assert_eq!(t.rescan(&none), vec!["m1", "m2"]);
        assert_eq!(t.get("m1").unwrap().version, 1);
        assert!(t.rescan(&none).is_empty(), "unchanged file");
        // Rewrite with m1 changed and m2 untouched (the length changes, so the stamp does too).
        std::fs::write(dir.path().join(MIXES_FILE), "m1 = \"a:0.25,b:0.75\"\nm2 = \"a\"\n")
            .unwrap();
        assert_eq!(t.rescan(&none), vec!["m1"]);
        assert_eq!((t.get("m1").unwrap().version, t.get("m2").unwrap().version), (2, 1));
        // A broken file keeps the previous mixes.
        std::fs::write(dir.path().join(MIXES_FILE), "m1 = [").unwrap();
        assert!(t.rescan(&none).is_empty());
        assert_eq!(t.get("m1").unwrap().adapters[1].scale, 0.75);
        // A bad entry is listed with its error; a name an adapter holds is refused.
        std::fs::write(dir.path().join(MIXES_FILE), "m1 = \"a:zz\"\nm2 = \"a\"\ncfg = \"b\"\n")
            .unwrap();
        t.rescan(&|n| n == "m2");
        assert!(t.get("m1").unwrap().error.unwrap().contains("not a number"));
        assert!(t.get("m2").unwrap().error.unwrap().contains("taken"));
        assert_eq!(
            t.get("cfg").unwrap().source,
            MixSource::Config,
            "the configured mix wins its name"
        );
        assert_eq!(t.list().len(), 3, "cfg listed once, with m1 and m2");
        std::fs::remove_file(dir.path().join(MIXES_FILE)).unwrap();
        t.rescan(&none);
        assert!(t.get("m1").is_none() && t.get("cfg").is_some());
    }
}
