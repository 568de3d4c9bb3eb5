//! The registry: which handler versions are loaded and which instance serves
//! each route. [`Registry::apply`] reconciles the handler directory and the
//! settings into a new [`RouteTable`] and publishes it with one atomic swap.
//!
//! Reconciling rather than rebuilding is what makes reloads invisible:
//! * a file whose content hash did not change keeps its [`Library`];
//! * a route whose library and config text did not change keeps its
//!   [`Instance`], so its connections and state are not touched at all;
//! * a new version is loaded and initialised off to the side, and only a
//!   version that loaded and initialised cleanly replaces the old one;
//! * an instance that is no longer in the table is retired: its open
//!   connections stay on it until the drain timeout, then get Close 1012,
//!   spread over the drain window.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};

use crate::config::ReloadSettings;
use crate::error::ConfigError;
use crate::host_api::{ConnShared, Connections};
use crate::instance::Instance;
use crate::loader::{Library, Loader};
use crate::routing::{Route, RouteTable};
use crate::scan;
use crate::settings::Settings;
use crate::trust;

/// How strict [`Registry::apply`] is about problems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Startup and `--check-config`: a name claimed twice and a config route
    /// naming a missing handler are fatal.
    Startup,
    /// A config reload: a missing handler rejects the whole new config.
    Config,
    /// A handler file changed: problems are reported, the rest proceeds.
    Files,
}

/// What one [`Registry::apply`] found and did.
#[derive(Debug, Default)]
pub struct Report {
    /// Each problem, ready to print; none of them stopped the others.
    pub problems: Vec<String>,
    /// Routes whose instance changed (added, replaced or removed).
    pub changed: usize,
}

/// Metadata that, unchanged, lets us skip re-reading a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    len: u64,
    mtime_ns: i128,
    ctime_ns: i128,
    ino: u64,
    dev: u64,
}

impl Stamp {
    fn of(path: &Path) -> std::io::Result<Stamp> {
        use std::os::unix::fs::MetadataExt;
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            len: m.len(),
            mtime_ns: m.mtime() as i128 * 1_000_000_000 + m.mtime_nsec() as i128,
            ctime_ns: m.ctime() as i128 * 1_000_000_000 + m.ctime_nsec() as i128,
            ino: m.ino(),
            dev: m.dev(),
        })
    }
}

/// Owns the loaded libraries and live instances; only the reload task (and
/// startup) touches it.
pub struct Registry {
    loader: Arc<Loader>,
    conns: Arc<Connections>,
    table: Arc<ArcSwap<RouteTable>>,
    /// Current good version per handler file.
    libs: HashMap<PathBuf, Arc<Library>>,
    /// Last seen stamp and content hash per file.
    hashes: HashMap<PathBuf, (Stamp, String)>,
    /// Hash of the last version that failed to load, per file, so the same
    /// broken bytes are reported once rather than on every event.
    failed: HashMap<PathBuf, String>,
    /// Instance per route primary path.
    instances: HashMap<Arc<str>, Arc<Instance>>,
    init_timeout: Duration,
}

impl Registry {
    pub fn new(
        loader: Loader,
        conns: Arc<Connections>,
        table: Arc<ArcSwap<RouteTable>>,
    ) -> Registry {
        Registry {
            loader: Arc::new(loader),
            conns,
            table,
            libs: HashMap::new(),
            hashes: HashMap::new(),
            failed: HashMap::new(),
            instances: HashMap::new(),
            init_timeout: Duration::from_secs(10),
        }
    }

