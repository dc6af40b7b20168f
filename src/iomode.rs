//! Which I/O path each open file takes: kernel passthrough (data never
//! crosses the daemon), the page cache through the daemon, or direct I/O.
//!
//! The kernel allows, per inode, either passthrough opens sharing one
//! backing file, or page-cached opens, never both (a mixed open fails with
//! ETXTBSY). After a copy-up the upper file is a different backing file than
//! the lower one an earlier reader may still hold. This module picks a mode
//! per open that never conflicts: direct I/O (no page cache, no io mode) is
//! the fallback when neither of the others can be used.

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{info, warn};

use crate::sys;

/// A backing file registered with the kernel, and which real file it is.
/// Unregistered when the last handle using it is released.
pub struct Backing {
    pub id: u32,
    pub key: (u64, u64),
    dev: Arc<OwnedFd>,
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Err(e) = sys::backing_close(self.dev.as_fd(), self.id) {
            // ENOTCONN/ENODEV after unmount: the kernel dropped it already.
            tracing::debug!(err = %e, id = self.id, "cannot close a backing file");
        }
    }
}

#[derive(Clone)]
pub enum IoMode {
    Passthrough(Arc<Backing>),
    Cached,
    Direct,
}

#[derive(Default)]
struct InodeIo {
    backing: Weak<Backing>,
    cached: u32,
}

/// How long an open waits for the release of a just-closed reader that
/// holds the inode's other backing file (see `choose`).
const RELEASE_WAIT: Duration = Duration::from_millis(200);

pub struct IoModes {
    enabled: AtomicBool,
    inodes: Mutex<HashMap<u64, InodeIo>>,
    /// Signalled after every release (see `choose`).
    released: Condvar,
    /// The FUSE connection backing files are registered on (set once mounted).
    dev: OnceLock<Arc<OwnedFd>>,
}

impl IoModes {
    pub fn new(enabled: bool) -> Self {
        IoModes {
            enabled: AtomicBool::new(enabled),
            inodes: Mutex::new(HashMap::new()),
            released: Condvar::new(),
            dev: OnceLock::new(),
        }
    }

    /// The mounted connection's `/dev/fuse` descriptor.
    pub fn set_device(&self, dev: Arc<OwnedFd>) {
        let _ = self.dev.set(dev);
    }

    pub fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    pub fn disable(&self, why: &str) {
        if self.enabled.swap(false, Ordering::Relaxed) {
            info!("kernel FUSE passthrough off: {why}; file data goes through the daemon");
        }
    }

    /// Choose the mode of a new open of inode `ino` whose real file is `key`.
    /// `eligible`: worth a passthrough backing file (see `fs.rs`); `direct`:
    /// the caller asked for O_DIRECT. `file` is registered as the backing
    /// file when passthrough is chosen.
    ///
    /// The kernel accepts, while an inode has a backing file, only
    /// passthrough opens of that same file (anything else fails with EIO).
    /// So: the same file reuses it; a different file (the upper copy, while
    /// a reader of the lower one is still open) is refused with ETXTBSY,
    /// like writing to a running program, rather than served wrongly.
    /// The kernel sends RELEASE after `close()` has returned, so a reader
    /// that has just closed may not be released yet: wait for that briefly.
    pub fn choose(
        &self,
        ino: u64,
        key: (u64, u64),
        eligible: bool,
        direct: bool,
        file: BorrowedFd<'_>,
    ) -> io::Result<IoMode> {
        let mut map = self.inodes.lock();
        let deadline = Instant::now() + RELEASE_WAIT;
        loop {
            let held = map.entry(ino).or_default().backing.upgrade();
            match held {
                Some(b) if b.key == key => return Ok(IoMode::Passthrough(b)),
                Some(b) => {
                    drop(b);
                    if self.released.wait_until(&mut map, deadline).timed_out() {
                        warn!(
                            ino,
                            "open refused: the file was copied up while a reader of the lower copy is open"
                        );
                        return Err(io::Error::from_raw_os_error(libc::ETXTBSY));
                    }
                }
                None => break,
            }
        }
        let st = map.entry(ino).or_default();
        if direct {
            return Ok(IoMode::Direct);
        }
        let dev = self.dev.get().filter(|_| eligible && self.enabled());
        if let (Some(dev), 0) = (dev, st.cached) {
            match sys::backing_open(dev.as_fd(), file) {
                Ok(id) => {
                    let b = Arc::new(Backing {
                        id,
                        key,
                        dev: dev.clone(),
                    });
                    st.backing = Arc::downgrade(&b);
                    return Ok(IoMode::Passthrough(b));
                }
                Err(e) => {
                    warn!(err = %e, "cannot register a passthrough backing file");
                    drop(map);
                    self.disable("the kernel refused a backing file");
                    return Ok(self.cached(ino));
                }
            }
        }
        st.cached += 1;
        Ok(IoMode::Cached)
    }

    fn cached(&self, ino: u64) -> IoMode {
        let mut map = self.inodes.lock();
        let st = map.entry(ino).or_default();
        st.cached += 1;
        IoMode::Cached
    }

    /// A handle opened in `mode` was released.
    pub fn release(&self, ino: u64, mode: &IoMode) {
        let mut map = self.inodes.lock();
        if let Some(st) = map.get_mut(&ino) {
            if let IoMode::Cached = mode {
                st.cached = st.cached.saturating_sub(1);
            }
            let passthrough_left = match mode {
                // The releasing handle still holds one strong reference.
                IoMode::Passthrough(b) => Arc::strong_count(b) > 1,
                _ => st.backing.upgrade().is_some(),
            };
            if st.cached == 0 && !passthrough_left {
                map.remove(&ino);
            }
        }
        drop(map);
        self.released.notify_all();
    }
}
