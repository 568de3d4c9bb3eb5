//! The loader: turns the bytes of a handler file into a [`Library`] whose
//! descriptor has been validated against ABI v1.
//!
//! This is the only module that calls `dlopen`. The rules it follows come from
//! measurements on this kind of machine (see `notes/abi-and-reload.md`):
//!
//! * It never opens the watched file. The verified bytes (the ones that were
//!   hashed, read from the descriptor the trust check looked at) are put in
//!   an anonymous **sealed memory file** (`memfd_create`, then
//!   `F_SEAL_WRITE | F_SEAL_GROW | F_SEAL_SHRINK | F_SEAL_SEAL`), and
//!   `dlopen` opens `/proc/self/fd/N`. No path anyone else can reach ever
//!   holds the code, the bytes cannot change once sealed (overwriting a
//!   mapped `.so` would crash with SIGBUS), and nothing is left on disk after
//!   a crash or SIGKILL. Each memfd is a new inode, so glibc never hands back
//!   a stale object for a new version.
//! * The memfd is **never closed**. glibc finds an already-loaded object by
//!   the name it was opened under before it looks at the inode, and the
//!   library is never unloaded (below): if fd N were closed and reused for a
//!   later version, `dlopen("/proc/self/fd/N")` would return the old,
//!   stale object. Keeping it costs one descriptor per version ever loaded,
//!   which lives exactly as long as the mapping does anyway and is bounded by
//!   the pthread-key budget below (about 1000 versions). The memory is the
//!   same either way: a mapped memfd keeps all its pages until exit.
//! * Only where memfds are refused (no `memfd_create`, `vm.memfd_noexec`, an
//!   LSM forbidding executable mappings of them; probed once at startup) does
//!   it fall back to a private directory: a fresh random name under
//!   `state_dir` (default: the temp dir) created with `mkdir` (which fails on
//!   any existing name, so a directory someone prepared is never used), mode
//!   0700, owner checked after creation, removed when the loader is dropped.
//!   Each copy gets a never-reused name there. The log says which mode is in
//!   use.
//! * The bytes are checked to be a complete ELF file ([`crate::elf`]), because
//!   `dlopen` of a truncated file dies with SIGBUS instead of failing.
//! * It opens with `RTLD_NOW | RTLD_LOCAL | RTLD_NODELETE`: missing symbols
//!   fail the load rather than a later call, two versions of one handler do
//!   not interpose, and the library is never unmapped. Unmapping a Rust
//!   cdylib either does nothing or crashes later on an unrelated thread exit,
//!   so "unloading" a version means calling its `destroy` and revoking its
//!   host context; the mapping stays until the process exits.
//! * It refuses a load that could abort the process later. Each version's
//!   copy of Rust's std takes a pthread key the first time it meets a thread
//!   and never gives it back, and glibc has 1024; when they run out, std
//!   aborts the whole server ("out of TLS keys", after about 1000 reloads).
//!   So a load needs [`KEY_RESERVE`] keys still free, and fewer than
//!   [`KEY_WARNING`] left after a load is logged as a warning to restart.
//! * While `dlopen` runs the library's constructors, and while its callbacks
//!   run, the thread is marked with a preformatted [`crash::Label`], so an
//!   `exit()` or a fatal signal from handler code names the handler
//!   ([`crate::crash`]).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wshd_handler_api::abi::*;
use wshd_handler_api::rules;

use crate::crash::{self, Label};
use crate::elf;
use crate::error::LoadError;

/// One loaded version of a handler file.
#[derive(Debug)]
pub struct Library {
    /// Unique per load in this process; shown in logs as the version's
    /// generation.
    pub generation: u64,
    /// The watched file this version came from.
    pub source: PathBuf,
    /// The path `dlopen` was given: `/proc/self/fd/N` of the sealed memfd,
    /// or the private copy in fallback mode.
    pub opened: PathBuf,
    /// sha256 of the file's bytes, hex.
    pub hash: String,
    /// What the descriptor said, copied out of the library.
    pub desc: Descriptor,
    /// One preformatted crash label per callback ([`Callback`]).
    labels: [Label; 8],
    /// Keeps the handle; with RTLD_NODELETE dropping it never unmaps.
    _lib: libloading::os::unix::Library,
}

