//! Ctrl-C and SIGTERM: the first signal asks the engine to stop — model
//! loading (llama.cpp's progress callback says no), a compute in progress
//! (ggml's abort callback, checked between graph nodes) and the token loop
//! all see it within moments — so the command can drain its I/O, join its
//! threads, flush its output and exit with 128 + the signal. A second signal
//! exits at once.

use std::sync::atomic::{AtomicI32, Ordering};

use anyhow::{Context as _, Result};

/// The signal that asked to stop (0: none).
static SIGNAL: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    if SIGNAL.swap(sig, Ordering::SeqCst) != 0 {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Routes SIGINT and SIGTERM to the stop request (for the commands that
/// generate; `serve` has its own graceful shutdown).
pub fn install_handlers() -> Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let act = SigAction::new(
        SigHandler::Handler(on_signal),
        SaFlags::SA_RESTART,
        SigSet::empty(),
    );
    for sig in [Signal::SIGINT, Signal::SIGTERM] {
        // SAFETY: the handler only swaps an atomic and calls _exit.
        unsafe { sigaction(sig, &act) }
            .with_context(|| format!("cannot install a {sig} handler"))?;
    }
    Ok(())
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
