//! The registry: which handler versions are loaded and which instances serve
//! each route. [`Registry::apply`] reconciles the handler directory and the
//! settings into a new [`RouteTable`] and publishes it with one atomic swap;
//! [`Registry::tick`] moves rollouts along (promotion, rollback,
//! quarantine) between reconciles.
//!
//! Reconciling rather than rebuilding is what makes reloads invisible:
//! * a file whose content hash did not change keeps its [`Library`];
//! * a route whose library and config text did not change keeps its
//!   [`Instance`], so its connections and state are not touched at all;
//! * a new version is loaded and initialised off to the side, and only a
//!   version that loaded and initialised cleanly is offered to the route's
//!   rollout (rollout.rs): it serves at once, or as a canary first;
//! * an instance that is no longer in the table is retired: its open
//!   connections stay on it until the drain timeout, then get Close 1012,
//!   spread over the drain window. A rolled-back or quarantined version
//!   drains at once: it is known bad.
//!
//! State: one [`FileState`] per handler file (what was read, what is
//! loaded, which bytes failed or are quarantined) and one [`RouteState`]
//! per route (its rollout and what it falls back to). `apply` runs four
//! steps: [`Registry::scan`], `refresh` + [`Registry::plan`],
//! [`Registry::publish`] and [`Registry::retire`].

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::config::{Limits, OriginRule, ReloadSettings};
use crate::error::{ConfigError, FileProblem, InitError, Problem};
use crate::instance::Instance;
use crate::loader::{Library, Loader};
use crate::mailbox::{ConnShared, Connections};
use crate::rollout::{self, Offer, Policy, Rollout, Step};
use crate::routing::{Route, RouteTable};
use crate::scan;
use crate::settings::Settings;
use crate::status::{RouteStatus, VersionStatus};
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
    /// Each problem; none of them stopped the others.
    pub problems: Vec<Problem>,
    /// Routes whose instances changed (added, replaced, canary started or
    /// ended, removed).
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

/// Everything known about one handler file.
#[derive(Debug, Default)]
struct FileState {
    /// Last seen stamp and content hash.
    seen: Option<(Stamp, String)>,
    /// The newest version that loaded.
    lib: Option<Arc<Library>>,
    /// Hash of the last bytes that failed to load, so the same broken bytes
    /// are reported once rather than on every event.
    failed: Option<String>,
    /// Hash of bytes that were rolled back or quarantined: not served again
    /// until the file's bytes change. Kept while the file is absent.
    quarantined: Option<(String, &'static str)>,
}

/// One route: where it is served from and how it rolls out.
#[derive(Clone)]
struct RouteState {
    handler: String,
    file: Option<PathBuf>,
    aliases: Vec<String>,
    origins: Option<Vec<OriginRule>>,
    limits: Limits,
    config_text: String,
    policy: Policy,
    rollout: Rollout<Arc<Instance>>,
    /// The previous good version, to fall back to if the stable version is
    /// quarantined.
    last_good: Option<Arc<Library>>,
    /// Generation and config that were rolled back or quarantined on this
    /// route: not offered again.
    rejected: Option<(u64, String)>,
    /// The stable version is quarantined with nothing to fall back to: when
    /// to warn again.
    warn_at: Option<Instant>,
    /// New connections since the canary started (routing.rs `pick`).
    picked: Arc<std::sync::atomic::AtomicU64>,
}

/// How often a quarantined version without a fallback is warned about.
const QUARANTINE_WARN_EVERY: Duration = Duration::from_secs(60);

/// While a retired version still drains, the status file is rewritten this
/// often so its open-connection counts stay current.
const STATUS_REFRESH: Duration = Duration::from_secs(5);

/// Owns the loaded libraries and live instances; only the reload task (and
/// startup) touches it.
pub struct Registry {
    loader: Arc<Loader>,
    conns: Arc<Connections>,
    table: Arc<ArcSwap<RouteTable>>,
    files: HashMap<PathBuf, FileState>,
    routes: BTreeMap<Arc<str>, RouteState>,
    /// Retired instances still holding connections, for `--list`.
    draining: Vec<Weak<Instance>>,
    init_timeout: Duration,
    /// Woken by any instance's fault (rollout::Health).
    alarm: Arc<Notify>,
    /// `status_file`: where the live table goes (status.rs).
    status_file: Option<PathBuf>,
    /// When to rewrite the status file while versions drain.
    status_at: Option<Instant>,
}

/// What the wanted routes are, before anything is loaded.
struct Want<'a> {
    aliases: &'a [String],
    handler: &'a str,
    spec: Option<&'a crate::settings::RouteSpec>,
}

