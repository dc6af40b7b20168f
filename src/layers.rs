//! The layers: lower roots (read-only), the upper root and the work
//! directory, held as directory descriptors. Lower directories are reached
//! one component at a time with `O_NOFOLLOW`, so no symlink or `..` inside a
//! layer can lead out of it; their descriptors are cached in a bounded cache
//! (lowers never change while mounted, so a cached descriptor never goes stale).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use thiserror::Error;
use tracing::{info, warn};

use crate::options::MountOptions;
use crate::sys;

/// Name of the scratch directory inside workdir (the same one kernel overlayfs uses).
pub const WORK_SUBDIR: &str = "work";

#[derive(Debug, Error)]
pub enum LayerError {
    #[error("{role} '{path}' does not exist")]
    Missing { role: &'static str, path: PathBuf },
    #[error("{role} '{path}' is not a directory")]
    NotDir { role: &'static str, path: PathBuf },
    #[error("cannot open {role} '{path}': {err}")]
    Open {
        role: &'static str,
        path: PathBuf,
        err: io::Error,
    },
    #[error("upperdir '{upper}' and workdir '{work}' are on different filesystems; put both on the overlay partition")]
    CrossDevice { upper: PathBuf, work: PathBuf },
    #[error("workdir '{work}' is inside upperdir '{upper}' (or the other way round); use sibling directories")]
    Nested { upper: PathBuf, work: PathBuf },
    #[error("cannot prepare workdir '{path}': {err}")]
    Work { path: PathBuf, err: io::Error },
}

/// A small bounded cache of descriptors. When full, the older half is dropped.
pub struct FdCache<K> {
    map: Mutex<HashMap<K, (Arc<OwnedFd>, u64)>>,
    tick: AtomicU64,
    cap: usize,
}

impl<K: std::hash::Hash + Eq + Clone> FdCache<K> {
    pub fn new(cap: usize) -> Self {
        FdCache {
            map: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(0),
            cap,
        }
    }

    pub fn get(&self, k: &K) -> Option<Arc<OwnedFd>> {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = self.map.lock();
        m.get_mut(k).map(|e| {
            e.1 = t;
            e.0.clone()
        })
    }

    pub fn insert(&self, k: K, fd: Arc<OwnedFd>) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut m = self.map.lock();
        if m.len() >= self.cap {
            let mut ticks: Vec<u64> = m.values().map(|e| e.1).collect();
            ticks.sort_unstable();
            let cut = ticks[ticks.len() / 2];
            m.retain(|_, e| e.1 > cut);
        }
        m.insert(k, (fd, t));
    }

    /// Forget every descriptor (after a rollback replaced directories).
    pub fn clear(&self) {
        self.map.lock().clear();
    }

    pub fn remove(&self, k: &K) {
        self.map.lock().remove(k);
    }
}

pub struct Layers {
    /// Lower roots; layer number `i + 1` is `lowers[i]` (0 is the upper).
    lowers: Vec<OwnedFd>,
    upper: Option<OwnedFd>,
    /// `workdir/work`: copy-ups and whiteout swaps are built here, then renamed.
    work: Option<OwnedFd>,
    lower_dirs: FdCache<(u8, Vec<u8>)>,
}

fn open_dir(role: &'static str, path: &Path) -> Result<OwnedFd, LayerError> {
    let md = std::fs::metadata(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => LayerError::Missing {
            role,
            path: path.into(),
        },
        _ => LayerError::Open {
            role,
            path: path.into(),
            err: e,
        },
    })?;
    if !md.is_dir() {
        return Err(LayerError::NotDir {
            role,
            path: path.into(),
        });
    }
    sys::open_root(path).map_err(|err| LayerError::Open {
        role,
        path: path.into(),
        err,
    })
}

