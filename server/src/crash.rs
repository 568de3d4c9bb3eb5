//! Handler code that ends the process must not look like a clean exit.
//!
//! Two ways handler code can end wshd, and what this module does about each:
//!
//! * **`exit()`** (from a constructor during `dlopen`, from a callback, or
//!   from a thread the handler started). glibc runs the `atexit` hooks, and
//!   the process would end with whatever status the handler chose, often 0,
//!   so `Restart=on-failure` would never restart it. [`install`] registers an
//!   `atexit` hook. wshd's own orderly exits call [`orderly_exit`] first
//!   (`main` does on every return path). An exit on the main thread outside
//!   any handler callback is also wshd's own (`main` returning after a
//!   panic, or the second-signal exit of the control runtime, which runs on
//!   the main thread): handler code on the main thread always runs inside a
//!   [`Guard`]. Any other exit writes one line naming what was running and
//!   ends the process with `_exit(`[`EXIT_HANDLER`]`)`. `_exit()` and
//!   `quick_exit()` called by a handler cannot be seen by anyone and are not
//!   covered.
//! * **A fatal signal** (SIGSEGV, SIGILL, SIGBUS, SIGFPE, SIGABRT). The
//!   signal handler writes one preformatted line naming the handler, version
//!   and callback that was running on the faulting thread, then hands the
//!   signal to the handler that was installed before ours (Rust's std has
//!   one for SIGSEGV and SIGBUS that reports stack overflows: a guard-page
//!   hit still prints "has overflowed its stack" and aborts), then restores
//!   `SIG_DFL` and re-raises, so the process dies by the real signal (core
//!   dumps, systemd's `status=11/SEGV`).
//!
//! What is running is tracked per thread: [`enter`] stores a pointer to a
//! preformatted [`Label`] in a thread-local when a callback (or a `dlopen`)
//! starts, and the [`Guard`] puts back the previous one when it ends. That
//! is two word-sized stores per callback; nothing is formatted on the hot
//! path. The signal handler only reads that pointer, copies bytes into a
//! stack buffer and calls `write(2)`: all async-signal-safe.
//!
//! The line goes to stderr and, when a log file is configured, to that file
//! too ([`set_log_fd`]), so it lands where the tracing lines go.
//!
//! This is the only module that installs signal dispositions by hand, hence
//! `unsafe`.
#![allow(unsafe_code)]

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicPtr, Ordering};

/// The status wshd ends with when handler code calls `exit()`:
/// `EX_SOFTWARE` from sysexits.h ("internal software error"). Not 1, which
/// wshd uses for its own failures, so a supervisor's log tells them apart.
pub const EXIT_HANDLER: i32 = 70;

/// Set by wshd's own orderly exits before they call `exit()`.
static EXITING: AtomicBool = AtomicBool::new(false);

/// The log file's descriptor (or -1), written to besides stderr.
static LOG_FD: AtomicI32 = AtomicI32::new(-1);

/// Whether [`install`] ran (unit tests never install).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// The signals that get a line before the process dies.
const FATAL: [libc::c_int; 5] = [
    libc::SIGSEGV,
    libc::SIGILL,
    libc::SIGBUS,
    libc::SIGFPE,
    libc::SIGABRT,
];

/// The disposition each fatal signal had before ours, to chain to. Written
/// once in [`install`] before our handler is installed, read only by it.
static mut PREVIOUS: [std::mem::MaybeUninit<libc::sigaction>; 5] =
    [const { std::mem::MaybeUninit::zeroed() }; 5];

/// A preformatted description of what is running, e.g. `handler c_echo
/// 0.1.0 (generation 3, file /srv/h/c_echo_wsh.so, sha256 0a1b2c3d4e5f),
/// callback on_message`. Built once per library and callback, never on the
/// hot path.
#[derive(Debug)]
pub struct Label(Box<[u8]>);