/// The handler callbacks, for crash labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Callback {
    Init,
    OnHandshake,
    OnOpen,
    OnMessage,
    OnClose,
    Destroy,
    OnExport,
    OnImport,
}

impl Callback {
    const ALL: [Callback; 8] = [
        Callback::Init,
        Callback::OnHandshake,
        Callback::OnOpen,
        Callback::OnMessage,
        Callback::OnClose,
        Callback::Destroy,
        Callback::OnExport,
        Callback::OnImport,
    ];

    fn name(self) -> &'static str {
        match self {
            Callback::Init => "init",
            Callback::OnHandshake => "on_handshake",
            Callback::OnOpen => "on_open",
            Callback::OnMessage => "on_message",
            Callback::OnClose => "on_close",
            Callback::Destroy => "destroy",
            Callback::OnExport => "on_export",
            Callback::OnImport => "on_import",
        }
    }
}

/// The validated contents of a handler's descriptor.
#[derive(Debug, Clone)]
pub struct Descriptor {
    /// The handler's name, version and build info (copied).
    pub name: String,
    pub version: String,
    pub build_info: String,
    /// `WSHD_F_*` flags.
    pub flags: u32,
    /// The ABI version the handler was built against.
    pub abi_major: u16,
    pub abi_minor: u16,
    /// The handler's callbacks.
    pub callbacks: Callbacks,
}

/// Callback pointers from a validated descriptor. `init` and `on_message`
/// are required; the rest may be absent.
#[derive(Debug, Clone, Copy)]
pub struct Callbacks {
    pub init: wshd_init_fn,
    pub on_handshake: Option<wshd_on_handshake_fn>,
    pub on_open: Option<wshd_on_open_fn>,
    pub on_message: wshd_on_message_fn,
    pub on_close: Option<wshd_on_close_fn>,
    pub destroy: Option<wshd_destroy_fn>,
    /// ABI 1.2; `None` for older descriptors.
    pub on_timer: Option<wshd_on_timer_fn>,
    /// ABI 1.2 connection handover; both set, or both `None` (a descriptor
    /// with only one of them cannot hand over and is treated as having
    /// neither).
    pub on_export: Option<wshd_on_export_fn>,
    pub on_import: Option<wshd_on_import_fn>,
}

impl Library {
    /// Whether callbacks must run off the async workers.
    pub fn may_block(&self) -> bool {
        self.desc.flags & WSHD_F_MAY_BLOCK != 0
    }

    /// First 12 hex digits of the hash, for log lines.
    pub fn short_hash(&self) -> &str {
        &self.hash[..12]
    }

    /// A warning when the descriptor's name is not the one the file name
    /// gives (`echo_wsh.so` and `libecho_wsh.so` are `echo`): the route
    /// comes from the file name, while logs (`handler=`) and `--list` show
    /// the descriptor's name, so the two would silently disagree. A
    /// descriptor may also name the whole path (`chat/room` for
    /// `chat/room_wsh.so`).
    pub fn name_mismatch(&self) -> Option<String> {
        let file = self.source.file_name()?.to_str()?;
        let stem = crate::scan::handler_stem(file)?;
        let name = self.desc.name.as_str();
        if name == stem || name.ends_with(&format!("/{stem}")) {
            return None;
        }
        let n = crate::logsafe::esc(name);
        Some(format!(
            "handler file {} is named `{stem}` by its file name, but its descriptor says `{n}`: \
             it is served under the file name (route /{stem} when it sits at the top of the \
             handler directory), while logs (handler=) and --list show `{n}`; rename the file to \
             {n}_wsh.so (or lib{n}_wsh.so), or set the descriptor's name to `{stem}`",
            self.source.display(),
        ))
    }

    /// Marks this thread as running `cb` of this library until the guard
    /// drops, so a crash or `exit()` in it names the handler.
    pub fn enter(&self, cb: Callback) -> crash::Guard {
        crash::enter(&self.labels[cb as usize])
    }
}

