//! A failed allocation (a model that needs more memory than the machine gives the process), or
//! an arithmetic fault in native code (SIGFPE): one line on stderr naming it and what the run
//! was doing, the temps and unverified outputs removed (`onnx_lora::cleanup`), exit 2, where
//! Rust would abort (exit 134, a backtrace) or the signal kill the process, the files left
//! behind.
//!
//! The binary's global allocator is the system's, checked: every allocation that returns null
//! ends here instead of in Rust's abort. onnxruntime allocates through C++ and reports its own
//! failures as errors; this covers tract, the inputs and outputs onnx-lora copies, and the
//! rewrites. (A process the kernel's OOM killer stops gets no last word: that is SIGKILL.)

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicUsize, Ordering};

/// The system allocator, whose failures end the run through [`failed`].
pub struct Checked;

// SAFETY: every call is forwarded to `System` unchanged; only a null result is acted on, and
// `failed` does not return.
unsafe impl GlobalAlloc for Checked {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract, passed on.
        let p = unsafe { System.alloc(layout) };
        if p.is_null() {
            failed(layout.size());
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.alloc_zeroed(layout) };
        if p.is_null() {
            failed(layout.size());
        }
        p
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: as above.
        let p = unsafe { System.realloc(ptr, layout, new_size) };
        if p.is_null() {
            failed(new_size);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: as above.
        unsafe { System.dealloc(ptr, layout) }
    }
}

/// The thread ending the run after a failure (its pthread id), 0 while none is.
static HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Ends the run after an allocation of `size` bytes failed.
#[cold]
fn failed(size: usize) -> ! {
    let (unit, per) = if size >= 1 << 30 {
        ("GiB", 1u64 << 30)
    } else {
        ("MiB", 1 << 20)
    };
    end_run("out of memory", &|line| {
        let _ = write!(
            line,
            ": {size} bytes ({:.1} {unit}) could not be allocated",
            size as f64 / per as f64
        );
    })
}

/// Installs the handler of SIGFPE, an arithmetic fault in native code (onnxruntime's kernels
/// divide by a zero-size dimension in places): one line and exit 2, the temps and unverified
/// outputs removed, where the process would die of the signal with no word.
pub fn install_fault_handler() {
    #[cfg(unix)]
    // SAFETY: a zeroed sigaction with a handler of the signature SA_SIGINFO is not asked for;
    // the handler does not return.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = on_fault as extern "C" fn(libc::c_int) as libc::sighandler_t;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGFPE, &action, std::ptr::null_mut());
    }
}

#[cfg(unix)]
extern "C" fn on_fault(_: libc::c_int) {
    end_run(
        "the model's runtime stopped on an arithmetic fault (SIGFPE) in its native code",
        &|line| line.push(" (onnxruntime's kernels fault on some zero-size dimensions)"),
    )
}

/// Ends the run after a failure nothing can unwind from: one line on stderr, `what` and what
/// the run was doing, then `detail`, and the files it leaves out. It allocates nothing itself
/// but what removing the temps takes (paths; a folder's listing). Another thread that fails
/// meanwhile waits for the end; the handling thread failing again aborts, its message
/// already written.
#[cold]
fn end_run(what: &str, detail: &dyn Fn(&mut Line)) -> ! {
    // SAFETY: pthread_self has no preconditions.
    let me = unsafe { libc::pthread_self() } as usize;
    match HANDLER.compare_exchange(0, me, Ordering::SeqCst, Ordering::SeqCst) {
        Ok(_) => {}
        Err(h) if h == me => std::process::abort(),
        Err(_) => loop {
            // SAFETY: waits for a signal; the handling thread ends the process meanwhile.
            unsafe { libc::pause() };
        },
    }
    let mut line = Line::new();
    // SAFETY: isatty on the standard error descriptor.
    if unsafe { libc::isatty(libc::STDERR_FILENO) } == 1 {
        // Over whatever was on the line (a progress bar).
        line.push("\r\x1b[2K");
    }
    line.push("onnx-lora: error: ");
    line.push(what);
    onnx_lora::cleanup::with_activity_for_exit(|doing| {
        line.push(" while ");
        line.push(doing);
    });
    detail(&mut line);
    // Written before the removal, which may allocate: the line's end follows it.
    line.write_to_stderr();
    let mut end = Line::new();
    // The run's temps, and its outputs not yet accepted (those `--verify` was checking).
    let mut first = true;
    let removed = onnx_lora::cleanup::try_remove_all_for_exit(|path, kind| {
        end.push(if first { "; removed " } else { ", " });
        first = false;
        if kind == onnx_lora::cleanup::Kind::Unnamed {
            // (the file being written had no name yet: what is at `path` stays as it was)
            end.push("the unfinished write of ");
        }
        let _ = write!(end, "{}", path.display());
    });
    if removed.is_none() {
        end.push("; the files this run was writing could not be removed");
    }
    end.push("\n");
    end.write_to_stderr();
    // `_exit`: other threads may still be running, and no destructor or exit handler (Rust's,
    // onnxruntime's) may run under them, nor allocate.
    // SAFETY: ends the process; nothing is used after it.
    unsafe { libc::_exit(i32::from(super::EXIT_ERROR)) }
}

/// A message built on the stack (cut at its capacity).
struct Line {
    buf: [u8; 2048],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line {
            buf: [0; 2048],
            len: 0,
        }
    }

    fn push(&mut self, s: &str) {
        let n = s.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
    }

    fn write_to_stderr(&self) {
        let mut rest = &self.buf[..self.len];
        while !rest.is_empty() {
            // SAFETY: writes bytes of a live buffer to the standard error descriptor.
            let n = unsafe { libc::write(libc::STDERR_FILENO, rest.as_ptr().cast(), rest.len()) };
            if n <= 0 {
                return;
            }
            rest = &rest[n as usize..];
        }
    }
}

impl std::fmt::Write for Line {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s);
        Ok(())
    }
}