impl Label {
    /// A label from text; longer than [`LABEL_MAX`] bytes is cut.
    pub fn new(text: &str) -> Label {
        let mut b = text.as_bytes();
        if b.len() > LABEL_MAX {
            b = &b[..LABEL_MAX];
        }
        Label(b.into())
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

/// Longest label kept; the line must fit the signal handler's stack buffer.
pub const LABEL_MAX: usize = 1024;

thread_local! {
    /// What handler code this thread is running, if any. A const-initialised
    /// thread-local without a destructor is a plain ELF TLS slot: reading it
    /// from a signal handler is safe.
    static CURRENT: AtomicPtr<Label> = const { AtomicPtr::new(std::ptr::null_mut()) };
}

/// Marks this thread as running the handler code `label` describes until
/// the guard drops. The label must outlive the guard (it is owned by the
/// library whose code runs).
pub fn enter(label: &Label) -> Guard {
    let p = label as *const Label as *mut Label;
    let prev = CURRENT.with(|c| c.swap(p, Ordering::Relaxed));
    // Keep the compiler from moving the store after the callback's first
    // instruction: the signal handler runs on this thread.
    std::sync::atomic::compiler_fence(Ordering::SeqCst);
    Guard { prev }
}

/// Restores what the thread was running before [`enter`].
#[must_use = "the label is cleared when the guard drops"]
pub struct Guard {
    prev: *mut Label,
}

impl Drop for Guard {
    fn drop(&mut self) {
        std::sync::atomic::compiler_fence(Ordering::SeqCst);
        CURRENT.with(|c| c.store(self.prev, Ordering::Relaxed));
    }
}

/// Says the coming `exit()` is wshd's own. Call it before returning from
/// `main` and before any `std::process::exit` off the main thread.
pub fn orderly_exit() {
    EXITING.store(true, Ordering::SeqCst);
}

/// Where the log file is, so the crash line reaches it too. Pass -1 when
/// logging to stderr only. The previous descriptor is the caller's to close.
pub fn set_log_fd(fd: libc::c_int) {
    LOG_FD.store(if fd == 2 { -1 } else { fd }, Ordering::SeqCst);
}

/// Registers the `atexit` hook and the fatal-signal handlers. Call once,
/// early in `main`, after the arguments are parsed (clap's own `--help`
/// exit must stay a clean exit).
pub fn install() -> std::io::Result<()> {
    if INSTALLED.swap(true, Ordering::SeqCst) {
        return Ok(());
    }
    // SAFETY: `on_exit` is an `extern "C" fn()` that lives for the whole
    // process (it is in the executable).
    if unsafe { libc::atexit(on_exit) } != 0 {
        return Err(std::io::Error::other("atexit refused the hook"));
    }
    for (i, &sig) in FATAL.iter().enumerate() {
        // SAFETY: a zeroed sigaction is a valid "no handler, no flags"
        // value; sa_mask is initialised with sigemptyset before use, and
        // PREVIOUS[i] is written before our handler (its only reader) is
        // installed for `sig`, on this one thread, once.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            // SA_ONSTACK: run on the thread's alternate stack when it has one
            // (std gives its threads one), so a stack overflow can still be
            // reported. SA_SIGINFO: the chained std handler needs siginfo.
            act.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut act.sa_mask);
            let prev = &raw mut PREVIOUS[i];
            if libc::sigaction(sig, &act, (*prev).as_mut_ptr()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
    }
    Ok(())
}

/// The `atexit` hook. Not a signal handler, but it may run while another
/// thread holds any lock, so it only formats into a stack buffer too.
extern "C" fn on_exit() {
    if EXITING.load(Ordering::SeqCst) {
        return;
    }
    let current = CURRENT.with(|c| c.load(Ordering::Relaxed));
    // SAFETY: getpid and gettid have no preconditions.
    let main_thread = unsafe { libc::gettid() == libc::getpid() };
    if current.is_null() && main_thread {
        // wshd's own exit: main returning after a panic, or the
        // second-signal exit of the control runtime (main thread).
        return;
    }
    let mut line = Line::new();
    line.push(b"wshd: FATAL: exit() called by handler code: ");
    if current.is_null() {
        line.push(b"on a thread that runs no handler callback (a thread the handler started?)");
    } else {
        // SAFETY: a non-null CURRENT points to a label that outlives the
        // guard that set it, and the guard is still alive (we are inside it).
        line.push(unsafe { (*current).as_bytes() });
    }
    line.push(b"; ending wshd with status 70 (EX_SOFTWARE) rather than the handler's status, so a supervisor sees a failure\n");
    line.write_out();
    // SAFETY: _exit ends the process at once; no further atexit hooks run
    // (the handler's own might call exit again, or run on freed state).
    unsafe { libc::_exit(EXIT_HANDLER) }
}

/// The fatal-signal handler: one line, chain, then die by the signal.
extern "C" fn on_signal(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    let current = CURRENT.with(|c| c.load(Ordering::Relaxed));
    let mut line = Line::new();
    line.push(b"wshd: FATAL: signal ");
    line.push(signal_name(sig));
    if current.is_null() {
        line.push(b" outside any handler callback (a thread a handler started, or a bug in wshd)");
    } else {
        line.push(b" in ");
        // SAFETY: as in on_exit: the label outlives the live guard.
        line.push(unsafe { (*current).as_bytes() });
    }
    line.push(b"; wshd dies by this signal\n");
    line.write_out();

    // Chain to the previous handler (std's stack-overflow reporter for
    // SIGSEGV/SIGBUS): on a guard-page hit it prints its message and aborts;
    // otherwise it resets the signal to SIG_DFL and returns.
    if let Some(i) = FATAL.iter().position(|&s| s == sig) {
        // SAFETY: PREVIOUS[i] was fully written by sigaction in install()
        // before this handler could run for `sig`.
        let prev = unsafe { (&raw const PREVIOUS[i]).read().assume_init() };
        let h = prev.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if prev.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: the previous handler was installed with SA_SIGINFO,
                // so this is its signature; we pass our own arguments on.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: installed without SA_SIGINFO: a plain handler.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
        }
    }
    // SAFETY: sigaction and raise are async-signal-safe. The signal is
    // blocked while we run, so the raised one is delivered, with the default
    // action, as soon as this handler returns; a faulting instruction would
    // fault again anyway.
    unsafe {
        let mut dfl: libc::sigaction = std::mem::zeroed();
        dfl.sa_sigaction = libc::SIG_DFL;
        libc::sigemptyset(&mut dfl.sa_mask);
        libc::sigaction(sig, &dfl, std::ptr::null_mut());
        libc::raise(sig);
    }
}

fn signal_name(sig: libc::c_int) -> &'static [u8] {
    match sig {
        libc::SIGSEGV => b"SIGSEGV",
        libc::SIGILL => b"SIGILL",
        libc::SIGBUS => b"SIGBUS",
        libc::SIGFPE => b"SIGFPE",
        libc::SIGABRT => b"SIGABRT",
        _ => b"(fatal)",
    }
}

