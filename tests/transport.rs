//! Both ways requests reach the daemon: fuser's threads reading /dev/fuse,
//! and per-CPU io_uring queues (`uring=on`). The rest of the suite runs once
//! per transport (tests/run-all.sh); these tests check that the transport
//! asked for is the one that serves.

mod common;

use std::fs;
use std::path::Path;

use common::*;

/// Voluntary context switches of the daemon's threads, summed by role:
/// (io_uring queue threads, all others), and the number of queue threads.
fn switches(pid: u32) -> (u64, u64, usize) {
    let (mut ring, mut other, mut n) = (0, 0, 0);
    for t in fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let t = t.unwrap().path();
        let comm = fs::read_to_string(t.join("comm")).unwrap_or_default();
        let status = fs::read_to_string(t.join("status")).unwrap_or_default();
        let v: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("voluntary_ctxt_switches:"))
            .map(|v| v.trim().parse().unwrap())
            .unwrap_or(0);
        if comm.starts_with("ring-") {
            ring += v;
            n += 1;
        } else {
            other += v;
        }
    }
    (ring, other, n)
}

/// Kernels before 6.14 have no FUSE over io_uring: those tests say so and pass.
fn uring_available() -> bool {
    let there = Path::new("/sys/module/fuse/parameters/enable_uring").exists();
    if !there {
        eprintln!("SKIP: this kernel has no FUSE over io_uring (Linux 6.14+)");
    }
    there
}

fn online_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Some metadata traffic: creates, stats, renames, deletes.
fn traffic(f: &Fixture) {
    let d = f.m("traffic");
    fs::create_dir(&d).unwrap();
    for i in 0..500 {
        let p = d.join(format!("f{i}"));
        fs::write(&p, b"x").unwrap();
        assert_eq!(fs::metadata(&p).unwrap().len(), 1);
        fs::rename(&p, d.join(format!("g{i}"))).unwrap();
    }
    for i in 0..500 {
        fs::remove_file(d.join(format!("g{i}"))).unwrap();
    }
}

#[test]
fn uring_on_serves_requests_through_the_queues() {
    if !uring_available() {
        return;
    }
    let mut f = Fixture::new();
    write(f.l1.join("lower"), "from the lower layer");
    f.mount_exact(&format!("{},uring=on", f.opts()));
    let pid = f.child.as_ref().unwrap().id();
    assert_eq!(read(f.m("lower")), "from the lower layer");
    wait_for(
        || switches(pid).2 >= online_cpus(),
        "io_uring queue threads",
    );
    let (ring0, other0, n) = switches(pid);
    traffic(&f);
    let (ring1, other1, _) = switches(pid);
    // 500 x (create, write, stat, rename) + 500 unlinks: thousands of
    // requests, each a wake-up of the thread that serves it.
    let (ring, other) = (ring1 - ring0, other1 - other0);
    assert!(ring >= 1000, "queue threads ({n}) woke {ring} times");
    assert!(
        ring > 4 * other,
        "most requests should come through the queues: {ring} vs {other} on /dev/fuse"
    );
    // Copy-up and data still right through the queues.
    fs::write(f.m("lower"), "changed").unwrap();
    assert_eq!(read(f.u("lower")), "changed");
    assert_eq!(read(f.l1.join("lower")), "from the lower layer");
}

#[test]
fn uring_threads_follow_the_threads_option() {
    if !uring_available() {
        return;
    }
    let mut f = Fixture::new();
    f.mount_exact(&format!("{},uring=on,threads=12", f.opts()));
    let pid = f.child.as_ref().unwrap().id();
    // 12 shared out over the online CPUs' queues (rounded up), at least 2 each.
    let per = 12usize.div_ceil(online_cpus()).max(2);
    wait_for(
        || switches(pid).2 >= per * online_cpus(),
        "io_uring queue threads for threads=12",
    );
    traffic(&f);
}

#[test]
fn uring_off_keeps_dev_fuse() {
    let mut f = Fixture::new();
    f.mount_exact(&format!("{},uring=off", f.opts()));
    let pid = f.child.as_ref().unwrap().id();
    traffic(&f);
    let (_, other, n) = switches(pid);
    assert_eq!(n, 0, "no io_uring queue threads with uring=off");
    assert!(other >= 1000, "fuser threads woke only {other} times");
}

#[test]
fn bad_uring_value_is_refused() {
    let f = Fixture::new();
    let out = std::process::Command::new(BIN)
        .args(["-f", "-o"])
        .arg(format!("{},uring=fast", f.opts()))
        .arg(&f.mnt)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("uring") && err.contains("auto, on, off"),
        "{err}"
    );
}
