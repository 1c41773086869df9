//! Interrupts: SIGTERM / SIGINT while a model is being written end the run with 128 + the
//! signal and one line on stderr, and leave no temp file and no output in the output folder;
//! only those signals are blocked, in every thread of the process.
#![cfg(unix)]
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A one-MatMul model `y = x @ W` (x [1, rows]) whose W holds `mb` MiB of float32 (inline).
fn write_big_model(path: &Path, mb: usize) {
    let n = mb * (1 << 20) / 4;
    let cols = 1024;
    let raw: Vec<u8> = (0..n as u32)
        .flat_map(|i| (i as f32).to_le_bytes())
        .collect();
    common::write_matmul_model(path, "/fc/MatMul", "W", (n / cols) as i64, cols as i64, raw);
}

/// A temp folder holding an `mb` MiB model `in.onnx` and an empty folder `out`; the model's
/// path, that folder, and the output path `out/m.onnx` in it.
fn big_model_and_out_dir(mb: usize) -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    write_big_model(&input, mb);
    let out_dir = dir.path().join("out");
    std::fs::create_dir(&out_dir).unwrap();
    let out = out_dir.join("m.onnx");
    (dir, input, out_dir, out)
}

/// Asserts that the output folder holds nothing.
fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert!(left.is_empty(), "left in the output folder: {left:?}");
}

fn temps(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".onnx-lora-"))
        .collect()
}

/// Whether process `pid` has a file open in `dir`: on Linux a temp being written there has no
/// name (`O_TMPFILE`), so it shows only among the process's descriptors (as `dir/#N (deleted)`).
fn writing_into(pid: u32, dir: &Path) -> bool {
    #[cfg(target_os = "linux")]
    {
        let Ok(dir) = dir.canonicalize() else {
            return false;
        };
        let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
            return false;
        };
        fds.flatten()
            .filter_map(|fd| std::fs::read_link(fd.path()).ok())
            .any(|target| target.starts_with(&dir))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (pid, dir);
        false
    }
}

/// Whether `dir` takes unnamed files (`O_TMPFILE`), as onnx-lora's temps are made there.
#[cfg(target_os = "linux")]
fn takes_unnamed_files(dir: &Path) -> bool {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).unwrap();
    // SAFETY: a NUL-terminated path; the descriptor is closed at once.
    let fd = unsafe { libc::open(c.as_ptr(), libc::O_TMPFILE | libc::O_RDWR, 0o600) };
    if fd >= 0 {
        // SAFETY: the descriptor opened above.
        unsafe { libc::close(fd) };
    }
    fd >= 0
}

/// The name and `SigBlk` / `SigIgn` masks of every thread of `pid` (Linux `/proc`).
#[cfg(target_os = "linux")]
fn thread_masks(pid: u32) -> Vec<(String, u64, u64)> {
    let mut masks = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return masks;
    };
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue; // the thread ended meanwhile
        };
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        };
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or_default()
            .trim()
            .to_string();
        if let (Some(blk), Some(ign)) = (field("SigBlk:"), field("SigIgn:")) {
            masks.push((name, blk, ign));
        }
    }
    masks
}

/// Checks that every thread of `pid` blocks SIGINT, SIGTERM and SIGHUP, and nothing else, and
/// does not ignore SIGPIPE.
#[cfg(target_os = "linux")]
fn check_masks(pid: u32) {
    let bit = |s: libc::c_int| 1u64 << (s - 1);
    let ours = bit(libc::SIGINT) | bit(libc::SIGTERM) | bit(libc::SIGHUP);
    // glibc blocks every signal for a moment while a thread is created: a thread showing more
    // than ours is looked at again (for up to 2 s: on a loaded machine that moment can be
    // stretched by the scheduler).
    let mut extra = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        let masks = thread_masks(pid);
        assert!(!masks.is_empty());
        extra.clear();
        for (name, blk, ign) in masks {
            assert_eq!(ign & bit(libc::SIGPIPE), 0, "{name}: SIGPIPE is ignored");
            // The signal thread's mask reads empty while it waits in `sigwait` (the kernel
            // unblocks what it waits for).
            if name.starts_with("onnx-lora-sig") {
                assert_eq!(blk & !ours, 0, "{name}: blocked signals {blk:#x}");
                continue;
            }
            assert_eq!(
                blk & ours,
                ours,
                "{name}: blocked signals {blk:#x}, expected {ours:#x}"
            );
            if blk != ours {
                extra.push(format!("{name}: {blk:#x}"));
            }
        }
        if extra.is_empty() {
            return;
        }
        std::thread::sleep(Duration::from_micros(100));
    }
    panic!("threads block more than SIGINT, SIGTERM and SIGHUP ({ours:#x}): {extra:?}");
}

