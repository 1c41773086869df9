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
//! Temp files are unnamed where the system allows it (Linux `O_TMPFILE`, [`TempFile`]): the
//! data is written into a file with no name in the output folder, and linked in beside the
//! output only to be renamed over it, with the registry locked. A run the kernel kills outright
//! (SIGKILL, the OOM killer), or a machine that loses power, then leaves no partial file
//! behind (but in the microseconds between that link and the rename): the kernel frees an
//! unnamed file when its last descriptor closes. Where one cannot be made (other systems,
//! filesystems without `O_TMPFILE`) a temp is a named `.onnx-lora-XXXX…` file; where one
//! cannot be linked (no `/proc`), its content is copied into a named temp to be renamed.
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
    /// An unnamed temp file, registered under the output it will become: nothing on disk to
    /// remove (the kernel frees it as the process ends), but counted and named as removed.
    Unnamed,
}

struct Entry {
    id: u64,
    path: PathBuf,
    kind: Kind,
    /// The file put in place at `path` (device, inode), for a file staged there
    /// ([`Tracked::stage`]): removed only while `path` is still that file, not one another run
    /// has put there since.
    placed: Option<(u64, u64)>,
}

/// The (device, inode) of the file at `path` (not following a link), where the system has them.
fn identity(path: &Path) -> Option<(u64, u64)> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        std::fs::symlink_metadata(path)
            .ok()
            .map(|m| (m.dev(), m.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = path;
        None
    }
}