/// What `scan` found.
struct Scanned {
    scan: scan::Scan,
    conflicted: HashSet<String>,
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
            files: HashMap::new(),
            routes: BTreeMap::new(),
            draining: Vec::new(),
            init_timeout: Duration::from_secs(10),
            alarm: Arc::new(Notify::new()),
            status_file: None,
            status_at: None,
        }
    }

    /// The published route table.
    pub fn table(&self) -> Arc<RouteTable> {
        self.table.load_full()
    }

    /// Notified when any instance records a fault: call [`Registry::tick`].
    pub fn alarm(&self) -> Arc<Notify> {
        self.alarm.clone()
    }

    /// When [`Registry::tick`] must run even without a fault (a canary
    /// period ends, a quarantine warning is due).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.routes
            .values()
            .flat_map(|r| [r.rollout.deadline().map(Instant::from_std), r.warn_at])
            .flatten()
            .chain(self.status_at)
            .min()
    }

    /// Writes the live table to `status_file`, if set; while versions
    /// drain, schedules the next rewrite.
    fn write_status(&mut self) {
        let Some(path) = self.status_file.clone() else {
            return;
        };
        let routes = self.status();
        if let Err(e) = crate::status::write(&path, &routes) {
            tracing::warn!(
                "cannot write status_file {}: {e}; `wshd --list` will not show this server's \
                 rollouts (check the directory exists and is writable by this user)",
                path.display()
            );
        }
        self.status_at = (!self.draining.is_empty()).then(|| Instant::now() + STATUS_REFRESH);
    }

    /// Every route's versions, shares and states, sorted by path.
    pub fn status(&mut self) -> Vec<RouteStatus> {
        self.draining.retain(|w| w.strong_count() > 0);
        let draining: Vec<Arc<Instance>> = self.draining.iter().filter_map(Weak::upgrade).collect();
        self.routes
            .iter()
            .map(|(path, r)| {
                let mut versions = Vec::new();
                let canary = r.rollout.canary.as_ref();
                let share = canary.map_or(100, |c| 100 - c.percent);
                versions.push(VersionStatus {
                    instance: r.rollout.stable.clone(),
                    share,
                    state: if r.warn_at.is_some() {
                        "quarantined"
                    } else {
                        "serving"
                    },
                });
                if let Some(c) = canary {
                    versions.push(VersionStatus {
                        instance: c.version.clone(),
                        share: c.percent,
                        state: "canary",
                    });
                }
                for d in draining.iter().filter(|d| d.route == *path) {
                    versions.push(VersionStatus {
                        instance: d.clone(),
                        share: 0,
                        state: "draining",
                    });
                }
                RouteStatus {
                    path: path.clone(),
                    aliases: r.aliases.clone(),
                    versions,
                }
            })
            .collect()
    }

    /// Reconciles the handler directory and `s` into a new route table.
    /// Returns `Err` only for problems `mode` treats as fatal; then nothing
    /// changed.
    pub async fn apply(&mut self, s: &Settings, mode: Mode) -> Result<Report, ConfigError> {
        let mut report = Report::default();
        // Topic and timer caps apply server-wide, at startup and on reload.
        s.pubsub.apply();
        let scanned = self.scan(s, mode, &mut report)?;
        let by_name = self.refresh_all(&scanned, s, &mut report).await;
        let before = self.instances();
        let mut drain_now = HashSet::new();
        self.plan(s, mode, &scanned, &by_name, &mut report, &mut drain_now)
            .await;
        self.publish();
        self.retire(before, &s.reload, &drain_now);
        self.status_file = s.status_file.clone();
        self.write_status();
        Ok(report)
    }

    /// Step 1: scan the directory and check the config's routes against it.
    fn scan(&self, s: &Settings, mode: Mode, report: &mut Report) -> Result<Scanned, ConfigError> {
        let scanned = scan::scan(&s.handler_dir, s.allow_outside).map_err(|e| {
            ConfigError::Other(format!(
                "cannot read the handler directory {}: {e}",
                s.handler_dir.display()
            ))
        })?;
        if scanned.is_empty() {
            tracing::warn!("{}", scan::nothing_found(&s.handler_dir));
        }
        for (path, why) in &scanned.skipped {
            report.problems.push(Problem::Skipped {
                path: path.clone(),
                why: why.clone(),
            });
        }
        let conflicted: HashSet<String> =
            scanned.conflicts.iter().map(|(n, _)| n.clone()).collect();
        for (name, paths) in &scanned.conflicts {
            let list: Vec<_> = paths.iter().map(|p| p.display().to_string()).collect();
            let message = format!(
                "path /{name} is claimed by more than one handler file: {}; remove or rename all but one",
                list.join(" and ")
            );
            if mode == Mode::Startup {
                return Err(ConfigError::Other(message));
            }
            report.problems.push(Problem::Conflict {
                name: name.clone(),
                message,
            });
        }
        for r in &s.routes {
            if scanned.found.contains_key(&r.handler) || conflicted.contains(&r.handler) {
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
                (Mode::Files, _) => report.problems.push(Problem::MissingHandler {
                    route: r.path.clone(),
                    message: msg,
                }),
                (_, Some(at)) => return Err(at.error("handler", msg)),
                (_, None) => return Err(ConfigError::Other(msg)),
            }
        }
        Ok(Scanned {
            scan: scanned,
            conflicted,
        })
    }

    /// Step 2a: the library each handler name serves from: unchanged files
    /// keep theirs, changed ones load off to the side, and a file whose new
    /// bytes are refused keeps its previous version.
    async fn refresh_all(
        &mut self,
        scanned: &Scanned,
        s: &Settings,
        report: &mut Report,
    ) -> BTreeMap<String, Arc<Library>> {
        let mut by_name = BTreeMap::new();
        let mut dirs = trust::DirCache::default();
        for found in scanned.scan.found.values() {
            // Every route that serves this handler and pins its bytes.
            let pins: Vec<(&str, &str)> = s
                .routes
                .iter()
                .filter(|r| r.handler == found.name)
                .filter_map(|r| r.sha256.as_deref().map(|p| (r.path.as_str(), p)))
                .collect();
            let pinned_ok =
                |lib: &Library| pins.is_empty() || pins.iter().any(|(_, p)| *p == lib.hash);
            match self
                .refresh(&found.path, &pins, &mut dirs, s.allow_insecure_handler_dir)
                .await
            {
                Ok(lib) => {
                    by_name.insert(found.name.clone(), lib);
                }
                Err(problem) => {
                    crate::metrics::handler_load_error();
                    let old = self
                        .files
                        .get(&found.path)
                        .and_then(|f| f.lib.clone())
                        .filter(|l| pinned_ok(l));
                    let outcome = match &old {
                        Some(old) => format!(
                            "generation {} ({}) keeps serving /{}",
                            old.generation,
                            old.short_hash(),
                            found.name
                        ),
                        None => format!("/{} is not served", found.name),
                    };
                    report.problems.push(Problem::File { problem, outcome });
                    if let Some(old) = old {
                        by_name.insert(found.name.clone(), old);
                    }
                }
            }
        }
        // A file that is gone forgets everything but its quarantine.
        let present: HashSet<&PathBuf> = scanned.scan.found.values().map(|f| &f.path).collect();
        self.files.retain(|p, f| {
            present.contains(p) || {
                f.lib = None;
                f.seen = None;
                f.failed = None;
                f.quarantined.is_some()
            }
        });
        by_name
    }

    /// Returns the current library for `path`, loading a new version if
    /// the file's content changed.
    ///
    /// The file is opened once: the trust check looks at that descriptor
    /// (`fstat`), and the bytes hashed and loaded are read from it, so what
    /// was checked is what runs. A refusal by the trust check is not
    /// remembered as a failed hash: after `chmod go-w` the same bytes load.
    /// Pinned hashes (`pins`: route, hash) are checked before anything is
    /// loaded: other bytes never reach `dlopen`.
    async fn refresh(
        &mut self,
        path: &Path,
        pins: &[(&str, &str)],
        dirs: &mut trust::DirCache,
        allow_insecure: bool,
    ) -> Result<Arc<Library>, FileProblem> {
        let pin_check = |hash: &str| match pins.first() {
            Some((route, pinned)) if !pins.iter().any(|(_, p)| *p == hash) => {
                Err(FileProblem::PinMismatch {
                    path: path.to_owned(),
                    route: route.to_string(),
                    found: hash.to_owned(),
                    pinned: pinned.to_string(),
                })
            }
            _ => Ok(()),
        };
        let state = self.files.entry(path.to_owned()).or_default();
        let current = state.lib.clone();
        let stamp = Stamp::of(path).map_err(|source| FileProblem::Io {
            op: "stat",
            path: path.to_owned(),
            source,
        })?;
        if let (Some(lib), Some((seen, hash))) = (&current, &state.seen)
            && *seen == stamp
            && *hash == lib.hash
        {
            pin_check(&lib.hash)?;
            return Ok(lib.clone());
        }
        let untrusted = |e: trust::Untrusted| FileProblem::Untrusted {
            path: path.to_owned(),
            why: e.to_string(),
        };
        let mut insecure = Vec::new();
        if let Err(e) = dirs.check_dirs_of(path) {
            if !allow_insecure {
                return Err(untrusted(e));
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
            .map_err(|source| FileProblem::Io {
                op: "read",
                path: path.to_owned(),
                source,
            })?
        };
        if let Err(e) = file_trust {
            if !allow_insecure {
                return Err(untrusted(e));
            }
            insecure.push(e);
        }
        let hash = hex(&Sha256::digest(&bytes));
        let state = self.files.entry(path.to_owned()).or_default();
        state.seen = Some((stamp, hash.clone()));
        pin_check(&hash)?;
        if let Some(lib) = &current
            && lib.hash == hash
        {
            // touch, or an identical rebuild: nothing to do.
            return Ok(lib.clone());
        }
        if let Some((q, why)) = &state.quarantined {
            if *q == hash {
                return Err(FileProblem::Quarantined {
                    path: path.to_owned(),
                    hash,
                    why,
                });
            }
            // New bytes: the quarantine was about the old ones.
            state.quarantined = None;
        }
        if state.failed.as_ref() == Some(&hash) {
            return Err(FileProblem::StillBroken {
                path: path.to_owned(),
            });
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
        let state = self.files.entry(path.to_owned()).or_default();
        match loaded {
            Ok(lib) => {
                state.failed = None;
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
                if let Some(w) = lib.name_mismatch() {
                    tracing::warn!("{w}");
                }
                let lib = Arc::new(lib);
                state.lib = Some(lib.clone());
                Ok(lib)
            }
            Err(e) => {
                // A load that ran out of descriptors or memory is retried
                // (reload.rs): it must not count as "these bytes are broken".
                if !e.is_transient() {
                    state.failed = Some(hash);
                }
                Err(FileProblem::Load { error: e })
            }
        }
    }

    /// Step 2b: decide each route's versions, initialising new instances
    /// off to the side and offering them to the route's rollout.
    async fn plan(
        &mut self,
        s: &Settings,
        mode: Mode,
        scanned: &Scanned,
        by_name: &BTreeMap<String, Arc<Library>>,
        report: &mut Report,
        drain_now: &mut HashSet<u64>,
    ) {
        // The scanned routes, then the config's, which override a scanned
        // route with the same path.
        let mut wants: BTreeMap<String, Want> = BTreeMap::new();
        for name in scanned.scan.found.keys().chain(scanned.conflicted.iter()) {
            wants.insert(
                format!("/{name}"),
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

        // Built off to the side and stored at the end: a panic midway (the
        // reload task survives it, reload.rs) leaves the state as it was,
        // matching the route table still published.
        let mut routes = BTreeMap::new();
        let now = Instant::now();
        for (path, want) in &wants {
            let path: Arc<str> = path.as_str().into();
            let old = self.routes.get(&path).cloned();
            if scanned.conflicted.contains(want.handler) {
                // Keep what served it before, untouched.
                if let Some(st) = old {
                    routes.insert(path, st);
                }
                continue;
            }
            let Some(lib) = by_name.get(want.handler) else {
                if old.is_some() {
                    report.changed += 1;
                    tracing::info!(route = %path, "route removed: new handshakes get 404");
                }
                continue;
            };
            let config_text = want.spec.map_or("", |r| r.config_text.as_str());
            let policy = want
                .spec
                .map_or_else(|| s.rollout.clone(), |r| r.rollout.clone());
            let (origins, limits) = match want.spec {
                Some(r) => (r.allowed_origins.clone(), r.limits.clone()),
                None => (None, s.limits.clone()),
            };
            let same =
                |i: &Instance| i.lib.generation == lib.generation && i.config_text == config_text;
            let mut st = match old {
                None => match self.init(lib.clone(), path.clone(), config_text).await {
                    Ok(i) => {
                        report.changed += 1;
                        tracing::info!(route = %path, "serving {}", i.describe());
                        RouteState {
                            handler: String::new(),
                            file: None,
                            aliases: Vec::new(),
                            origins: None,
                            limits: limits.clone(),
                            config_text: String::new(),
                            policy: policy.clone(),
                            rollout: Rollout::new(i),
                            last_good: None,
                            rejected: None,
                            warn_at: None,
                            picked: Arc::default(),
                        }
                    }
                    Err(error) => {
                        report.problems.push(Problem::Init {
                            error,
                            outcome: format!("{path} is not served"),
                        });
                        continue;
                    }
                },
                Some(mut st) => {
                    if mode == Mode::Config
                        && let Some(step) = st.rollout.reconfigure(&policy)
                    {
                        report.changed += 1;
                        settle(&path, &mut st, step, &mut self.files, drain_now);
                    }
                    if same(st.rollout.newest()) {
                        // Unchanged: keep every instance as it is.
                    } else if st.rollout.canary.is_some() && same(&st.rollout.stable) {
                        report.changed += 1;
                        let step = st.rollout.roll_back(
                            "the handler file is back to the serving version".into(),
                            false,
                        );
                        settle(&path, &mut st, step, &mut self.files, drain_now);
                    } else if st
                        .rejected
                        .as_ref()
                        .is_some_and(|(g, c)| *g == lib.generation && c == config_text)
                    {
                        // Rolled back or quarantined: reported when it happened.
                    } else {
                        match self.init(lib.clone(), path.clone(), config_text).await {
                            Ok(new) => {
                                report.changed += 1;
                                self.offer(&path, &mut st, new, &policy, now.into_std());
                            }
                            Err(error) => {
                                let outcome = format!(
                                    "{} keeps serving {path}",
                                    st.rollout.newest().describe()
                                );
                                report.problems.push(Problem::Init { error, outcome });
                            }
                        }
                    }
                    st
                }
            };
            st.handler = want.handler.to_owned();
            st.file = Some(lib.source.clone());
            st.aliases = want.aliases.to_vec();
            st.origins = origins;
            st.limits = limits;
            st.config_text = config_text.to_owned();
            st.policy = policy;
            routes.insert(path, st);
        }
        for path in self.routes.keys().filter(|p| !wants.contains_key(&***p)) {
            report.changed += 1;
            tracing::info!(route = %path, "route removed: new handshakes get 404");
        }
        self.routes = routes;
    }

    /// Hands a new instance to a route's rollout and logs what it did.
    fn offer(
        &self,
        path: &str,
        st: &mut RouteState,
        new: Arc<Instance>,
        policy: &Policy,
        now: std::time::Instant,
    ) {
        let desc = new.describe();
        match st.rollout.offer(new.clone(), policy, now) {
            Offer::Switched { old, .. } => {
                tracing::info!(
                    route = %path,
                    "swapped: new connections get {desc}, {} open connections stay on {}",
                    old.live.load(Ordering::Relaxed),
                    old.describe()
                );
                if old.lib.hash != new.lib.hash {
                    st.last_good = Some(old.lib.clone());
                }
                st.warn_at = None;
            }
            Offer::Canary { replaced_canary } => {
                st.picked = Arc::default();
                tracing::info!(
                    route = %path,
                    "canary started: {desc} gets {}% of new connections for {:?}, {} keeps the rest{}",
                    policy.canary_percent,
                    policy.canary_period,
                    st.rollout.stable.describe(),
                    replaced_canary.map_or(String::new(), |c| format!(
                        "; it replaces the canary {}",
                        c.describe()
                    ))
                );
            }
            Offer::Refused => tracing::warn!(
                route = %path,
                "not rolling out {desc}: canary_percent = 0; {} keeps serving (set canary_percent \
                 above 0 and send SIGHUP to roll it out)",
                st.rollout.stable.describe()
            ),
        }
    }

    /// Moves rollouts along between reconciles: promotes canaries whose
    /// period passed, rolls back canaries over a threshold, quarantines
    /// versions that fault too often. Call it when [`Registry::alarm`] is
    /// notified or [`Registry::next_deadline`] passes. Returns how many
    /// routes changed.
    pub async fn tick(&mut self, s: &Settings) -> usize {
        let now = Instant::now();
        let before = self.instances();
        let mut drain_now = HashSet::new();
        let mut changed = 0;
        let paths: Vec<Arc<str>> = self.routes.keys().cloned().collect();
        for path in paths {
            // A copy, stored back at the end (see `plan` on panics).
            let Some(mut st) = self.routes.get(&path).cloned() else {
                continue;
            };
            let window = st.policy.quarantine_window;
            if let Some(c) = &st.rollout.canary {
                let faults = c.version.health.faults_within(window, now.into_std());
                let step = if rollout::quarantine_due(faults, &st.policy) {
                    Some(st.rollout.roll_back(
                        format!(
                            "{faults} faults within {window:?}, more than quarantine_faults = {}",
                            st.policy.quarantine_faults
                        ),
                        true,
                    ))
                } else {
                    let counts = c.version.health.counts();
                    st.rollout.evaluate(counts, &st.policy, now.into_std())
                };
                if let Some(step) = step {
                    changed += 1;
                    settle(&path, &mut st, step, &mut self.files, &mut drain_now);
                }
            }
            if self.quarantine(&path, &mut st, now, &mut drain_now).await {
                changed += 1;
            }
            self.routes.insert(path, st);
        }
        if changed > 0 {
            self.publish();
            self.retire(before, &s.reload, &drain_now);
        }
        if changed > 0 || self.status_at.is_some_and(|at| now >= at) {
            self.write_status();
        }
        changed
    }

    /// Quarantines the stable version of a route if it faulted too often,
    /// falling back to the last good version. Returns whether the route's
    /// instances changed.
    async fn quarantine(
        &mut self,
        path: &Arc<str>,
        st: &mut RouteState,
        now: Instant,
        drain_now: &mut HashSet<u64>,
    ) -> bool {
        let stable = st.rollout.stable.clone();
        if let Some(at) = st.warn_at {
            if now >= at {
                tracing::warn!(
                    route = %path,
                    "{path} is still served by the quarantined {} (no earlier good version is \
                     loaded); install a fixed build",
                    stable.describe()
                );
                st.warn_at = Some(now + QUARANTINE_WARN_EVERY);
            }
            return false;
        }
        let window = st.policy.quarantine_window;
        let faults = stable.health.faults_within(window, now.into_std());
        if !rollout::quarantine_due(faults, &st.policy) {
            return false;
        }
        let why = format!(
            "{faults} faults (panics or failed callbacks) within {window:?}, more than \
             quarantine_faults = {}",
            st.policy.quarantine_faults
        );
        self.files
            .entry(stable.lib.source.clone())
            .or_default()
            .quarantined = Some((stable.lib.hash.clone(), "quarantined"));
        st.rejected = Some((stable.lib.generation, stable.config_text.clone()));
        let fallback = st.last_good.clone().filter(|l| l.hash != stable.lib.hash);
        let mut failed = None;
        if let Some(lib) = fallback {
            match self.init(lib, path.clone(), &stable.config_text).await {
                Ok(good) => {
                    tracing::warn!(
                        route = %path,
                        "quarantined {}: {why}; new connections go to the last good version {}, \
                         its {} open connections drain now",
                        stable.describe(),
                        good.describe(),
                        stable.live.load(Ordering::Relaxed)
                    );
                    st.rollout.stable = good;
                    st.last_good = None;
                    drain_now.insert(stable.id);
                    return true;
                }
                Err(e) => failed = Some(e),
            }
        }
        tracing::warn!(
            route = %path,
            "quarantined {}: {why}; {}, so it keeps serving (warning every {:?} until a fixed build \
             is installed)",
            stable.describe(),
            match failed {
                Some(e) => format!("the last good version could not start again ({e})"),
                None => "no earlier good version of this route is loaded".into(),
            },
            QUARANTINE_WARN_EVERY
        );
        st.warn_at = Some(now + QUARANTINE_WARN_EVERY);
        false
    }

    /// Step 3: builds the route table from the route states and publishes
    /// it with one atomic swap.
    fn publish(&self) {
        let mut table = RouteTable::default();
        for (path, st) in &self.routes {
            let mut route = Route::new(
                path.clone(),
                st.rollout.stable.clone(),
                st.origins.clone(),
                st.limits.clone(),
            );
            if let Some(c) = &st.rollout.canary {
                route = route.with_canary(c.version.clone(), c.percent, st.picked.clone());
            }
            let route = Arc::new(route);
            for alias in &st.aliases {
                table.routes.insert(alias.as_str().into(), route.clone());
            }
            table.routes.insert(path.clone(), route);
        }
        drop(self.table.swap(Arc::new(table)));
    }

    /// Every instance the route states hold, by id.
    fn instances(&self) -> HashMap<u64, Arc<Instance>> {
        self.routes
            .values()
            .flat_map(|st| {
                std::iter::once(st.rollout.stable.clone())
                    .chain(st.rollout.canary.as_ref().map(|c| c.version.clone()))
            })
            .map(|i| (i.id, i))
            .collect()
    }

    /// Step 4: retires what `before` held and the route states no longer
    /// do; the ids in `drain_now` (rolled back, quarantined) drain at once.
    fn retire(
        &mut self,
        before: HashMap<u64, Arc<Instance>>,
        reload: &ReloadSettings,
        drain_now: &HashSet<u64>,
    ) {
        let after = self.instances();
        self.draining.retain(|w| w.strong_count() > 0);
        for (id, old) in before {
            if after.contains_key(&id) {
                continue;
            }
            let timeout = if drain_now.contains(&id) {
                Some(Duration::ZERO)
            } else {
                reload.drain_timeout
            };
            self.hand_over(&old, reload.handover_max_bytes);
            retire(&old, timeout, reload.drain_window, &self.conns);
            self.draining.push(Arc::downgrade(&old));
        }
    }

    /// Connection handover (ABI 1.2): when `old` and the version now
    /// serving its route both support it, tells each of `old`'s connections
    /// to move there at its next message boundary. Those that cannot move
    /// stay and drain through [`retire`] as usual.
    fn hand_over(&self, old: &Arc<Instance>, max_bytes: usize) {
        let table = self.table.load();
        let Some(route) = table.get(&old.route) else {
            return;
        };
        let new = &route.instance;
        if new.id == old.id || !rollout::can_hand_over(old, new) {
            return;
        }
        old.set_handover(crate::instance::Handover {
            route: route.clone(),
            max_bytes,
        });
        tracing::info!(
            route = %old.route,
            "handing over the {} open connections of {} to {} (connection handover)",
            old.live.load(Ordering::Relaxed),
            old.describe(),
            new.describe()
        );
        // After set_handover: a session opening on `old` from now on sees
        // the successor itself (session.rs); one already registered is in
        // `conns` and gets the event.
        self.conns
            .for_each(|c| c.owner() == old.id, |c| c.signal(ConnShared::HANDOVER));
    }

    async fn init(
        &self,
        lib: Arc<Library>,
        route: Arc<str>,
        config: &str,
    ) -> Result<Arc<Instance>, InitError> {
        let conns = self.conns.clone();
        let config = config.to_owned();
        let handler = lib.desc.name.clone();
        let task = tokio::task::spawn_blocking(move || Instance::init(lib, route, config, conns));
        let result = match tokio::time::timeout(self.init_timeout, task).await {
            Ok(Ok(Ok(i))) => {
                i.health.set_alarm(self.alarm.clone());
                Ok(i.into_arc())
            }
            Ok(Ok(Err(e))) => Err(e),
            Ok(Err(join)) => Err(InitError::Crashed {
                handler,
                message: join.to_string(),
            }),
            Err(_) => Err(InitError::Timeout {
                handler,
                secs: self.init_timeout.as_secs(),
            }),
        };
        if result.is_err() {
            crate::metrics::handler_load_error();
        }
        result
    }

    /// Retires every instance (shutdown): drops the registry's references so
    /// each `destroy` runs when its last connection is gone.
    pub fn clear(&mut self) {
        self.table.store(Arc::new(RouteTable::default()));
        self.routes.clear();
        self.files.clear();
    }
}

/// Applies a rollout [`Step`]: one log line, the rolled-back version
/// remembered as rejected, its connections handed over or drained at once.
fn settle(
    path: &str,
    st: &mut RouteState,
    step: Step<Arc<Instance>>,
    files: &mut HashMap<PathBuf, FileState>,
    drain_now: &mut HashSet<u64>,
) {
    match step {
        Step::Promoted { old, why } => {
            let new = &st.rollout.stable;
            tracing::info!(
                route = %path,
                "promoted {}: {why}; it gets every new connection, {} open connections stay on {}",
                new.describe(),
                old.live.load(Ordering::Relaxed),
                old.describe()
            );
            if old.lib.hash != new.lib.hash {
                st.last_good = Some(old.lib.clone());
            }
            st.warn_at = None;
        }
        Step::RolledBack {
            canary,
            why,
            automatic,
        } => {
            let stable = &st.rollout.stable;
            let moved = rollout::handover_back(&canary, stable);
            tracing::warn!(
                route = %path,
                "rolled back {}: {why}; new connections go to {}, {} canary connections \
                 drain {} ({moved} handed over)",
                canary.describe(),
                stable.describe(),
                canary.live.load(Ordering::Relaxed).saturating_sub(moved),
                if automatic { "now" } else { "after drain_timeout" }
            );
            if automatic {
                if canary.lib.hash != stable.lib.hash {
                    files
                        .entry(canary.lib.source.clone())
                        .or_default()
                        .quarantined = Some((canary.lib.hash.clone(), "rolled back"));
                }
                st.rejected = Some((canary.lib.generation, canary.config_text.clone()));
                // Known bad: its connections do not wait for drain_timeout.
                drain_now.insert(canary.id);
            }
        }
    }
}

/// Schedules the drain of an instance that no longer takes new connections.
fn retire(
    inst: &Arc<Instance>,
    timeout: Option<Duration>,
    window: Duration,
    conns: &Arc<Connections>,
) {
    let live = inst.live.load(Ordering::Relaxed);
    inst.set_drain_window(window);
    match timeout {
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
                "retired {}: {live} open connections get Close 1012 after {t:?}, spread over {window:?}",
                inst.describe(),
            );
            // Weak: the instance must be destroyed as soon as its last
            // connection is gone (closed, or handed over to another
            // version), not when this timer ends.
            let weak = Arc::downgrade(inst);
            let conns = conns.clone();
            tokio::spawn(async move {
                tokio::time::sleep(t).await;
                let Some(inst) = weak.upgrade() else {
                    return;
                };
                conns.cancel_and_signal(&inst.drain, ConnShared::RETIRED, |c| c.owner() == inst.id);
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