/// Where verified bytes are put for `dlopen`.
#[derive(Debug)]
enum Storage {
    /// Sealed anonymous memory files.
    Memfd,
    /// The fallback: a private directory of copies, and why memfd was not
    /// used.
    Dir(PrivateDir, String),
}

/// The fallback's private directory: created fresh, removed on drop.
#[derive(Debug)]
pub struct PrivateDir {
    path: PathBuf,
}

impl PrivateDir {
    /// Creates `PARENT/wshd-<random>` with mode 0700. `mkdir` fails if the
    /// name exists (a directory, a file or a symlink), so nothing prepared by
    /// someone else is ever used; a collision just draws another name. The
    /// owner and mode are checked after creation, and the parent must pass
    /// the same trust check as the handler directory.
    pub fn create(parent: &Path) -> std::io::Result<PrivateDir> {
        use std::os::unix::fs::{DirBuilderExt, MetadataExt};
        if !parent.is_dir() {
            return Err(std::io::Error::other(format!(
                "state_dir {} is not a directory; create it (owned by wshd's user, mode 0755 or \
                 stricter) or point state_dir elsewhere",
                parent.display()
            )));
        }
        let mut dirs = crate::trust::DirCache::default();
        dirs.check_dirs_of(&parent.join("x")).map_err(|e| {
            std::io::Error::other(format!(
                "cannot keep handler copies under {}: {e}",
                parent.display()
            ))
        })?;
        for _ in 0..16 {
            let path = parent.join(format!("wshd-{:016x}", random_u64()?));
            match std::fs::DirBuilder::new().mode(0o700).create(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
            let dir = PrivateDir { path };
            let m = std::fs::symlink_metadata(&dir.path)?;
            if !m.is_dir() || m.uid() != crate::trust::euid() || m.mode() & 0o077 != 0 {
                return Err(std::io::Error::other(format!(
                    "{} is not a private directory right after creating it (owner uid {}, mode {:o}); \
                     something else is writing {}: choose another state_dir",
                    dir.path.display(),
                    m.uid(),
                    m.mode() & 0o7777,
                    parent.display()
                )));
            }
            return Ok(dir);
        }
        Err(std::io::Error::other(format!(
            "16 random names in {} were all taken; something is filling it",
            parent.display()
        )))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for PrivateDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

fn random_u64() -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    // SAFETY: the buffer is valid for 8 bytes; flags 0 = urandom source,
    // which never blocks after boot.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != 8 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(b))
}

/// Whether this process may `dlopen` from a memfd: one is created and a
/// page of it mapped executable, which is what `dlopen` does. `Err` says
/// why not.
fn probe_memfd() -> Result<(), String> {
    let fd = create_memfd("wshd-probe").map_err(|e| format!("memfd_create failed: {e}"))?;
    // SAFETY: `fd` is a valid descriptor we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), 4096) } != 0 {
        return Err(format!(
            "cannot size a memfd: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: a fresh private mapping of a 4096-byte file we own; unmapped
    // below and never touched.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE,
            fd.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "executable mappings of memfds are refused ({}; vm.memfd_noexec or a security module)",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: `p` is the 4096-byte mapping made above.
    unsafe { libc::munmap(p, 4096) };
    let proc_path = format!("/proc/self/fd/{}", fd.as_raw_fd());
    std::fs::metadata(&proc_path)
        .map_err(|e| format!("{proc_path} is not reachable (is /proc mounted?): {e}"))?;
    Ok(())
}

/// `memfd_create(name, MFD_CLOEXEC | MFD_ALLOW_SEALING | MFD_EXEC)`.
/// `MFD_EXEC` (Linux 6.3+) asks for an executable memfd explicitly, which
/// `vm.memfd_noexec = 1` needs; older kernels reject the flag with EINVAL
/// and are asked again without it.
fn create_memfd(name: &str) -> std::io::Result<OwnedFd> {
    let cname = std::ffi::CString::new(name.replace('\0', "_")).expect("no NUL");
    let base = libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING;
    for flags in [base | libc::MFD_EXEC, base] {
        // SAFETY: `cname` is a valid NUL-terminated string.
        let fd = unsafe { libc::memfd_create(cname.as_ptr(), flags) };
        if fd >= 0 {
            // SAFETY: memfd_create returned a new descriptor we own.
            return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
        }
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINVAL) {
            return Err(e);
        }
    }
    Err(std::io::Error::last_os_error())
}

/// Writes `bytes` into a new memfd and seals it against any change.
fn sealed_memfd(name: &str, bytes: &[u8]) -> std::io::Result<OwnedFd> {
    use std::io::Write;
    let fd = create_memfd(name)?;
    let mut f = std::fs::File::from(fd);
    f.write_all(bytes)?;
    let seals = libc::F_SEAL_WRITE | libc::F_SEAL_GROW | libc::F_SEAL_SHRINK | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on a descriptor we own, with an integer argument.
    if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(OwnedFd::from(f))
}

/// Loads handler files from sealed memfds (or, where those are refused, a
/// private directory of copies).
#[derive(Debug)]
pub struct Loader {
    storage: Storage,
    next_generation: AtomicU64,
    /// Libraries opened since start; all stay mapped until exit.
    mapped: AtomicU64,
}

/// Free pthread keys a load needs: a version may take several (its std, and
/// any thread-local storage of its own), and the ones it takes come lazily,
/// when its code first runs on each thread.
pub const KEY_RESERVE: usize = 32;

/// Below this many free keys after a load, every reload logs a warning.
pub const KEY_WARNING: usize = 128;

/// `dlerror` is not thread-safe on every libc, and loads are rare: serialise.
static DLOPEN_LOCK: Mutex<()> = Mutex::new(());

impl Loader {
    /// A loader using memfds if this process may, else a fresh private
    /// directory under `fallback_parent` (default: the temp dir). The
    /// environment variable `WSHD_LOADER=dir` forces the fallback (for tests
    /// and for diagnosing a host).
    pub fn new(fallback_parent: Option<&Path>) -> std::io::Result<Loader> {
        let why = match std::env::var("WSHD_LOADER").as_deref() {
            Ok("dir") => Err("WSHD_LOADER=dir is set".to_string()),
            _ => probe_memfd(),
        };
        let storage = match why {
            Ok(()) => Storage::Memfd,
            Err(why) => {
                let parent = fallback_parent
                    .map(Path::to_owned)
                    .unwrap_or_else(std::env::temp_dir);
                Storage::Dir(PrivateDir::create(&parent)?, why)
            }
        };
        Ok(Loader {
            storage,
            next_generation: AtomicU64::new(1),
            mapped: AtomicU64::new(0),
        })
    }

    /// The fallback directory, if memfds are not used.
    pub fn private_dir(&self) -> Option<&Path> {
        match &self.storage {
            Storage::Memfd => None,
            Storage::Dir(d, _) => Some(d.path()),
        }
    }

    /// One line for the startup log: how handler code is loaded.
    pub fn describe(&self) -> String {
        match &self.storage {
            Storage::Memfd => "handler libraries load from sealed memory files (memfd); nothing is written to disk".into(),
            Storage::Dir(d, why) => format!(
                "handler libraries load from private copies in {} (mode 0700, removed at exit): memfd loading is not available: {why}",
                d.path().display()
            ),
        }
    }

    /// Validates and loads `bytes`, read from `source` and hashing to `hash`.
    /// Blocking: call it off the async workers.
    pub fn load(&self, source: &Path, bytes: &[u8], hash: &str) -> Result<Library, LoadError> {
        elf::check(bytes).map_err(|reason| LoadError::NotElf {
            path: source.to_owned(),
            reason,
        })?;
        if let Some(keys) = PthreadKeys::now()
            && keys.free < KEY_RESERVE
        {
            return Err(LoadError::OutOfKeys {
                path: source.to_owned(),
                free: keys.free,
                max: keys.max,
            });
        }
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let stem = source
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("handler");
        let opened = match &self.storage {
            Storage::Memfd => {
                let name = format!("{stem}-{generation}");
                let fd = sealed_memfd(&name, bytes).map_err(|e| LoadError::Io {
                    path: PathBuf::from(format!("memfd:{name}")),
                    source: e,
                })?;
                // Never closed: see the module doc (fd reuse would make
                // glibc return a stale object for a later version).
                let fd = fd.into_raw_fd();
                PathBuf::from(format!("/proc/self/fd/{fd}"))
            }
            Storage::Dir(dir, _) => {
                let copy = dir
                    .path()
                    .join(format!("{stem}-{generation}-{}.so", &hash[..16]));
                write_copy(&copy, bytes).map_err(|e| LoadError::Io {
                    path: copy.clone(),
                    source: e,
                })?;
                copy
            }
        };

        let loading = Label::new(&format!(
            "handler file {} (sha256 {}, generation {generation}) while dlopen ran its constructors; \
             its version is not known yet",
            source.display(),
            &hash[..12]
        ));
        let _running = crash::enter(&loading);
        let lib = {
            let _guard = DLOPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: opening a library runs its initialisers. The bytes are
            // a sealed memfd or our private copy, which nothing else can
            // write, and they passed the ELF bounds check, so the loader
            // cannot fault on a truncated mapping. Running handler code is
            // the purpose of this server: handlers are trusted code, as
            // modules are in nginx or Envoy, and the trust check (trust.rs)
            // keeps files others could write out.
            unsafe {
                libloading::os::unix::Library::open(
                    Some(&opened),
                    libc::RTLD_NOW | libc::RTLD_LOCAL | libc::RTLD_NODELETE,
                )
            }
            .map_err(|e| LoadError::Dlopen {
                path: source.to_owned(),
                message: e.to_string(),
            })?
        };

        let mapped = self.mapped.fetch_add(1, Ordering::Relaxed) + 1;
        if let Some(keys) = PthreadKeys::now()
            && keys.free < KEY_WARNING
        {
            tracing::warn!(
                "{} of {} pthread keys left after loading {} ({mapped} handler versions loaded \
                 since start, each kept until exit): restart wshd soon; loads stop at {KEY_RESERVE} left",
                keys.free,
                keys.max,
                source.display()
            );
        }

        let entry = find_entry(&lib, source)?;
        // SAFETY: `wshd_entry_v1` is declared by the ABI as a side-effect-free
        // function returning a pointer to static data.
        let desc_ptr = unsafe { entry() };
        let desc = read_descriptor(desc_ptr, source)?;
        drop(_running);
        let labels = Callback::ALL.map(|cb| {
            Label::new(&format!(
                "handler {} {} (file {}, generation {generation}, sha256 {}), callback {}",
                crate::logsafe::esc(&desc.name),
                crate::logsafe::esc(&desc.version),
                source.display(),
                &hash[..12],
                cb.name()
            ))
        });
        Ok(Library {
            generation,
            source: source.to_owned(),
            opened,
            hash: hash.to_owned(),
            desc,
            labels,
            _lib: lib,
        })
    }
}

/// How many pthread keys the process has left.
#[derive(Debug, Clone, Copy)]
pub struct PthreadKeys {
    pub free: usize,
    pub max: usize,
}

impl PthreadKeys {
    /// Measures without ever holding more than one key: glibc hands out the
    /// lowest free slot, and keys are rarely deleted (std never deletes its
    /// own), so a fresh key's number is the count in use. Counting by taking
    /// keys until none are left would make a handler's std abort if it
    /// needed one at that moment. `None` where the count cannot be read.
    pub fn now() -> Option<PthreadKeys> {
        // SAFETY: sysconf only reads a constant.
        let max = unsafe { libc::sysconf(libc::_SC_THREAD_KEYS_MAX) };
        let max = usize::try_from(max).ok().filter(|&m| m > 0)?;
        let mut key: libc::pthread_key_t = 0;
        // SAFETY: `key` is a valid out-pointer; no destructor is registered,
        // and the key is deleted at once, before anyone else can know it.
        let used = unsafe {
            if libc::pthread_key_create(&mut key, None) != 0 {
                return Some(PthreadKeys { free: 0, max });
            }
            libc::pthread_key_delete(key);
            key as usize
        };
        Some(PthreadKeys {
            free: max.saturating_sub(used),
            max,
        })
    }
}

/// Writes the private copy with `create_new`, so a copy is never overwritten
/// while mapped. No fsync: it would add tens of milliseconds to every reload,
/// and normal writeback turns the copy's pages into clean, reclaimable page
/// cache soon enough.
fn write_copy(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(bytes)
}

fn find_entry(
    lib: &libloading::os::unix::Library,
    source: &Path,
) -> Result<wshd_entry_fn, LoadError> {
    // SAFETY: the symbol is looked up with the type the ABI gives it.
    if let Ok(sym) = unsafe { lib.get::<wshd_entry_fn>(WSHD_ENTRY_SYMBOL) } {
        return Ok(*sym);
    }
    for major in 2..=9u32 {
        let name = format!("wshd_entry_v{major}\0");
        // SAFETY: only probing whether the symbol exists; it is not called.
        if unsafe { lib.get::<*const ()>(name.as_bytes()) }.is_ok() {
            return Err(LoadError::Abi {
                path: source.to_owned(),
                field: "entry symbol",
                found: format!("wshd_entry_v{major} (handler ABI {major})"),
                expected: format!("{WSHD_ENTRY_NAME} (handler ABI {WSHD_ABI_MAJOR})"),
                fix: "this handler was built for a newer wshd; upgrade wshd or rebuild the handler against ABI 1",
            });
        }
    }
    Err(LoadError::NoEntry {
        path: source.to_owned(),
        message: format!(
            "not a wshd handler: it does not export `{WSHD_ENTRY_NAME}`. Build it with the wshd-handler-api crate \
             (export_handler!) or implement `const wshd_descriptor *{WSHD_ENTRY_NAME}(void)` from wshd_handler.h"
        ),
    })
}

/// Validates the descriptor at `ptr` and copies it out.
fn read_descriptor(ptr: *const wshd_descriptor, source: &Path) -> Result<Descriptor, LoadError> {
    let abi = |field, found: String, expected: String, fix| LoadError::Abi {
        path: source.to_owned(),
        field,
        found,
        expected,
        fix,
    };
    if ptr.is_null() {
        return Err(abi(
            "descriptor",
            "NULL".into(),
            "a pointer to a static wshd_descriptor".into(),
            "wshd_entry_v1 must return the address of a static descriptor",
        ));
    }
    // Read the fixed 12-byte prefix first: until struct_size is checked we may
    // not read the whole struct.
    // SAFETY: every ABI version starts the descriptor with magic, abi_major,
    // abi_minor and struct_size; the pointer is non-null and points to static
    // data in the library, which stays mapped (RTLD_NODELETE).
    let (magic, major, minor, size) = unsafe {
        (
            std::ptr::addr_of!((*ptr).magic).read_unaligned(),
            std::ptr::addr_of!((*ptr).abi_major).read_unaligned(),
            std::ptr::addr_of!((*ptr).abi_minor).read_unaligned(),
            std::ptr::addr_of!((*ptr).struct_size).read_unaligned(),
        )
    };
    if magic != WSHD_MAGIC {
        return Err(abi(
            "magic",
            format!("{magic:#010x}"),
            format!("{WSHD_MAGIC:#010x} (\"WSHD\")"),
            "the descriptor is corrupt or not a wshd descriptor; rebuild the handler against \
             handler-api/include/wshd_handler.h or with the wshd-handler-api crate",
        ));
    }
    if major != WSHD_ABI_MAJOR {
        return Err(abi(
            "abi_major",
            major.to_string(),
            WSHD_ABI_MAJOR.to_string(),
            "rebuild the handler against this server's wshd_handler.h / wshd-handler-api (ABI 1)",
        ));
    }
    let min = WSHD_DESCRIPTOR_SIZE_1_0 as u32;
    if size < min {
        return Err(abi(
            "struct_size",
            size.to_string(),
            format!("at least {min} (sizeof(wshd_descriptor) in ABI 1.0)"),
            "set struct_size = sizeof(wshd_descriptor) and rebuild against the current wshd_handler.h",
        ));
    }
    // A descriptor of ABI 1.0/1.1 ends before `on_timer`: copy the part
    // struct_size covers into a zeroed descriptor, so a field the handler
    // does not have reads as NULL (None) instead of past its data.
    let mut copy = std::mem::MaybeUninit::<wshd_descriptor>::zeroed();
    let n = (size as usize).min(std::mem::size_of::<wshd_descriptor>());
    // SAFETY: the handler's descriptor is static data of at least `n` bytes
    // (struct_size, checked above to cover ABI 1.0), and `copy` has room for
    // `n`; all-zero bytes are a valid `wshd_descriptor` (NULL pointers, None
    // callbacks, zero numbers), and the copied prefix is the handler's own
    // valid fields.
    let d = &unsafe {
        std::ptr::copy_nonoverlapping(ptr.cast::<u8>(), copy.as_mut_ptr().cast::<u8>(), n);
        copy.assume_init()
    };
    let init = d.init.ok_or_else(|| {
        abi(
            "init",
            "NULL".into(),
            "a function pointer".into(),
            "init is required: set it in the descriptor",
        )
    })?;
    let on_message = d.on_message.ok_or_else(|| {
        abi(
            "on_message",
            "NULL".into(),
            "a function pointer".into(),
            "on_message is required: set it in the descriptor",
        )
    })?;
    if let Err(rules::FlagsError::RustSdkWithoutUnwind) = rules::check_flags(d.flags) {
        return Err(abi(
            "flags",
            format!("{:#x} (Rust SDK without PANIC_UNWIND)", d.flags),
            "WSHD_F_PANIC_UNWIND set".into(),
            "the handler was built with panic = \"abort\", so one panic would kill the whole server; \
             remove panic = \"abort\" from its Cargo profile and rebuild",
        ));
    }
    let text = |field, s: wshd_str| -> Result<String, LoadError> {
        if s.ptr.is_null() || s.len == 0 {
            return Ok(String::new());
        }
        if s.len > rules::MAX_DESCRIPTOR_STRING {
            return Err(abi(
                field,
                format!("{} bytes", s.len),
                format!("at most {} bytes", rules::MAX_DESCRIPTOR_STRING),
                "shorten the string",
            ));
        }
        // SAFETY: the descriptor's strings are static data of the stated
        // length (ABI ownership rule 6).
        let bytes = unsafe { std::slice::from_raw_parts(s.ptr, s.len) };
        String::from_utf8(bytes.to_vec()).map_err(|_| {
            abi(
                field,
                "invalid UTF-8".into(),
                "UTF-8 text".into(),
                "use UTF-8 strings in the descriptor",
            )
        })
    };
    let name = text("name", d.name)?;
    if name.is_empty() {
        return Err(abi(
            "name",
            "empty".into(),
            "the handler's name".into(),
            "set name in the descriptor, e.g. \"echo\"",
        ));
    }
    Ok(Descriptor {
        version: text("version", d.version)?,
        build_info: text("build_info", d.build_info)?,
        name,
        flags: d.flags,
        abi_major: major,
        abi_minor: minor,
        callbacks: Callbacks {
            init,
            on_handshake: d.on_handshake,
            on_open: d.on_open,
            on_message,
            on_close: d.on_close,
            destroy: d.destroy,
            on_timer: d.on_timer,
            on_export: d.on_export.and(d.on_import).and(d.on_export),
            on_import: d.on_export.and(d.on_import),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn private_dir_is_fresh_private_and_removed_on_drop() {
        let tmp = tempfile::tempdir().unwrap();
        let parent = tmp.path().join("state");
        std::fs::create_dir(&parent).unwrap();
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o755)).unwrap();
        let a = PrivateDir::create(&parent).unwrap();
        let b = PrivateDir::create(&parent).unwrap();
        assert_ne!(a.path(), b.path(), "names are drawn at random");
        let m = std::fs::symlink_metadata(a.path()).unwrap();
        assert!(m.is_dir());
        assert_eq!(m.mode() & 0o777, 0o700);
        let kept = a.path().to_owned();
        drop(a);
        assert!(!kept.exists());

        // A parent others may write (without the sticky bit) is refused.
        std::fs::set_permissions(&parent, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = PrivateDir::create(&parent).unwrap_err().to_string();
        assert!(e.contains("writable by group and others"), "{e}");
        assert!(PrivateDir::create(&tmp.path().join("missing")).is_err());
    }
}
