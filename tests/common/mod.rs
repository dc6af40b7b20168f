//! Test harness: build lower and upper layers in a scratch directory, mount a
//! real layerfs (or kernel overlayfs) over them, unmount on drop.

#![allow(dead_code)]

use std::ffi::CString;
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::sleep;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_layerfs");

pub struct Fixture {
    pub _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub l1: PathBuf,
    pub l2: PathBuf,
    pub upper: PathBuf,
    pub work: PathBuf,
    pub mnt: PathBuf,
    pub child: Option<Child>,
    pub kernel: bool,
}

pub fn is_mounted(p: &Path) -> bool {
    let want = fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let info = fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines().any(|l| {
        l.split(' ')
            .nth(4)
            .map(|m| Path::new(&unescape(m)) == want)
            .unwrap_or(false)
    })
}

fn unescape(s: &str) -> String {
    s.replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\134", "\\")
}

impl Fixture {
    pub fn new() -> Fixture {
        let tmp = tempfile::Builder::new()
            .prefix("lft")
            .tempdir_in("/tmp")
            .expect("tempdir");
        let root = tmp.path().to_path_buf();
        let f = Fixture {
            l1: root.join("l1"),
            l2: root.join("l2"),
            upper: root.join("u"),
            work: root.join("w"),
            mnt: root.join("m"),
            root,
            _tmp: tmp,
            child: None,
            kernel: false,
        };
        for d in [&f.l1, &f.l2, &f.upper, &f.work, &f.mnt] {
            fs::create_dir_all(d).unwrap();
        }
        f
    }

    pub fn opts(&self) -> String {
        format!(
            "lowerdir={}:{},upperdir={},workdir={}",
            self.l1.display(),
            self.l2.display(),
            self.upper.display(),
            self.work.display()
        )
    }

    /// Mount layerfs in the foreground as a child process and wait until it serves.
    pub fn mount(&mut self) {
        self.mount_with(&self.opts());
    }

    /// `LAYERFS_TEST_OPTS` (e.g. `uring=on`) is appended to every layerfs
    /// mount: CI runs the suite once per transport.
    pub fn mount_with(&mut self, opts: &str) {
        let opts = match std::env::var("LAYERFS_TEST_OPTS") {
            Ok(extra) if !extra.is_empty() => format!("{opts},{extra}"),
            _ => opts.to_string(),
        };
        self.mount_exact(&opts);
    }

    /// Mount with exactly these options (no `LAYERFS_TEST_OPTS`).
    pub fn mount_exact(&mut self, opts: &str) {
        let child = Command::new(BIN)
            .arg("-f")
            .arg("-o")
            .arg(opts)
            .arg(&self.mnt)
            .env("RUST_LOG", "warn,fuser::session=error")
            .stdin(Stdio::null())
            .spawn()
            .expect("spawn layerfs");
        self.child = Some(child);
        self.kernel = false;
        // Mounted and answering (a dead mount left by a killed daemon is listed but fails stat).
        wait_for(
            || is_mounted(&self.mnt) && statfs_ok(&self.mnt),
            "layerfs mount",
        );
    }

    pub fn mount_kernel(&mut self) {
        let st = Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!("{},redirect_dir=on", self.opts()))
            .arg(&self.mnt)
            .status()
            .expect("mount overlay");
        assert!(st.success(), "kernel overlayfs mount failed");
        self.kernel = true;
    }

    pub fn unmount(&mut self) {
        if is_mounted(&self.mnt) {
            let mut ok = false;
            for _ in 0..50 {
                if Command::new("umount")
                    .arg(&self.mnt)
                    .stderr(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
                {
                    ok = true;
                    break;
                }
                sleep(Duration::from_millis(100));
            }
            if !ok {
                let _ = Command::new("umount").arg("-l").arg(&self.mnt).status();
            }
        }
        if let Some(mut c) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn remount(&mut self) {
        self.unmount();
        self.mount();
    }

    pub fn m(&self, rel: &str) -> PathBuf {
        self.mnt.join(rel)
    }
    pub fn u(&self, rel: &str) -> PathBuf {
        self.upper.join(rel)
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.unmount();
    }
}

/// statfs always reaches the daemon (stat may come from the attribute cache).
pub fn statfs_ok(p: &Path) -> bool {
    let c = cstr(p);
    // SAFETY: zeroed statfs is a valid out buffer.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid C string and out pointer.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 }
}

pub fn wait_for(mut f: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        sleep(Duration::from_millis(20));
    }
}

pub fn write(p: impl AsRef<Path>, data: &str) {
    let p = p.as_ref();
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent).unwrap();
    }
    fs::write(p, data).unwrap();
}

pub fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p.as_ref()).unwrap_or_else(|e| panic!("read {}: {e}", p.as_ref().display()))
}

pub fn names(p: impl AsRef<Path>) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(p.as_ref())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

pub fn cstr(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

pub fn errno_of<T>(r: std::io::Result<T>) -> i32 {
    match r {
        Ok(_) => 0,
        Err(e) => e.raw_os_error().unwrap_or(-1),
    }
}

pub fn lgetxattr(p: &Path, name: &str) -> Option<Vec<u8>> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    let mut buf = vec![0u8; 4096];
    // SAFETY: test helper; buffer is valid for its length.
    let r = unsafe { libc::lgetxattr(c.as_ptr(), n.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if r < 0 {
        None
    } else {
        buf.truncate(r as usize);
        Some(buf)
    }
}

pub fn lsetxattr(p: &Path, name: &str, v: &[u8]) -> std::io::Result<()> {
    let c = cstr(p);
    let n = CString::new(name).unwrap();
    // SAFETY: test helper.
    let r = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), v.as_ptr().cast(), v.len(), 0) };
    if r < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

pub fn is_whiteout(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    fs::symlink_metadata(p)
        .map(|m| m.file_type().is_char_device() && m.rdev() == 0)
        .unwrap_or(false)
}

pub fn ino(p: impl AsRef<Path>) -> u64 {
    fs::symlink_metadata(p.as_ref()).unwrap().ino()
}

/// Run a shell command, panic with its output if it fails.
pub fn sh(cmd: &str) -> String {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "command failed: {cmd}\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `f` in a forked child as `uid:gid` (with `umask`), returning its exit code.
pub fn as_user(uid: u32, gid: u32, umask: u32, f: impl FnOnce() -> i32) -> i32 {
    // SAFETY: fork in a test process; the child only makes syscalls and exits.
    unsafe {
        let pid = libc::fork();
        assert!(pid >= 0);
        if pid == 0 {
            libc::setgroups(0, std::ptr::null());
            libc::setgid(gid);
            libc::setuid(uid);
            libc::umask(umask);
            let code = f();
            libc::_exit(code);
        }
        let mut status = 0;
        libc::waitpid(pid, &mut status, 0);
        libc::WEXITSTATUS(status)
    }
}
