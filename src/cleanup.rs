//! Temporary files and folders being written: a process-wide registry of their paths, so that
//! a run interrupted by a signal can remove them before it exits (the binary's signal thread
//! calls [`remove_all_for_exit`]).
//!
//! Writers create their temps through [`temp_file_in`] / [`temp_dir_in`], which return the
//! temp wrapped in a [`Tracked`]: its path is in the registry from its creation (made with the
//! registry locked, so no interrupt falls in between) until it is renamed into place
//! ([`Tracked::commit`], also with the registry locked) or dropped (the temp deletes itself
//! first, then its path leaves the registry). An interrupt therefore either removes a temp
//! before it is renamed, or finds it already in place and complete.
//!
//! It also holds what the run is doing ([`doing`]), which the last line of a run that has to
//! stop at once names (the binary's handler of a failed allocation, which then removes the
//! temps with [`try_remove_all_for_exit`]).

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

/// The name every temp starts with (hidden, and recognisable in an output folder).
pub const TEMP_PREFIX: &str = ".onnx-lora-";

/// What a registered path is, which says how to remove it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    File,
    Dir,
}

struct Entry {
    id: u64,
    path: PathBuf,
    kind: Kind,
}

struct Registry {
    next: u64,
    live: Vec<Entry>,
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    next: 0,
    live: Vec::new(),
});

/// The registry, also after a panic elsewhere while it was locked (its state is always whole).
fn lock() -> MutexGuard<'static, Registry> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Registry {
    fn add(&mut self, path: PathBuf, kind: Kind) -> Guard {
        let id = self.next;
        self.next += 1;
        self.live.push(Entry { id, path, kind });
        Guard { id }
    }

    fn remove(&mut self, id: u64) {
        self.live.retain(|e| e.id != id);
    }

    /// Removes every registered path from the disk, the newest first (a temp file inside a
    /// temp folder before the folder), and empties the registry. Returns how many were removed,
    /// and gives each one's path to `on_removed`.
    fn remove_all(&mut self, mut on_removed: impl FnMut(&Path)) -> usize {
        let mut removed = 0;
        for e in self.live.drain(..).rev() {
            let done = match e.kind {
                Kind::File => std::fs::remove_file(&e.path),
                Kind::Dir => std::fs::remove_dir_all(&e.path),
            };
            if done.is_ok() {
                on_removed(&e.path);
                removed += 1;
            }
        }
        removed
    }
}

/// One registered path: it leaves the registry when this is dropped (or committed).
#[must_use = "the path leaves the registry when the guard is dropped"]
#[derive(Debug)]
pub struct Guard {
    id: u64,
}

impl Guard {
    /// Registers `path` (a temp being written) until the returned guard is dropped.
    pub fn register(path: PathBuf, kind: Kind) -> Guard {
        lock().add(path, kind)
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        lock().remove(self.id);
    }
}

/// A temp (`tempfile::NamedTempFile` or `tempfile::TempDir`) whose path is registered. It
/// derefs to the temp. Dropped, the temp deletes itself first, then its path is unregistered.
#[must_use]
#[derive(Debug)]
pub struct Tracked<T> {
    // Field order is drop order: the temp goes before its path leaves the registry.
    temp: T,
    guard: Guard,
}

impl<T> std::ops::Deref for Tracked<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.temp
    }
}

impl<T> std::ops::DerefMut for Tracked<T> {
    fn deref_mut(&mut self) -> &mut T {
        &mut self.temp
    }
}

impl<T> Tracked<T> {
    /// Puts the temp in place with `place` (a rename) while the registry is locked; once it
    /// succeeds, the temp's path and those of `also` (files already put in place that only
    /// this one completes, see [`Tracked::stage`]) leave the registry in the same step. On an
    /// error everything stays registered until dropped. `place` must not register anything.
    pub fn commit<R, E>(
        self,
        also: Vec<Guard>,
        place: impl FnOnce(T) -> Result<R, E>,
    ) -> Result<R, E> {
        let Tracked { temp, guard } = self;
        let mut reg = lock();
        let result = place(temp);
        if result.is_ok() {
            for g in std::iter::once(guard).chain(also) {
                reg.remove(g.id);
                std::mem::forget(g);
            }
        } else {
            // The guards lock the registry as they drop.
            drop(reg);
            drop(guard);
            drop(also);
        }
        result
    }

