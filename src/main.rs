//! The `onnx-lora` command line: parses arguments and hands off to `cli`.

use std::process::ExitCode;

mod cli;

fn main() -> ExitCode {
    cli::main()
}
