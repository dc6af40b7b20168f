//! Helpers shared by the agent's integration tests (each test binary uses
//! some of them).
#![allow(dead_code)]

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

/// A temporary directory under /tmp that other uids can enter (test
/// callers of other uids must reach the sockets inside).
pub fn shared_tempdir(prefix: &str) -> tempfile::TempDir {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    tmp
}

/// Poll `f` until it holds; fail the test after `secs` seconds.
pub fn wait_for(what: &str, secs: u64, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

pub fn is_mounted(p: &Path) -> bool {
    let want = p.to_string_lossy().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap_or_default()
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(want.as_str()))
}

/// Unmount `mnt` (retrying while busy, then lazily) and wait up to 10 s for
/// its daemon to exit before killing it.
pub fn unmount(mnt: &Path, daemon: Option<Child>) {
    for _ in 0..50 {
        if !is_mounted(mnt)
            || Command::new("umount")
                .arg(mnt)
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        {
            break;
        }
        sleep(Duration::from_millis(100));
    }
    if is_mounted(mnt) {
        let _ = Command::new("umount").arg("-l").arg(mnt).status();
    }
    if let Some(c) = daemon {
        reap(c, Duration::from_secs(10));
    }
}

/// Wait up to `limit` for `c` to exit, then kill it.
pub fn reap(mut c: Child, limit: Duration) {
    let deadline = Instant::now() + limit;
    while !matches!(c.try_wait(), Ok(Some(_))) {
        if Instant::now() > deadline {
            let _ = c.kill();
            let _ = c.wait();
            return;
        }
        sleep(Duration::from_millis(20));
    }
}