    /// Puts the temp in place at `dest` with `place` (a rename) while the registry is
    /// locked, but keeps `dest` registered: for a file that is only complete once another one
    /// is in place (external data before the model that points at it). The returned guard is
    /// given to that one's [`Tracked::commit`]; dropped, `dest` stays on disk.
    pub fn stage<E>(self, dest: &Path, place: impl FnOnce(T) -> Result<(), E>) -> Result<Guard, E> {
        let Tracked { temp, guard } = self;
        let mut reg = lock();
        if let Err(e) = place(temp) {
            drop(reg); // before the guard, which locks the registry as it drops
            return Err(e);
        }
        if let Some(e) = reg.live.iter_mut().find(|e| e.id == guard.id) {
            e.path = dest.to_path_buf();
        }
        drop(reg);
        Ok(guard)
    }
}

/// Creates a temp with `make` while the registry is locked and registers its path.
fn track<T>(
    kind: Kind,
    make: impl FnOnce() -> io::Result<T>,
    path: fn(&T) -> &Path,
) -> io::Result<Tracked<T>> {
    let mut reg = lock();
    let temp = make()?;
    let guard = reg.add(path(&temp).to_path_buf(), kind);
    Ok(Tracked { temp, guard })
}

/// A registered temp file `.onnx-lora-XXXX<suffix>` in `dir`.
pub fn temp_file_in(dir: &Path, suffix: &str) -> io::Result<Tracked<tempfile::NamedTempFile>> {
    track(
        Kind::File,
        || {
            tempfile::Builder::new()
                .prefix(TEMP_PREFIX)
                .suffix(suffix)
                .tempfile_in(dir)
        },
        |t| t.path(),
    )
}

/// A registered temp folder `.onnx-lora-XXXX` in `dir`.
pub fn temp_dir_in(dir: &Path) -> io::Result<Tracked<tempfile::TempDir>> {
    track(
        Kind::Dir,
        || tempfile::Builder::new().prefix(TEMP_PREFIX).tempdir_in(dir),
        |t| t.path(),
    )
}

/// Like [`remove_all_for_exit`], for a thread that may itself hold the registry (a failed
/// allocation can happen anywhere): waits up to about a second for the lock, and gives up
/// (`None`) rather than wait for good. Each removed path is given to `on_removed`.
pub fn try_remove_all_for_exit(on_removed: impl FnMut(&Path)) -> Option<usize> {
    for _ in 0..100 {
        let mut reg = match REGISTRY.try_lock() {
            Ok(reg) => reg,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => {
                std::thread::sleep(std::time::Duration::from_millis(10));
                continue;
            }
        };
        let removed = reg.remove_all(on_removed);
        std::mem::forget(reg);
        return Some(removed);
    }
    None
}

/// What a run is doing now ("running m.onnx"), empty when nothing was said.
struct Activity(Mutex<String>);

/// The process's activity.
static ACTIVITY: Activity = Activity(Mutex::new(String::new()));

impl Activity {
    fn set(&'static self, what: String) -> Doing {
        let mut now = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        Doing {
            activity: self,
            before: std::mem::replace(&mut *now, what),
        }
    }

    fn try_with(&self, f: impl FnOnce(&str)) {
        let now = match self.0.try_lock() {
            Ok(now) => now,
            Err(TryLockError::Poisoned(p)) => p.into_inner(),
            Err(TryLockError::WouldBlock) => return,
        };
        if !now.is_empty() {
            f(&now);
        }
    }
}

/// Says what the run is doing until the returned guard is dropped, which restores what was
/// said before (phases nest: "running out.onnx" inside "checking out.onnx").
pub fn doing(what: impl Into<String>) -> Doing {
    ACTIVITY.set(what.into())
}

/// The guard of [`doing`].
#[must_use = "what the run is doing is forgotten when the guard is dropped"]
pub struct Doing {
    activity: &'static Activity,
    before: String,
}

impl Drop for Doing {
    fn drop(&mut self) {
        let mut now = self
            .activity
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        *now = std::mem::take(&mut self.before);
    }
}