/// A fixed stack buffer for one line: no allocation in a signal handler.
struct Line {
    buf: [u8; LABEL_MAX + 512],
    len: usize,
}

impl Line {
    fn new() -> Line {
        Line {
            buf: [0; LABEL_MAX + 512],
            len: 0,
        }
    }

    fn push(&mut self, b: &[u8]) {
        // Leave room for the newline the caller ends with.
        let n = b.len().min(self.buf.len() - 1 - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&b[..n]);
        self.len += n;
    }

    /// Writes the line to stderr and the log file, each with one write(2)
    /// so it is not interleaved with other output.
    fn write_out(&mut self) {
        if self.buf[self.len.saturating_sub(1)] != b'\n' {
            self.buf[self.len] = b'\n';
            self.len += 1;
        }
        for fd in [2, LOG_FD.load(Ordering::SeqCst)] {
            if fd < 0 {
                continue;
            }
            // SAFETY: write(2) is async-signal-safe; the buffer is valid for
            // `len` bytes. A short write is not retried: best effort.
            unsafe {
                libc::write(fd, self.buf.as_ptr().cast(), self.len);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guards_nest_and_restore() {
        let a = Label::new("a");
        let b = Label::new("b");
        let now = || CURRENT.with(|c| c.load(Ordering::Relaxed));
        assert!(now().is_null());
        {
            let _ga = enter(&a);
            assert_eq!(now() as *const Label, &a as *const Label);
            {
                let _gb = enter(&b);
                assert_eq!(now() as *const Label, &b as *const Label);
            }
            assert_eq!(now() as *const Label, &a as *const Label);
        }
        assert!(now().is_null());
    }

    #[test]
    fn long_labels_are_cut() {
        let l = Label::new(&"x".repeat(LABEL_MAX * 2));
        assert_eq!(l.as_bytes().len(), LABEL_MAX);
        let mut line = Line::new();
        line.push(&[b'y'; LABEL_MAX * 3]);
        assert_eq!(line.len, line.buf.len() - 1);
    }
}
