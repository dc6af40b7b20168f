//! The command line and the mount lifecycle: errors an operator can act on,
//! daemon mode, mount(8)/fstab through the helper, signals, crashes.

mod common;

use std::fs;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn layerfs(args: &[&str]) -> (i32, String) {
    let out = Command::new(BIN)
        .args(args)
        .env("RUST_LOG", "error")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn version_and_help() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("layerfs "));
    let out = Command::new(BIN).arg("--help").output().unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("lowerdir="));
}

#[test]
fn clear_errors_and_nonzero_exit() {
    let f = Fixture::new();
    let m = f.mnt.to_str().unwrap().to_string();
    let l1 = f.l1.to_str().unwrap().to_string();
    let up = f.upper.to_str().unwrap();
    let wk = f.work.to_str().unwrap();
    let cases: Vec<(String, &str)> = vec![
        (
            format!("lowerdir={l1},bogus=1"),
            "unknown mount option 'bogus=1'",
        ),
        ("upperdir=/x,workdir=/y".to_string(), "missing 'lowerdir='"),
        (
            format!("lowerdir={l1},upperdir={up}"),
            "'workdir=' is required",
        ),
        ("lowerdir=/does/not/exist".to_string(), "does not exist"),
        (
            format!("lowerdir={}", f.root.join("afile").display()),
            "is not a directory",
        ),
        (
            format!("lowerdir={l1},upperdir={up},workdir={up}/w"),
            "inside upperdir",
        ),
        (format!("lowerdir={l1},threads=abc"), "threads"),
    ];
    write(f.root.join("afile"), "x");
    fs::create_dir_all(f.upper.join("w")).unwrap();
    for (opts, want) in cases {
        let (code, err) = layerfs(&["-o", &opts, &m]);
        assert_ne!(code, 0, "{opts} succeeded");
        assert!(
            err.contains(want),
            "for {opts}: expected '{want}' in: {err}"
        );
        assert!(!is_mounted(&f.mnt));
    }
    let (code, err) = layerfs(&["-o", &format!("lowerdir={l1}"), "/no/such/mountpoint"]);
    assert_ne!(code, 0);
    assert!(
        err.contains("mount point '/no/such/mountpoint' does not exist"),
        "{err}"
    );
    // Upper and work on different filesystems.
    let shm = tempfile::tempdir_in("/dev/shm").unwrap();
    let (code, err) = layerfs(&[
        "-o",
        &format!(
            "lowerdir={l1},upperdir={up},workdir={}",
            shm.path().display()
        ),
        &m,
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("different filesystems"), "{err}");
    let _ = wk;
}

#[test]
fn no_permission_is_a_clear_error() {
    let f = Fixture::new();
    // An unprivileged user cannot mount a writable union (whiteouts, trusted.* xattrs).
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            BIN,
            "-o",
        ])
        .arg(f.opts())
        .arg(&f.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no permission"), "{err}");
    assert!(!is_mounted(&f.mnt));
}

#[test]
fn daemon_mode_returns_once_mounted_and_sigterm_unmounts() {
    let f = Fixture::new();
    write(f.l1.join("hello"), "hi");
    let (code, err) = layerfs(&["-o", &f.opts(), f.mnt.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    // Mounted by the time the command returned.
    assert!(is_mounted(&f.mnt));
    assert_eq!(read(f.m("hello")), "hi");
    let pid = sh(&format!(
        "ps -eo pid,args | grep -F -- '{}' | grep -v grep | awk '{{print $1}}' | head -1",
        f.mnt.display()
    ));
    let pid: i32 = pid.trim().parse().expect("daemon pid");
    // SAFETY: sending SIGTERM to the daemon we started.
    unsafe { libc::kill(pid, libc::SIGTERM) };
    wait_for(|| !is_mounted(&f.mnt), "unmount on SIGTERM");
}

#[test]
fn killed_daemon_does_not_wedge_the_mount_point() {
    let mut f = Fixture::new();
    write(f.l1.join("a"), "a");
    f.mount();
    assert_eq!(read(f.m("a")), "a");
    let mut child = f.child.take().unwrap();
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    // The old mount is dead (ENOTCONN); a new mount on the same point works.
    f.mount();
    assert_eq!(read(f.m("a")), "a");
}

#[test]
fn leftovers_in_workdir_are_cleaned_at_mount() {
    let mut f = Fixture::new();
    write(f.work.join("work/#lf-crashed/partial"), "junk");
    write(f.work.join("work/#lf-tmpfile"), "junk");
    f.mount();
    assert!(fs::read_dir(f.work.join("work")).unwrap().next().is_none());
}

#[test]
fn mount_helper_fstab_and_generic_options() {
    let f = Fixture::new();
    write(f.l1.join("x"), "x");
    // mount(8) runs /sbin/mount.fuse.layerfs for type fuse.layerfs.
    let helper = std::path::Path::new("/sbin/mount.fuse.layerfs");
    if !helper.exists() {
        let _ = std::os::unix::fs::symlink(BIN, helper);
    }
    sh(&format!(
        "mount -t fuse.layerfs layerfs {} -o {},nodev,nosuid,noexec",
        f.mnt.display(),
        f.opts()
    ));
    assert!(is_mounted(&f.mnt));
    assert_eq!(read(f.m("x")), "x");
    let line = sh(&format!("grep ' {} ' /proc/mounts", f.mnt.display()));
    assert!(line.contains("fuse.layerfs"), "{line}");
    assert!(
        line.contains("nosuid") && line.contains("nodev") && line.contains("noexec"),
        "{line}"
    );
    sh(&format!("umount {}", f.mnt.display()));
    wait_for(|| !is_mounted(&f.mnt), "unmount");
    // The same through an fstab entry.
    let fstab = f.root.join("fstab");
    fs::write(
        &fstab,
        format!(
            "layerfs {} fuse.layerfs {},ro 0 0\n",
            f.mnt.display(),
            f.opts()
        ),
    )
    .unwrap();
    sh(&format!("mount -T {} {}", fstab.display(), f.mnt.display()));
    assert!(is_mounted(&f.mnt));
    assert_eq!(errno_of(fs::write(f.m("y"), "y")), libc::EROFS);
    sh(&format!("umount {}", f.mnt.display()));
    std::thread::sleep(Duration::from_millis(100));
}