impl Entry {
    /// Whether `path` still holds what this run put there (always, where nothing was recorded).
    fn still_ours(&self) -> bool {
        self.placed.is_none() || identity(&self.path) == self.placed
    }
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
        self.live.push(Entry {
            id,
            path,
            kind,
            placed: None,
        });
        Guard { id }
    }

    fn remove(&mut self, id: u64) {
        self.live.retain(|e| e.id != id);
    }

    /// Removes every registered path from the disk, the newest first (a temp file inside a
    /// temp folder before the folder), and empties the registry. Returns how many were removed,
    /// and gives each one's path and kind to `on_removed`.
    fn remove_all(&mut self, mut on_removed: impl FnMut(&Path, Kind)) -> usize {
        let mut removed = 0;
        for e in self.live.drain(..).rev() {
            let done = match e.kind {
                // (a file another run has put at the path since is not this run's to remove)
                Kind::File if !e.still_ours() => continue,
                Kind::File => std::fs::remove_file(&e.path),
                Kind::Dir => std::fs::remove_dir_all(&e.path),
                Kind::Unnamed => Ok(()),
            };
            if done.is_ok() {
                on_removed(&e.path, e.kind);
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

    /// Whether the registered path still holds the file this run put there ([`Tracked::stage`]);
    /// true for a path registered otherwise.
    pub fn still_ours(&self) -> bool {
        lock()
            .live
            .iter()
            .find(|e| e.id == self.id)
            .is_none_or(Entry::still_ours)
    }

    /// The registered path.
    pub fn path(&self) -> Option<PathBuf> {
        lock()
            .live
            .iter()
            .find(|e| e.id == self.id)
            .map(|e| e.path.clone())
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
            e.kind = Kind::File;
            e.placed = identity(dest);
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

/// A file being written, to be put in place with [`TempFile::persist`]: unnamed where the
/// system allows it (see the module's documentation), else a named temp.
#[derive(Debug)]
pub struct TempFile {
    inner: TempInner,
}

#[derive(Debug)]
enum TempInner {
    /// An `O_TMPFILE` file and the folder it lives in.
    #[cfg(target_os = "linux")]
    Unnamed {
        file: std::fs::File,
        dir: PathBuf,
    },
    Named(tempfile::NamedTempFile),
}

impl TempFile {
    pub fn as_file(&self) -> &std::fs::File {
        match &self.inner {
            #[cfg(target_os = "linux")]
            TempInner::Unnamed { file, .. } => file,
            TempInner::Named(t) => t.as_file(),
        }
    }

    pub fn as_file_mut(&mut self) -> &mut std::fs::File {
        match &mut self.inner {
            #[cfg(target_os = "linux")]
            TempInner::Unnamed { file, .. } => file,
            TempInner::Named(t) => t.as_file_mut(),
        }
    }

    /// Whether the file has no name on disk (nothing is left of it if the process dies).
    pub fn is_unnamed(&self) -> bool {
        !matches!(self.inner, TempInner::Named(_))
    }

    /// Puts the file in place at `dest` (replacing what is there), atomically: a named temp is
    /// renamed; an unnamed one is linked under a temp name beside `dest`, then renamed.
    pub fn persist(self, dest: &Path) -> io::Result<()> {
        match self.inner {
            #[cfg(target_os = "linux")]
            TempInner::Unnamed { file, dir } => unnamed::persist(&file, &dir, dest),
            TempInner::Named(t) => t.persist(dest).map(drop).map_err(|e| e.error),
        }
    }
}

/// Linux `O_TMPFILE`: files without a name until they are linked into place.
#[cfg(target_os = "linux")]
mod unnamed {
    use std::ffi::CString;
    use std::fs::File;
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicU64, Ordering};

    fn c_path(p: &Path) -> io::Result<CString> {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
    }

    /// An unnamed file in `dir` (mode 0600), or `None` where it cannot be made (no
    /// `O_TMPFILE` in this filesystem or kernel, a policy refusing it, ...): the caller then
    /// makes a named temp, whose error, if that fails too, is the one to report.
    pub(super) fn create(dir: &Path) -> Option<File> {
        let c = c_path(dir).ok()?;
        // SAFETY: a NUL-terminated path; the returned descriptor is owned by the File below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_TMPFILE | libc::O_RDWR | libc::O_CLOEXEC,
                0o600 as libc::c_uint,
            )
        };
        // SAFETY: `fd` is a new descriptor that nothing else owns.
        (fd >= 0).then(|| unsafe { File::from_raw_fd(fd) })
    }

    /// A new temp name in `dir` (`.onnx-lora-<pid>-<n>-<time>.link.tmp`).
    fn temp_name(dir: &Path) -> PathBuf {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        dir.join(format!(
            "{}{}-{n}-{nanos:08x}.link.tmp",
            super::TEMP_PREFIX,
            std::process::id()
        ))
    }

    /// Links `file` into `dir` under a new temp name, returned.
    fn link_beside(file: &File, dir: &Path) -> io::Result<PathBuf> {
        let proc_path = CString::new(format!("/proc/self/fd/{}", file.as_raw_fd()))
            .map_err(|_| io::Error::other("descriptor path"))?;
        for _ in 0..100 {
            let name = temp_name(dir);
            let c = c_path(&name)?;
            // SAFETY: two NUL-terminated paths; AT_SYMLINK_FOLLOW links what the descriptor's
            // /proc entry names, the unnamed file (the documented way for O_TMPFILE files).
            let rc = unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    proc_path.as_ptr(),
                    libc::AT_FDCWD,
                    c.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            };
            if rc == 0 {
                return Ok(name);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::AlreadyExists {
                return Err(e);
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            "no free temp name to link the output under",
        ))
    }

    /// Where the unnamed file cannot be linked (no `/proc` to link it through, say): its
    /// content copied into a named temp in `dir` (in the kernel, `copy_file_range`), synced,
    /// whose name is returned.
    fn copy_beside(file: &File, dir: &Path) -> io::Result<PathBuf> {
        let mut named = tempfile::Builder::new()
            .prefix(super::TEMP_PREFIX)
            .suffix(".copy.tmp")
            .tempfile_in(dir)?;
        let mut from = file;
        std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(0))?;
        std::io::copy(&mut from, named.as_file_mut())?;
        named
            .as_file()
            .set_permissions(file.metadata()?.permissions())?;
        named.as_file().sync_data()?;
        named.into_temp_path().keep().map_err(|e| e.error)
    }

    /// Links the unnamed `file` beside `dest` (or copies it there) and renames it over `dest`.
    pub(super) fn persist(file: &File, dir: &Path, dest: &Path) -> io::Result<()> {
        let name = match link_beside(file, dir) {
            Ok(name) => name,
            Err(_) => copy_beside(file, dir)?,
        };
        std::fs::rename(&name, dest).inspect_err(|_| {
            let _ = std::fs::remove_file(&name);
        })
    }
}

