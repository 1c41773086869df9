//! The `onnx-lora` command line: parses arguments and hands off to `cli`.

use std::process::ExitCode;

mod cli;

/// The system allocator; a failed allocation ends the run with one line and exit 2 (`cli::oom`).
#[cfg(unix)]
#[global_allocator]
static ALLOCATOR: cli::oom::Checked = cli::oom::Checked;

fn main() -> ExitCode {
    // Like other Unix filters: a closed stdout (`onnx-lora inspect m.onnx | head`) ends the
    // process quietly instead of a panic from `println!`.
    #[cfg(unix)]
    // SAFETY: restoring the default action of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any other thread starts: they all inherit the blocked SIGINT / SIGTERM / SIGHUP.
    cli::interrupt::install();
    cli::oom::install_fault_handler();
    cli::main()
}
