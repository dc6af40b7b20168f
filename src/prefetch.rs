//! Read-ahead for cold tree walks (find, du, backups, a stat of every file).
//!
//! A walk lists one directory at a time and waits for the disk at each: its
//! blocks, then its entries' inodes (readdirplus stats every entry). When
//! listing a lower directory had to wait for the disk, a background thread
//! reads its subdirectories (entries and their inodes) so that the walk finds
//! them in the page cache when it gets there. Lower layers are read-only, so
//! warming their caches never shows anything stale; the cost is I/O, which is
//! why read-ahead starts only from a listing that was slow, goes at most
//! `DEPTH` levels below it, and drops work when its queue is full.

use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::debug;

use crate::sys::{self, SchedPolicy};

/// A listing slower than this waited for the disk (a cached one of a
/// typical directory takes a few microseconds).
pub const COLD: Duration = Duration::from_micros(50);
/// Levels read ahead below the listing that started it.
const DEPTH: u8 = 2;
/// Queued directories at most: bounds memory and the descriptors held for
/// their parents.
const QUEUE: usize = 256;
const THREADS: usize = 2;

struct Job {
    parent: Arc<OwnedFd>,
    name: OsString,
    depth: u8,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    threads: usize,
    /// Directories ever queued: unlike `jobs.len()`, not raced by the
    /// threads draining the queue.
    accepted: u64,
}

pub struct Prefetch {
    inner: Arc<(Mutex<State>, Condvar)>,
    /// `COLD`, except in tests.
    cold: Duration,
}

impl Default for Prefetch {
    fn default() -> Self {
        Prefetch {
            inner: Default::default(),
            cold: COLD,
        }
    }
}

impl Prefetch {
    /// A listing of `dir` took `took`; `subdirs` are its subdirectories'
    /// names. Queues them when the listing was cold.
    pub fn listed<'a>(
        &self,
        dir: &Arc<OwnedFd>,
        took: Duration,
        subdirs: impl Iterator<Item = &'a OsStr>,
    ) {
        if took >= self.cold {
            self.queue(dir, 1, subdirs);
        }
    }

    fn queue<'a>(&self, dir: &Arc<OwnedFd>, depth: u8, subdirs: impl Iterator<Item = &'a OsStr>) {
        let (m, cv) = &*self.inner;
        let mut st = m.lock();
        let mut added = false;
        for name in subdirs {
            if st.jobs.len() >= QUEUE {
                break;
            }
            st.jobs.push_back(Job {
                parent: dir.clone(),
                name: name.to_os_string(),
                depth,
            });
            st.accepted += 1;
            added = true;
        }
        if !added {
            return;
        }
        // Threads start with the first cold listing: a mount that never
        // walks a cold tree never has them.
        if st.threads < THREADS {
            let (inner, cold) = (self.inner.clone(), self.cold);
            let spawned = std::thread::Builder::new()
                .name("layerfs-readahead".into())
                .spawn(move || worker(inner, cold));
            match spawned {
                Ok(_) => st.threads += 1,
                Err(e) => debug!(err = %e, "no read-ahead thread"),
            }
        }
        cv.notify_one();
    }

    /// Directories waiting (for tests and status).
    pub fn queued(&self) -> usize {
        self.inner.0.lock().jobs.len()
    }

    /// Directories queued since the mount (for tests: unlike `queued`, not
    /// changed by the worker threads).
    pub fn accepted(&self) -> u64 {
        self.inner.0.lock().accepted
    }
}

fn worker(inner: Arc<(Mutex<State>, Condvar)>, cold: Duration) {
    // Read-ahead must never take CPU from the walk it serves.
    let _ = sys::set_sched_policy(SchedPolicy::Idle);
    let me = Prefetch {
        inner: inner.clone(),
        cold,
    };
    loop {
        let job = {
            let (m, cv) = &*inner;
            let mut st = m.lock();
            loop {
                if let Some(j) = st.jobs.pop_front() {
                    break j;
                }
                cv.wait(&mut st);
            }
        };
        read_ahead(&me, job);
    }
}

/// Read one directory's entries and stat each (the inodes readdirplus will
/// ask for); go on below it while it keeps being cold.
fn read_ahead(p: &Prefetch, job: Job) {
    if sys::check_name(&job.name).is_err() {
        return;
    }
    let t0 = Instant::now();
    // O_NOFOLLOW: a name that became a symlink since it was listed is
    // not followed out of the layer.
    let Ok(fd) = sys::openat(
        job.parent.as_fd(),
        &job.name,
        libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
        0,
    ) else {
        return;
    };
    let Ok(entries) = sys::read_dir_fd(fd.as_fd()) else {
        return;
    };
    let took = t0.elapsed();
    for e in &entries {
        let _ = sys::fstatat(fd.as_fd(), OsStr::from_bytes(&e.name));
    }
    if took >= p.cold && job.depth < DEPTH {
        let fd = Arc::new(fd);
        let subdirs = entries
            .iter()
            .filter(|e| e.dtype == libc::DT_DIR)
            .map(|e| OsStr::from_bytes(&e.name));
        p.queue(&fd, job.depth + 1, subdirs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_fd(p: &std::path::Path) -> Arc<OwnedFd> {
        let f = std::fs::File::open(p).expect("open dir");
        Arc::new(OwnedFd::from(f))
    }

    #[test]
    fn warm_listings_queue_nothing_and_the_queue_is_bounded() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let names: Vec<OsString> = (0..QUEUE + 50)
            .map(|i| OsString::from(format!("d{i}")))
            .collect();
        for n in &names {
            std::fs::create_dir(tmp.path().join(n)).expect("mkdir");
        }
        let fd = dir_fd(tmp.path());
        let p = Prefetch::default();
        p.listed(
            &fd,
            Duration::from_micros(5),
            names.iter().map(|n| n.as_os_str()),
        );
        assert_eq!(p.queued(), 0, "a warm listing started read-ahead");
        assert_eq!(p.inner.0.lock().threads, 0);
        // A cold one queues at most QUEUE directories, and the threads
        // drain them.
        p.listed(&fd, COLD, names.iter().map(|n| n.as_os_str()));
        assert!(p.queued() <= QUEUE);
        let deadline = Instant::now() + Duration::from_secs(20);
        while p.queued() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.queued(), 0, "read-ahead threads did not drain the queue");
    }

    #[test]
    fn does_not_follow_a_symlink_out_of_the_layer() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let outside = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(outside.path().join("secret")).expect("mkdir");
        std::os::unix::fs::symlink(outside.path(), tmp.path().join("d")).expect("symlink");
        // Every listing counts as cold here: had the symlink been followed,
        // "secret" (outside the layer) would be queued.
        let p = Prefetch {
            cold: Duration::ZERO,
            ..Default::default()
        };
        std::fs::create_dir(tmp.path().join("real")).expect("mkdir");
        std::fs::create_dir(tmp.path().join("real/sub")).expect("mkdir");
        read_ahead(
            &p,
            Job {
                parent: dir_fd(tmp.path()),
                name: "real".into(),
                depth: 1,
            },
        );
        // The worker thread this starts may already have taken the job, so
        // count what was queued rather than what still waits.
        assert_eq!(p.accepted(), 1, "a real subdirectory is read ahead");
        read_ahead(
            &p,
            Job {
                parent: dir_fd(tmp.path()),
                name: "d".into(),
                depth: 1,
            },
        );
        assert_eq!(p.accepted(), 1, "read ahead through a symlink");
    }
}
