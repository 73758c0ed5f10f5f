//! Ctrl-C and SIGTERM: the first signal asks the engine to stop — model
//! loading (llama.cpp's progress callback says no), a compute in progress
//! (ggml's abort callback, checked between graph nodes) and the token loop
//! all see it within moments — so the command can drain its I/O, join its
//! threads, flush its output and exit with 128 + the signal. A second signal
//! exits at once, and so does any signal while the model is still loading
//! (nothing to flush yet; see `LOADING`).

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use anyhow::{Context as _, Result};

/// The signal that asked to stop (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

/// Set by [`loading`] until [`loaded`] (`run`): while the model loads
/// there is nothing to flush, drain or join (the streamer does not exist
/// yet), and llama.cpp checks the stop request only between tensors — its
/// vocabulary load alone can take a second — so a signal exits at once.
static LOADING: AtomicBool = AtomicBool::new(false);

const LOAD_MSG: &[u8] = b"\nerror: interrupted while loading the model\n";

extern "C" fn on_signal(sig: libc::c_int) {
    if LOADING.load(Ordering::SeqCst) {
        // SAFETY: write(2) and _exit(2) are async-signal-safe; the buffer is
        // a static of the given length.
        unsafe {
            libc::write(2, LOAD_MSG.as_ptr().cast(), LOAD_MSG.len());
            libc::_exit(128 + sig);
        }
    }
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Routes SIGINT and SIGTERM to the stop request (for the commands that
/// generate; `serve` has its own graceful shutdown). Between [`loading`]
/// and [`loaded`] a signal exits at once (see `LOADING`).
pub fn install_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only touches atomics and calls write(2) and
        // _exit(2), which are async-signal-safe.
        unsafe { sigaction(sig, &act) }
            .with_context(|| format!("cannot install a {sig} handler"))?;
    }
    Ok(())
}

/// The command is loading its model and has nothing to flush: a signal now
/// exits at once (`run`; not the bench, whose children may be running).
pub fn loading() {
    LOADING.store(true, Ordering::SeqCst);
}

/// The model is loaded: from now on a signal is a stop request the engine
/// honours (output flushed, I/O drained, threads joined).
pub fn loaded() {
    LOADING.store(false, Ordering::SeqCst);
}

/// Whether a stop was asked for.
pub fn requested() -> bool {
    SIGNAL.load(Ordering::Relaxed) != 0
}

/// The exit code for the signal that asked to stop (130 for SIGINT, 143 for
/// SIGTERM), if one did.
pub fn exit_code() -> Option<u8> {
    match SIGNAL.load(Ordering::SeqCst) {
        0 => None,
        s => Some((128 + s).clamp(0, 255) as u8),
    }
}

/// Asks to stop as a signal would (tests, and front ends with their own handling).
pub fn request(sig: i32) {
    SIGNAL.store(sig.max(1), Ordering::SeqCst);
}

/// The abort callback for a context without a streamer: stop when asked.
///
/// # Safety
/// Any `user` (it is not read).
pub unsafe extern "C" fn abort_when_requested(_user: *mut std::ffi::c_void) -> bool {
    requested()
}