    /// The published route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Reconciles the handler directory and `s` into a new route table.
    /// Returns `Err` only for problems `mode` treats as fatal; then nothing
    /// changed.
    pub async fn apply(&mut self, s: &Settings, mode: Mode) -> Result<Report, ConfigError> {
        let mut report = Report::default();
        // Topic and timer caps apply server-wide, at startup and on reload.
        s.pubsub.apply();
        let scanned = scan::scan(&s.handler_dir, s.allow_outside).map_err(|e| {
            ConfigError::Other(format!(
                "cannot read the handler directory {}: {e}",
                s.handler_dir.display()
            ))
        })?;
        for (path, why) in &scanned.skipped {
            report
                .problems
                .push(format!("skipped {}: {why}", path.display()));
        }
        let conflicted: HashSet<&str> = scanned.conflicts.iter().map(|(n, _)| n.as_str()).collect();
        for (name, paths) in &scanned.conflicts {
            let list: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
            let msg = format!(
                "path /{name} is claimed by more than one handler file: {}; remove or rename all but one",
                list.join(" and ")
            );
            if mode == Mode::Startup {
                return Err(ConfigError::Other(msg));
            }
            report
                .problems
                .push(format!("{msg} (keeping what served /{name} before)"));
        }
        for r in &s.routes {
            if scanned.found.contains_key(&r.handler) || conflicted.contains(r.handler.as_str()) {
                continue;
            }
            let known: Vec<&str> = scanned.found.keys().map(String::as_str).collect();
            let msg = format!(
                "no handler named `{}` in {} (looked for {0}_wsh.so and lib{0}_wsh.so); handlers found: {}",
                r.handler,
                s.handler_dir.display(),
                if known.is_empty() {
                    "none".to_string()
                } else {
                    known.join(", ")
                }
            );
            match (mode, &r.handler_at) {
                (Mode::Files, _) => report
                    .problems
                    .push(format!("route {}: {msg}; not serving it", r.path)),
                (_, Some(at)) => return Err(at.error("handler", msg)),
                (_, None) => return Err(ConfigError::Other(msg)),
            }
        }

        // Libraries: reuse unchanged files, load changed ones off to the side.
        let mut libs: HashMap<PathBuf, Arc<Library>> = HashMap::new();
        let mut by_name: BTreeMap<&str, Arc<Library>> = BTreeMap::new();
        let mut dirs = trust::DirCache::default();
        for found in scanned.found.values() {
            match self
                .refresh(&found.path, &mut dirs, s.allow_insecure_handler_dir)
                .await
            {
                Ok(lib) => {
                    by_name.insert(&found.name, lib.clone());
                    libs.insert(found.path.clone(), lib);
                }
                Err(problem) => {
                    let old = self.libs.get(&found.path).cloned();
                    match old {
                        Some(old) => {
                            report.problems.push(format!(
                                "{problem}; generation {} ({}) keeps serving /{}",
                                old.generation,
                                old.short_hash(),
                                found.name
                            ));
                            by_name.insert(&found.name, old.clone());
                            libs.insert(found.path.clone(), old);
                        }
                        None => report
                            .problems
                            .push(format!("{problem}; /{} is not served", found.name)),
                    }
                }
            }
        }
        for gone in self.libs.keys().filter(|p| !libs.contains_key(*p)) {
            self.hashes.remove(gone);
            self.failed.remove(gone);
        }

        // Routes: the scanned ones, then the config's, which override a
        // scanned route with the same path.
        struct Want<'a> {
            aliases: &'a [String],
            handler: &'a str,
            spec: Option<&'a crate::settings::RouteSpec>,
        }
        let mut wants: BTreeMap<String, Want> = BTreeMap::new();
        for name in scanned
            .found
            .keys()
            .map(String::as_str)
            .chain(conflicted.iter().copied())
        {
            let path = format!("/{name}");
            wants.insert(
                path,
                Want {
                    aliases: &[],
                    handler: name,
                    spec: None,
                },
            );
        }
        for r in &s.routes {
            wants.insert(
                r.path.clone(),
                Want {
                    aliases: &r.aliases,
                    handler: &r.handler,
                    spec: Some(r),
                },
            );
        }

