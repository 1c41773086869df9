//! Interrupts (SIGINT, SIGTERM, SIGHUP): the run stops, removes the temp files it was writing
//! (`onnx_lora::cleanup`) and exits with 128 + the signal's number.
//!
//! The three signals are blocked in the main thread before any other thread exists, so every
//! thread (rayon's pools, the progress bar, onnxruntime's and tract's threads, all started
//! later) inherits the mask and none of them is interrupted; one dedicated thread takes them
//! with `sigwait`, so no code runs in a signal handler. Child processes get an empty mask from
//! `std::process::Command`. SIGXFSZ is ignored: a write past a file-size limit (`ulimit -f`)
//! then fails with EFBIG, an error like a full disk (its temps removed, the output named),
//! instead of killing the process. Other signals (SIGPIPE, SIGQUIT, ...) keep their usual
//! behaviour.

/// Starts the signal thread. Call it first thing in `main`, while the process has one thread.
#[cfg(unix)]
pub fn install() {
    // SAFETY: setting a signal's disposition to SIG_IGN runs no code of ours.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
    // SAFETY: plain libc calls on a local, initialised signal set.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, sig);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return; // nothing blocked: the signals keep their default action
        }
        set
    };
    let waiter = std::thread::Builder::new()
        .name("onnx-lora-signals".into())
        .spawn(move || wait(set));
    if waiter.is_err() {
        // No thread to take them: unblock, so the signals still end the run (without cleanup).
        // SAFETY: as above.
        unsafe {
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        }
    }
}

#[cfg(not(unix))]
pub fn install() {}

/// Waits for one of the signals in `set`, removes the registered temps and exits.
#[cfg(unix)]
fn wait(set: libc::sigset_t) {
    let mut sig: libc::c_int = 0;
    // SAFETY: `set` and `sig` are valid for the call.
    while unsafe { libc::sigwait(&set, &mut sig) } != 0 {}
    let removed = onnx_lora::cleanup::remove_all_for_exit();
    let name = match sig {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    };
    {
        use std::io::{IsTerminal, Write};
        let mut err = std::io::stderr().lock();
        // On a terminal, over whatever was on the line (a progress bar, the echoed ^C).
        let clear = if err.is_terminal() { "\r\x1b[2K" } else { "" };
        let _ = writeln!(
            err,
            "{clear}onnx-lora: interrupted ({name}); removed {removed} unfinished file(s)"
        );
    }
    // `_exit`, not `exit`: the other threads are still running, and neither Rust's nor the
    // dynamically loaded onnxruntime's exit-time destructors may run under them.
    // SAFETY: ends the process; nothing is used after it.
    unsafe { libc::_exit(128 + sig) }
}