impl Layers {
    pub fn open(opts: &MountOptions) -> Result<Layers, LayerError> {
        let mut lowers = Vec::new();
        for l in &opts.lowers {
            lowers.push(open_dir("lowerdir", l)?);
        }
        let (upper, work) = match (&opts.upper, &opts.work) {
            (Some(u), Some(w)) => {
                let ufd = open_dir("upperdir", u)?;
                let wfd = open_dir("workdir", w)?;
                let ust = sys::fstat(ufd.as_fd()).map_err(|err| LayerError::Open {
                    role: "upperdir",
                    path: u.clone(),
                    err,
                })?;
                let wst = sys::fstat(wfd.as_fd()).map_err(|err| LayerError::Open {
                    role: "workdir",
                    path: w.clone(),
                    err,
                })?;
                if ust.st_dev != wst.st_dev {
                    return Err(LayerError::CrossDevice {
                        upper: u.clone(),
                        work: w.clone(),
                    });
                }
                let cu = std::fs::canonicalize(u).unwrap_or_else(|_| u.clone());
                let cw = std::fs::canonicalize(w).unwrap_or_else(|_| w.clone());
                if cu.starts_with(&cw) || cw.starts_with(&cu) {
                    return Err(LayerError::Nested {
                        upper: u.clone(),
                        work: w.clone(),
                    });
                }
                let work = prepare_work(wfd.as_fd()).map_err(|err| LayerError::Work {
                    path: w.clone(),
                    err,
                })?;
                (Some(ufd), Some(work))
            }
            _ => (None, None),
        };
        Ok(Layers {
            lowers,
            upper,
            work,
            lower_dirs: FdCache::new(384),
        })
    }

    pub fn nlowers(&self) -> usize {
        self.lowers.len()
    }

    pub fn upper_root(&self) -> Option<BorrowedFd<'_>> {
        self.upper.as_ref().map(|f| f.as_fd())
    }

    pub fn work(&self) -> io::Result<BorrowedFd<'_>> {
        self.work
            .as_ref()
            .map(|f| f.as_fd())
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EROFS))
    }

    pub fn lower_root(&self, layer: u8) -> BorrowedFd<'_> {
        self.lowers[layer as usize - 1].as_fd()
    }

    /// Descriptor of directory `path` (relative, '/'-separated, "" = root) in lower `layer`.
    pub fn lower_dir(&self, layer: u8, path: &[u8]) -> io::Result<Arc<OwnedFd>> {
        if path.is_empty() {
            let key = (layer, Vec::new());
            if let Some(fd) = self.lower_dirs.get(&key) {
                return Ok(fd);
            }
            let fd = Arc::new(sys::openat(
                self.lower_root(layer),
                OsStr::new("."),
                libc::O_PATH | libc::O_DIRECTORY,
                0,
            )?);
            self.lower_dirs.insert(key, fd.clone());
            return Ok(fd);
        }
        let key = (layer, path.to_vec());
        if let Some(fd) = self.lower_dirs.get(&key) {
            return Ok(fd);
        }
        let (parent, name) = split_last(path);
        let pfd = self.lower_dir(layer, parent)?;
        let name = OsStr::from_bytes(name);
        sys::check_name(name)?;
        let fd = Arc::new(sys::openat(
            pfd.as_fd(),
            name,
            libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
            0,
        )?);
        self.lower_dirs.insert(key, fd.clone());
        Ok(fd)
    }
}

/// Split "a/b/c" into ("a/b", "c"); "c" into ("", "c").
pub fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|b| *b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[][..], path),
    }
}

pub fn join(parent: &[u8], name: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(parent.len() + name.len() + 1);
    v.extend_from_slice(parent);
    if !parent.is_empty() {
        v.push(b'/');
    }
    v.extend_from_slice(name);
    v
}

/// Create `workdir/work` and empty it: anything there is a leftover of an
/// interrupted copy-up or whiteout swap, never live data.
fn prepare_work(workdir: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    let name = OsStr::new(WORK_SUBDIR);
    match sys::mkdirat(workdir, name, 0o700) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {}
        Err(e) => return Err(e),
    }
    let work = sys::openat(
        workdir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    let mut cleaned = 0usize;
    for e in sys::read_dir_all(work.as_fd())? {
        let n = OsStr::from_bytes(&e.name);
        match remove_tree(work.as_fd(), n) {
            Ok(()) => cleaned += 1,
            Err(err) => warn!(name = ?n, %err, "cannot remove leftover in workdir"),
        }
    }
    if cleaned > 0 {
        info!(
            cleaned,
            "removed leftovers of an interrupted operation from workdir"
        );
    }
    Ok(work)
}

/// Remove `name` in `dir` and everything below it, without following symlinks.
pub fn remove_tree(dir: BorrowedFd<'_>, name: &OsStr) -> io::Result<()> {
    let st = sys::fstatat(dir, name)?;
    if (st.st_mode & libc::S_IFMT) != libc::S_IFDIR {
        return sys::unlinkat(dir, name, false);
    }
    let sub = sys::openat(
        dir,
        name,
        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    )?;
    for e in sys::read_dir_all(sub.as_fd())? {
        remove_tree(sub.as_fd(), OsStr::from_bytes(&e.name))?;
    }
    sys::unlinkat(dir, name, true)
}