/// Calls `f` with what the run is doing, without waiting for the lock and without
/// allocating: for a run that has to stop at once. Nothing is called when another thread is
/// changing it, or nothing was said.
pub fn with_activity_for_exit(f: impl FnOnce(&str)) {
    ACTIVITY.try_with(f);
}

/// Removes every registered temp and returns how many were removed; for a process about to
/// exit on a signal. The registry stays locked for good, so that no writer can create a temp
/// or rename one into place afterwards: call it only right before exiting.
pub fn remove_all_for_exit() -> usize {
    let mut reg = lock();
    let removed = reg.remove_all(|_| {});
    std::mem::forget(reg);
    removed
}

#[cfg(test)]
mod tests {
    type TestResult = Result<(), Box<dyn std::error::Error>>;

    use super::*;

    fn registered(path: &Path) -> bool {
        lock().live.iter().any(|e| e.path == path)
    }

    #[test]
    fn dropped_temp_file_is_deleted_and_unregistered() -> TestResult {
        let dir = tempfile::tempdir()?;
        let tmp = temp_file_in(dir.path(), ".onnx.tmp")?;
        let path = tmp.path().to_path_buf();
        let name = path
            .file_name()
            .ok_or("no file name")?
            .to_string_lossy()
            .to_string();
        assert!(
            name.starts_with(TEMP_PREFIX) && name.ends_with(".onnx.tmp"),
            "{name}"
        );
        assert!(registered(&path) && path.exists());
        drop(tmp);
        assert!(!registered(&path) && !path.exists());
        Ok(())
    }

    #[test]
    fn committed_temp_is_unregistered_with_what_it_completes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (data, model) = (dir.path().join("m.onnx.data"), dir.path().join("m.onnx"));
        let d = temp_file_in(dir.path(), ".data.tmp")?;
        let staged = d.stage(&data, |t| t.persist(&data).map(drop))?;
        assert!(registered(&data) && data.exists());
        let m = temp_file_in(dir.path(), ".onnx.tmp")?;
        let m_path = m.path().to_path_buf();
        m.commit(vec![staged], |t| t.persist(&model).map(drop))?;
        assert!(!registered(&data) && !registered(&model) && !registered(&m_path));
        assert!(data.exists() && model.exists());
        Ok(())
    }

    #[test]
    fn failed_commit_deletes_the_temp() -> TestResult {
        let dir = tempfile::tempdir()?;
        let m = temp_file_in(dir.path(), ".onnx.tmp")?;
        let path = m.path().to_path_buf();
        let bad = dir.path().join("missing/m.onnx");
        assert!(m.commit(vec![], |t| t.persist(&bad).map(drop)).is_err());
        assert!(!registered(&path) && !path.exists());
        Ok(())
    }

    #[test]
    fn doing_nests_and_restores() {
        // A local activity: the process's is shared with tests running in parallel.
        static LOCAL: Activity = Activity(Mutex::new(String::new()));
        let said = || {
            let mut s = String::new();
            LOCAL.try_with(|a| s = a.to_string());
            s
        };
        let outer = LOCAL.set("writing out.onnx".into());
        {
            let _inner = LOCAL.set("running out.onnx".into());
            assert_eq!(said(), "running out.onnx");
        }
        assert_eq!(said(), "writing out.onnx");
        drop(outer);
        assert_eq!(said(), "");
    }

    #[test]
    fn remove_all_removes_files_and_folders() -> TestResult {
        let dir = tempfile::tempdir()?;
        let mut reg = Registry {
            next: 0,
            live: Vec::new(),
        };
        let folder = dir.path().join(".onnx-lora-dir");
        std::fs::create_dir(&folder)?;
        std::fs::write(folder.join("a"), b"a")?;
        let file = folder.join(".onnx-lora-x.onnx.tmp");
        std::fs::write(&file, b"x")?;
        let guards = [
            reg.add(folder.clone(), Kind::Dir),
            reg.add(file.clone(), Kind::File),
            reg.add(dir.path().join("gone"), Kind::File),
        ];
        let mut seen = Vec::new();
        assert_eq!(reg.remove_all(|p| seen.push(p.to_path_buf())), 2);
        assert_eq!(seen, [file, folder.clone()]);
        assert!(!folder.exists() && reg.live.is_empty());
        // Local guards: not in the process registry.
        guards.into_iter().for_each(std::mem::forget);
        Ok(())
    }
}