/// A registered temp file in `dir` that becomes `dest`: unnamed where the system allows it
/// (registered under `dest`, which is what an interrupted run names as removed), else named
/// `.onnx-lora-XXXX<suffix>`.
pub fn temp_file_in(dir: &Path, suffix: &str, dest: &Path) -> io::Result<Tracked<TempFile>> {
    let mut reg = lock();
    #[cfg(target_os = "linux")]
    if let Some(file) = unnamed::create(dir) {
        let guard = reg.add(dest.to_path_buf(), Kind::Unnamed);
        let inner = TempInner::Unnamed {
            file,
            dir: dir.to_path_buf(),
        };
        return Ok(Tracked {
            temp: TempFile { inner },
            guard,
        });
    }
    #[cfg(not(target_os = "linux"))]
    let _ = dest;
    named_temp_file_in(&mut reg, dir, suffix)
}

/// A registered named temp file `.onnx-lora-XXXX<suffix>` in `dir` (the registry is locked).
fn named_temp_file_in(
    reg: &mut Registry,
    dir: &Path,
    suffix: &str,
) -> io::Result<Tracked<TempFile>> {
    let named = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .suffix(suffix)
        .tempfile_in(dir)?;
    let guard = reg.add(named.path().to_path_buf(), Kind::File);
    Ok(Tracked {
        temp: TempFile {
            inner: TempInner::Named(named),
        },
        guard,
    })
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
/// (`None`) rather than wait for good. Each removed path is given to `on_removed`, with its
/// kind (an unnamed file's path is the output it was to become, which is not removed).
pub fn try_remove_all_for_exit(on_removed: impl FnMut(&Path, Kind)) -> Option<usize> {
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
    let removed = reg.remove_all(|_, _| {});
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

    /// What `dir` holds, by name.
    fn listing(dir: &Path) -> Result<Vec<String>, std::io::Error> {
        let mut names = Vec::new();
        for e in std::fs::read_dir(dir)? {
            names.push(e?.file_name().to_string_lossy().into_owned());
        }
        names.sort();
        Ok(names)
    }

    #[test]
    fn dropped_named_temp_file_is_deleted_and_unregistered() -> TestResult {
        let dir = tempfile::tempdir()?;
        let tmp = named_temp_file_in(&mut lock(), dir.path(), ".onnx.tmp")?;
        let [name] = &listing(dir.path())?[..] else {
            return Err("not one file in the folder".into());
        };
        assert!(
            name.starts_with(TEMP_PREFIX) && name.ends_with(".onnx.tmp") && !tmp.is_unnamed(),
            "{name}"
        );
        let path = dir.path().join(name);
        assert!(registered(&path));
        drop(tmp);
        assert!(!registered(&path) && !path.exists());
        Ok(())
    }

    /// On Linux filesystems with `O_TMPFILE` (ext4, xfs, btrfs, tmpfs) the temp has no name:
    /// the folder stays empty while it is written, and nothing is left if it is dropped.
    #[cfg(target_os = "linux")]
    #[test]
    fn temp_file_is_unnamed_where_the_filesystem_allows() -> TestResult {
        let dir = tempfile::tempdir()?;
        let dest = dir.path().join("m.onnx");
        let mut tmp = temp_file_in(dir.path(), ".onnx.tmp", &dest)?;
        if !tmp.is_unnamed() {
            // (a filesystem without O_TMPFILE: the named temps are tested above)
            eprintln!("no O_TMPFILE in {}: named temps", dir.path().display());
            return Ok(());
        }
        std::io::Write::write_all(tmp.as_file_mut(), b"partial")?;
        assert!(listing(dir.path())?.is_empty(), "{:?}", listing(dir.path()));
        assert!(registered(&dest));
        drop(tmp);
        assert!(!registered(&dest) && listing(dir.path())?.is_empty());
        // Put in place: the file, and no temp name left behind.
        let mut tmp = temp_file_in(dir.path(), ".onnx.tmp", &dest)?;
        std::io::Write::write_all(tmp.as_file_mut(), b"whole")?;
        tmp.commit(vec![], |t| t.persist(&dest))?;
        assert_eq!(listing(dir.path())?, ["m.onnx"]);
        assert_eq!(std::fs::read(&dest)?, b"whole");
        assert!(!registered(&dest));
        Ok(())
    }

    /// A file that cannot be linked (here `O_EXCL`, as where `/proc` is missing) is copied into
    /// a named temp and renamed into place: the output whole, no temp left.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_unlinkable_unnamed_file_is_copied_into_place() -> TestResult {
        use std::os::fd::FromRawFd;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir()?;
        let c = std::ffi::CString::new(dir.path().as_os_str().as_bytes())?;
        // SAFETY: a NUL-terminated path; the descriptor is owned by the File below.
        let fd = unsafe {
            libc::open(
                c.as_ptr(),
                libc::O_TMPFILE | libc::O_EXCL | libc::O_RDWR,
                0o644 as libc::c_uint,
            )
        };
        if fd < 0 {
            eprintln!("no O_TMPFILE in {}", dir.path().display());
            return Ok(());
        }
        // SAFETY: a new descriptor nothing else owns.
        let mut file = unsafe { std::fs::File::from_raw_fd(fd) };
        let data: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
        std::io::Write::write_all(&mut file, &data)?;
        let dest = dir.path().join("m.onnx");
        unnamed::persist(&file, dir.path(), &dest)?;
        assert_eq!(std::fs::read(&dest)?, data);
        assert_eq!(listing(dir.path())?, ["m.onnx"]);
        Ok(())
    }

    #[test]
    fn committed_temp_is_unregistered_with_what_it_completes() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (data, model) = (dir.path().join("m.onnx.data"), dir.path().join("m.onnx"));
        for named in [true, false] {
            let d = if named {
                named_temp_file_in(&mut lock(), dir.path(), ".data.tmp")?
            } else {
                temp_file_in(dir.path(), ".data.tmp", &data)?
            };
            let staged = d.stage(&data, |t| t.persist(&data))?;
            assert!(registered(&data) && data.exists());
            let m = temp_file_in(dir.path(), ".onnx.tmp", &model)?;
            m.commit(vec![staged], |t| t.persist(&model))?;
            assert!(!registered(&data) && !registered(&model));
            assert_eq!(listing(dir.path())?, ["m.onnx", "m.onnx.data"]);
        }
        Ok(())
    }

    #[test]
    fn failed_commit_deletes_the_temp() -> TestResult {
        let dir = tempfile::tempdir()?;
        let bad = dir.path().join("missing/m.onnx");
        for named in [true, false] {
            let m = if named {
                named_temp_file_in(&mut lock(), dir.path(), ".onnx.tmp")?
            } else {
                temp_file_in(dir.path(), ".onnx.tmp", &bad)?
            };
            assert!(m.commit(vec![], |t| t.persist(&bad)).is_err());
            assert!(listing(dir.path())?.is_empty(), "{:?}", listing(dir.path()));
            assert!(!registered(&bad));
        }
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

    /// A staged file another run has replaced at its path since is no longer this run's: it
    /// is neither removed nor said to be.
    #[test]
    fn a_staged_file_replaced_since_is_left_to_its_writer() -> TestResult {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("m.onnx.data");
        let d = temp_file_in(dir.path(), ".data.tmp", &data)?;
        let staged = d.stage(&data, |t| t.persist(&data))?;
        assert!(staged.still_ours());
        // another run renames its own file onto the path
        let theirs = dir.path().join("theirs");
        std::fs::write(&theirs, b"theirs")?;
        std::fs::rename(&theirs, &data)?;
        assert!(!staged.still_ours());
        let mut reg = lock();
        let entry = reg
            .live
            .iter()
            .position(|e| e.path == data)
            .ok_or("staged")?;
        let e = reg.live.remove(entry);
        let mut local = Registry {
            next: 0,
            live: vec![e],
        };
        drop(reg);
        assert_eq!(local.remove_all(|_, _| {}), 0);
        assert_eq!(std::fs::read(&data)?, b"theirs");
        // (the entry was taken out of the process registry above)
        std::mem::forget(staged);
        Ok(())
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
            // (nothing on disk: counted, named by the output it was to become)
            reg.add(dir.path().join("out.onnx"), Kind::Unnamed),
        ];
        let mut seen = Vec::new();
        assert_eq!(reg.remove_all(|p, _| seen.push(p.to_path_buf())), 3);
        assert_eq!(seen, [dir.path().join("out.onnx"), file, folder.clone()]);
        assert!(!folder.exists() && reg.live.is_empty());
        // Local guards: not in the process registry.
        guards.into_iter().for_each(std::mem::forget);
        Ok(())
    }
}
