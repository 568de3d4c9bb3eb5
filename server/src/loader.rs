//! The loader: turns the bytes of a handler file into a [`Library`] whose
//! descriptor has been validated against ABI v1.
//!
//! This is the only module that calls `dlopen`. The rules it follows come from
//! measurements on this kind of machine (see `notes/abi-and-reload.md`):
//!
//! * It never opens the watched file. The bytes are copied to a private,
//!   never-reused path first: overwriting a mapped `.so` crashes the process
//!   with SIGBUS, and `dlopen` of a path glibc has seen before returns the old,
//!   stale object.
//! * The copy is checked to be a complete ELF file ([`crate::elf`]), because
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
#![allow(unsafe_code)]

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use wshd_handler_api::abi::*;

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
    /// The private copy that was actually opened.
    pub copy: PathBuf,
    /// sha256 of the file's bytes, hex.
    pub hash: String,
    /// What the descriptor said, copied out of the library.
    pub desc: Descriptor,
    /// Keeps the handle; with RTLD_NODELETE dropping it never unmaps.
    _lib: libloading::os::unix::Library,
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
}

/// Loads handler files into a private directory of copies.
#[derive(Debug)]
pub struct Loader {
    state_dir: PathBuf,
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
    /// A loader whose copies live in `state_dir` (created if missing).
    pub fn new(state_dir: PathBuf) -> std::io::Result<Loader> {
        std::fs::create_dir_all(&state_dir)?;
        Ok(Loader {
            state_dir,
            next_generation: AtomicU64::new(1),
            mapped: AtomicU64::new(0),
        })
    }

    /// The directory of private copies.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
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
        let copy = self
            .state_dir
            .join(format!("{stem}-{generation}-{}.so", &hash[..16]));
        write_copy(&copy, bytes).map_err(|e| LoadError::Io {
            path: copy.clone(),
            source: e,
        })?;

        let lib = {
            let _guard = DLOPEN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
            // SAFETY: opening a library runs its initialisers. The file is our
            // private copy, which nothing else writes, and it passed the ELF
            // bounds check, so the loader cannot fault on a truncated mapping.
            // Running handler code is the purpose of this server: handlers are
            // trusted code, as modules are in nginx or Envoy.
            unsafe {
                libloading::os::unix::Library::open(
                    Some(&copy),
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
        Ok(Library {
            generation,
            source: source.to_owned(),
            copy,
            hash: hash.to_owned(),
            desc,
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
    if d.flags & WSHD_F_RUST_SDK != 0 && d.flags & WSHD_F_PANIC_UNWIND == 0 {
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
        if s.len > 4096 {
            return Err(abi(
                field,
                format!("{} bytes", s.len),
                "at most 4096 bytes".into(),
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
        },
    })
}