        let mut table = RouteTable::default();
        let mut instances: HashMap<Arc<str>, Arc<Instance>> = HashMap::new();
        for (path, want) in &wants {
            let path: Arc<str> = path.as_str().into();
            let old = self.instances.get(&path).cloned();
            let config_text = want.spec.map_or("", |r| r.config_text.as_str());
            let instance = if conflicted.contains(want.handler) {
                old
            } else if let Some(lib) = by_name.get(want.handler) {
                match &old {
                    Some(o)
                        if o.lib.generation == lib.generation && o.config_text == config_text =>
                    {
                        old.clone()
                    }
                    _ => match self.init(lib.clone(), path.clone(), config_text).await {
                        Ok(i) => Some(i),
                        Err(e) => {
                            crate::metrics::handler_load_error();
                            let keep = old.filter(|_| mode != Mode::Startup);
                            report.problems.push(match &keep {
                                Some(o) => format!("{e}; {} keeps serving {path}", o.describe()),
                                None => format!("{e}; {path} is not served"),
                            });
                            keep
                        }
                    },
                }
            } else {
                None
            };
            let Some(instance) = instance else { continue };
            let (origins, limits) = match want.spec {
                Some(r) => (r.allowed_origins.clone(), r.limits.clone()),
                None => (None, s.limits.clone()),
            };
            let route = Arc::new(Route::new(path.clone(), instance.clone(), origins, limits));
            for alias in want.aliases {
                table.routes.insert(alias.as_str().into(), route.clone());
            }
            table.routes.insert(path.clone(), route);
            instances.insert(path, instance);
        }