enum Outcome {
    /// The signal reached the run while it was writing.
    Interrupted { code: Option<i32>, stderr: String },
    /// The write was over before the signal: the model was too small to catch it.
    TooFast,
}

/// Converts a `mb` MiB model with `extra` flags into an empty folder and sends `sig` as soon
/// as the run writes there (a temp file appears, or the run holds one open there).
fn interrupt_convert(
    sig: libc::c_int,
    mb: usize,
    extra: &[&str],
) -> (Outcome, PathBuf, tempfile::TempDir) {
    let (dir, input, out_dir, out) = big_model_and_out_dir(mb);
    let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
        .arg("convert")
        .arg(&input)
        .arg("-o")
        .arg(&out)
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if !temps(&out_dir).is_empty() || writing_into(child.id(), &out_dir) {
            break;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            let o = child.wait_with_output().unwrap();
            panic!(
                "no temp file appeared in {} while converting ({:?}): {}",
                out_dir.display(),
                o.status,
                String::from_utf8_lossy(&o.stderr)
            );
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    // While it writes: SIGINT, SIGTERM and SIGHUP are blocked in every thread, nothing else
    // is, and SIGPIPE is not ignored.
    #[cfg(target_os = "linux")]
    check_masks(child.id());
    // SAFETY: signals the child this test started (still unwaited, so its pid is its own).
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    // A write that finished first exits 0, or ends on the signal with the output complete.
    let finished = o.status.success() || (out.exists() && temps(&out_dir).is_empty());
    let outcome = if finished {
        Outcome::TooFast
    } else {
        Outcome::Interrupted {
            code: o.status.code(),
            stderr,
        }
    };
    (outcome, out_dir, dir)
}

/// Interrupts a conversion (a bigger model each time the write was over first) and checks
/// the exit status, the message and that the output folder is left empty.
fn check_interrupted(sig: libc::c_int, name: &str, extra: &[&str]) {
    for mb in [64, 128, 256] {
        let (outcome, out_dir, _dir) = interrupt_convert(sig, mb, extra);
        let Outcome::Interrupted { code, stderr } = outcome else {
            eprintln!("a {mb} MiB model was written before the signal; trying a bigger one");
            continue;
        };
        assert_eq!(code, Some(128 + sig), "exit status; stderr: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "one line on stderr: {stderr}");
        assert!(
            stderr.starts_with(&format!("onnx-lora: interrupted ({name}); removed "))
                && stderr.trim_end().ends_with("unfinished file(s)")
                && !stderr.contains("removed 0 "),
            "{stderr}"
        );
        assert_empty(&out_dir);
        return;
    }
    panic!("every write finished before the signal: this machine writes too fast for the test");
}

#[test]
fn sigterm_while_writing_inline_removes_the_temp_file() {
    check_interrupted(libc::SIGTERM, "SIGTERM", &["--inline", "-q"]);
}

#[test]
fn sigint_while_writing_external_data_removes_both_files() {
    check_interrupted(libc::SIGINT, "SIGINT", &["--external-data", "-q"]);
}

/// SIGKILL, the signal no handler sees (the kernel's OOM killer sends it), while writing: where
/// the output folder takes unnamed files (Linux `O_TMPFILE`: ext4, xfs, btrfs, tmpfs), nothing
/// of the run is left there; elsewhere its named temps are, but never a file at the output's
/// name.
#[cfg(target_os = "linux")]
#[test]
fn sigkill_while_writing_leaves_no_partial_file() {
    for mb in [64, 128, 256] {
        let (outcome, out_dir, _dir) =
            interrupt_convert(libc::SIGKILL, mb, &["--external-data", "-q"]);
        let Outcome::Interrupted { code, stderr } = outcome else {
            eprintln!("a {mb} MiB model was written before the signal; trying a bigger one");
            continue;
        };
        assert_eq!(code, None, "killed by the signal; stderr: {stderr}");
        if takes_unnamed_files(&out_dir) {
            assert_empty(&out_dir);
        } else {
            let left: Vec<_> = std::fs::read_dir(&out_dir)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            assert!(
                left.iter().all(|n| n.starts_with(".onnx-lora-")),
                "{left:?}"
            );
        }
        return;
    }
    panic!("every write finished before the signal: this machine writes too fast for the test");
}

/// SIGKILL while `export-peft` writes the adapter folder: its files are written with no name
/// (where the folder takes unnamed files) and put into a named temp folder only once all are
/// complete, so the kill leaves nothing in the output folder.
#[cfg(target_os = "linux")]
#[test]
fn sigkill_while_exporting_peft_leaves_nothing() {
    for mb in [64, 128, 256] {
        let (dir, input, out_dir, _) = big_model_and_out_dir(mb);
        if !takes_unnamed_files(&out_dir) {
            eprintln!(
                "{} takes no unnamed files: nothing to check",
                out_dir.display()
            );
            return;
        }
        // Factors as large as the weight: the adapter file takes as long to write as the model.
        let injected = dir.path().join("inj.onnx");
        common::onnx_lora_ok(&[
            "inject",
            input.to_str().unwrap(),
            "--target",
            "fc",
            "--rank",
            "1024",
            "-o",
            injected.to_str().unwrap(),
            "-q",
        ]);
        let folder = out_dir.join("adapter");
        let mut child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
            .args(["export-peft", injected.to_str().unwrap()])
            .args(["-o", folder.to_str().unwrap()])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !writing_into(child.id(), &out_dir) {
            if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
                break;
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        // SAFETY: signals the child this test started (still unwaited, so its pid is its own).
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
        let o = child.wait_with_output().unwrap();
        if o.status.success() || folder.exists() {
            eprintln!("the {mb} MiB export finished before the signal; trying a bigger one");
            continue;
        }
        assert_eq!(o.status.code(), None, "killed by the signal");
        assert_empty(&out_dir);
        return;
    }
    panic!("every export finished before the signal: this machine writes too fast for the test");
}

#[test]
fn an_uninterrupted_run_is_unchanged() {
    // The signal thread neither delays nor changes a normal run.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.onnx");
    write_big_model(&input, 1);
    let out = dir.path().join("out.onnx");
    let o = common::onnx_lora(&[
        "convert",
        input.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(out.exists() && temps(dir.path()).is_empty());
}

/// Waits until `out` is in place (or the run ends), then sends the run SIGTERM. False when the
/// run finished first, or `too_late` (asked after the run ended) says the signal came after the
/// moment under test;
/// otherwise asserts that the run ended on the signal, removing what it wrote, and that
/// `out_dir` is empty.
fn interrupt_once_in_place(
    mut child: std::process::Child,
    out: &Path,
    out_dir: &Path,
    too_late: impl Fn() -> bool,
) -> bool {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !out.exists() && child.try_wait().unwrap().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_micros(200));
    }
    // SAFETY: signals the child this test started (still unwaited, so its pid is its own).
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let o = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&o.stderr);
    // (asked once the run has ended: what it kept shows when the signal came)
    if o.status.success() || too_late() {
        return false;
    }
    assert_eq!(o.status.code(), Some(128 + libc::SIGTERM), "{stderr}");
    // (after inject's report line)
    let last = stderr.lines().last().unwrap_or_default();
    assert!(
        last.starts_with("onnx-lora: interrupted (SIGTERM); removed ")
            && !last.contains("removed 0 "),
        "{stderr}"
    );
    assert_empty(out_dir);
    true
}

/// SIGTERM while `--verify` checks an output already in place removes that output: an
/// unverified output is never left looking like a result.
#[test]
fn sigterm_while_verifying_removes_the_output() {
    for mb in [64, 128, 256] {
        let (_dir, input, out_dir, out) = big_model_and_out_dir(mb);
        let child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
            .args([
                "inject",
                input.to_str().unwrap(),
                "--target",
                "fc",
                "--rank",
                "2",
            ])
            .args([
                "-o",
                out.to_str().unwrap(),
                "--verify",
                "--ep",
                "tract",
                "-q",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if interrupt_once_in_place(child, &out, &out_dir, || false) {
            return;
        }
        eprintln!("a {mb} MiB model was verified before the signal; trying a bigger one");
    }
    panic!("every run was verified before the signal: this machine is too fast for the test");
}

/// SIGTERM after `inject --as-inputs --adapter-out` put the serving model in place but before
/// its adapter file is: a run's outputs count only once all are in place, so both go.
#[test]
fn sigterm_between_the_model_and_its_adapter_file_removes_both() {
    for mb in [64, 128, 256] {
        let (dir, input, out_dir, out) = big_model_and_out_dir(mb);
        // Factors as large as the weight: the adapter file takes as long to write as the model.
        let rows = mb * (1 << 20) / 4 / 1024;
        let r = 1024;
        let adapter = common::write_adapter(
            &dir.path().join("adapter"),
            serde_json::json!({"peft_type": "LORA", "r": r, "lora_alpha": r,
                "target_modules": ["fc"]}),
            &[
                ("fc.lora_A.weight", vec![r, rows], vec![0.5; r * rows]),
                ("fc.lora_B.weight", vec![1024, r], vec![0.25; 1024 * r]),
            ],
        );
        let served = out_dir.join("m.onnx_adapter");
        let child = Command::new(env!("CARGO_BIN_EXE_onnx-lora"))
            .args(["inject", input.to_str().unwrap()])
            .args(["--adapter", adapter.to_str().unwrap(), "--as-inputs"])
            .args(["--adapter-out", served.to_str().unwrap()])
            .args(["-o", out.to_str().unwrap(), "-q"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if interrupt_once_in_place(child, &out, &out_dir, || served.exists()) {
            return;
        }
        eprintln!("the {mb} MiB run finished before the signal; trying a bigger one");
    }
    panic!("no run was interrupted between the model and its adapter file");
}

/// Running out of memory while writing over an earlier output: the line says the unfinished
/// write was removed, naming the output, and the earlier output is left as it was (on Linux the
/// file being written has no name; elsewhere its named temp goes).
#[test]
fn out_of_memory_while_writing_keeps_the_earlier_output() {
    let mb = 256;
    let (_dir, input, out_dir, out) = big_model_and_out_dir(mb);
    std::fs::write(&out, b"earlier").unwrap();
    // Enough address space to map the input, not to encode a second copy of it in memory.
    for extra in [150, 250, 350] {
        let o = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "ulimit -v {} && exec \"$0\" \"$@\"",
                (mb + extra) * 1024
            ))
            .arg(env!("CARGO_BIN_EXE_onnx-lora"))
            .args([
                "convert",
                input.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
            ])
            .args(["--inline", "-q"])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        if !err.contains("out of memory while writing") {
            eprintln!("under {} MiB: {err}", mb + extra);
            continue;
        }
        assert_eq!(o.status.code(), Some(2), "{err}");
        assert_eq!(err.lines().count(), 1, "{err}");
        if cfg!(target_os = "linux") {
            let expect = format!("; removed the unfinished write of {}", out.display());
            assert!(err.trim_end().ends_with(&expect), "{err}");
        } else {
            assert!(err.contains("; removed "), "{err}");
        }
        assert!(err.contains("could not be allocated"), "{err}");
        assert_eq!(std::fs::read(&out).unwrap(), b"earlier");
        assert!(temps(&out_dir).is_empty(), "{:?}", temps(&out_dir));
        return;
    }
    panic!("no address-space limit made the write run out of memory");
}