        // Publish, then retire what the new table no longer uses.
        let old_table = self.table.swap(Arc::new(table));
        for (path, new) in &instances {
            match self.instances.get(path) {
                Some(old) if Arc::ptr_eq(old, new) => {}
                Some(old) => {
                    report.changed += 1;
                    tracing::info!(
                        route = %path,
                        "swapped: new connections get {}, {} open connections stay on {}",
                        new.describe(),
                        old.live.load(Ordering::Relaxed),
                        old.describe()
                    );
                }
                None => {
                    report.changed += 1;
                    tracing::info!(route = %path, "serving {}", new.describe());
                }
            }
        }
        let retired: Vec<Arc<Instance>> = self
            .instances
            .iter()
            .filter(|(p, old)| instances.get(*p).is_none_or(|new| !Arc::ptr_eq(old, new)))
            .map(|(_, old)| old.clone())
            .collect();
        for old in retired {
            if !instances.contains_key(&old.route) {
                report.changed += 1;
                tracing::info!(route = %old.route, "route removed: new handshakes get 404");
            }
            retire(&old, &s.reload, &self.conns);
        }
        self.instances = instances;
        self.libs = libs;
        drop(old_table);
        Ok(report)
    }

    /// Returns the current library for `path`, loading a new version if
    /// the file's content changed. `Err` is a problem to report.
    ///
    /// The file is opened once: the trust check looks at that descriptor
    /// (`fstat`), and the bytes hashed and loaded are read from it, so what
    /// was checked is what runs. A refusal by the trust check is not
    /// remembered as a failed hash: after `chmod go-w` the same bytes load.
    async fn refresh(
        &mut self,
        path: &Path,
        dirs: &mut trust::DirCache,
        allow_insecure: bool,
    ) -> Result<Arc<Library>, String> {
        let current = self.libs.get(path).cloned();
        let stamp = Stamp::of(path).map_err(|e| format!("cannot stat {}: {e}", path.display()))?;
        if let (Some(lib), Some((seen, hash))) = (&current, self.hashes.get(path))
            && *seen == stamp
            && *hash == lib.hash
        {
            return Ok(lib.clone());
        }
        let mut insecure = Vec::new();
        if let Err(e) = dirs.check_dirs_of(path) {
            if !allow_insecure {
                crate::metrics::handler_load_error();
                return Err(format!("refused {}: {e}", path.display()));
            }
            insecure.push(e);
        }
        let (file_trust, bytes) = {
            let p = path.to_owned();
            tokio::task::spawn_blocking(move || -> std::io::Result<_> {
                use std::io::Read;
                let mut f = std::fs::File::open(&p)?;
                let t = trust::check_file(&p, &f);
                if t.is_err() && !allow_insecure {
                    return Ok((t, Vec::new()));
                }
                let mut bytes = Vec::new();
                f.read_to_end(&mut bytes)?;
                Ok((t, bytes))
            })
            .await
            .expect("read does not panic")
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?
        };
        if let Err(e) = file_trust {
            if !allow_insecure {
                crate::metrics::handler_load_error();
                return Err(format!("refused {}: {e}", path.display()));
            }
            insecure.push(e);
        }
        let hash = hex(&Sha256::digest(&bytes));
        self.hashes.insert(path.to_owned(), (stamp, hash.clone()));
        if let Some(lib) = &current
            && lib.hash == hash
        {
            // touch, or an identical rebuild: nothing to do.
            return Ok(lib.clone());
        }
        if self.failed.get(path) == Some(&hash) {
            return Err(format!(
                "{} is unchanged since it failed to load",
                path.display()
            ));
        }
        for e in &insecure {
            tracing::warn!(
                file = %path.display(),
                "loading it although allow_insecure_handler_dir is set: {e}"
            );
        }
        let loader = self.loader.clone();
        let source = path.to_owned();
        let h = hash.clone();
        let loaded = tokio::task::spawn_blocking(move || loader.load(&source, &bytes, &h))
            .await
            .expect("loader does not panic");
        match loaded {
            Ok(lib) => {
                self.failed.remove(path);
                tracing::info!(
                    file = %path.display(),
                    handler = %lib.desc.name,
                    version = %lib.desc.version,
                    generation = lib.generation,
                    hash = %lib.short_hash(),
                    abi = %format!("{}.{}", lib.desc.abi_major, lib.desc.abi_minor),
                    flags = %format!("{:#x}", lib.desc.flags),
                    build = %lib.desc.build_info,
                    "loaded handler library"
                );
                Ok(Arc::new(lib))
            }
            Err(e) => {
                // A load that ran out of descriptors or memory is retried
                // (reload.rs): it must not count as "these bytes are broken".
                if !e.is_transient() {
                    self.failed.insert(path.to_owned(), hash);
                }
                crate::metrics::handler_load_error();
                Err(format!("refused {}: {e}", path.display()))
            }
        }
    }

    async fn init(
        &self,
        lib: Arc<Library>,
        route: Arc<str>,
        config: &str,
    ) -> Result<Arc<Instance>, String> {
        let conns = self.conns.clone();
        let config = config.to_owned();
        let name = lib.desc.name.clone();
        let task = tokio::task::spawn_blocking(move || Instance::init(lib, route, config, conns));
        match tokio::time::timeout(self.init_timeout, task).await {
            Ok(Ok(Ok(i))) => Ok(i.into_arc()),
            Ok(Ok(Err(e))) => Err(e.to_string()),
            Ok(Err(join)) => Err(format!("handler `{name}` init crashed: {join}")),
            Err(_) => Err(format!(
                "handler `{name}` init did not finish within {} s; abandoning it",
                self.init_timeout.as_secs()
            )),
        }
    }

    /// Retires every instance (shutdown): drops the registry's references so
    /// each `destroy` runs when its last connection is gone.
    pub fn clear(&mut self) {
        self.table.store(Arc::new(RouteTable::default()));
        self.instances.clear();
        self.libs.clear();
    }
}

/// Schedules the drain of an instance that no longer takes new connections.
fn retire(inst: &Arc<Instance>, reload: &ReloadSettings, conns: &Arc<Connections>) {
    let live = inst.live.load(Ordering::Relaxed);
    inst.set_drain_window(reload.drain_window);
    match reload.drain_timeout {
        _ if live == 0 => {
            tracing::info!(route = %inst.route, "retired {} (no open connections)", inst.describe())
        }
        None => tracing::info!(
            route = %inst.route,
            "retired {}: {live} open connections stay until they close (drain_timeout = never)",
            inst.describe()
        ),
        Some(t) => {
            tracing::info!(
                route = %inst.route,
                "retired {}: {live} open connections get Close 1012 after {t:?}, spread over {:?}",
                inst.describe(),
                reload.drain_window
            );
            let inst = inst.clone();
            let conns = conns.clone();
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                // Cancel first: a session registering during the walk below
                // checks the token after it is in `conns` (session.rs).
                inst.drain.cancel();
                for c in conns.iter().filter(|c| c.owner == inst.id) {
                    c.signal(ConnShared::RETIRED);
                }
            });
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}
