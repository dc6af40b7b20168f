//! A daemon killed with SIGKILL in the middle of copy-ups leaves, after the
//! next mount, either the old object or the whole new one, never a partial
//! file, and no leftovers in workdir.

mod common;

use std::fs::{self, OpenOptions};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

fn digest(p: &std::path::Path) -> (u64, u64) {
    let mut f = fs::File::open(p).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let (mut len, mut sum) = (0u64, 0u64);
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for b in &buf[..n] {
            sum = sum.wrapping_mul(31).wrapping_add(u64::from(*b));
        }
        len += n as u64;
    }
    (len, sum)
}

#[test]
fn kill_during_copy_up_leaves_old_or_whole_new() {
    let mut f = Fixture::new();
    // Big enough that copy-up takes a while; pseudo-random content.
    let mut data = vec![0u8; 96 << 20];
    let mut x: u32 = 12345;
    for b in data.iter_mut() {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
        *b = (x >> 16) as u8;
    }
    for i in 0..4 {
        fs::write(f.l2.join(format!("big{i}")), &data).unwrap();
    }
    let old = digest(&f.l2.join("big0"));
    let mut with_tail = data.clone();
    with_tail.extend_from_slice(b"tail");
    let tmp = f.root.join("expected");
    fs::write(&tmp, &with_tail).unwrap();
    let new = digest(&tmp);
    fs::remove_file(&tmp).unwrap();
    drop(with_tail);
    drop(data);

    for (round, delay_ms) in [5u64, 30, 80, 150].iter().enumerate() {
        f.mount();
        let target = f.m(&format!("big{round}"));
        // Append from another process: it blocks inside the copy-up.
        let mut writer = Command::new("sh")
            .arg("-c")
            .arg(format!("printf tail >> '{}'", target.display()))
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(*delay_ms));
        let mut child = f.child.take().unwrap();
        child.kill().unwrap();
        child.wait().unwrap();
        let _ = writer.wait();
        f.mount();
        let got = digest(&f.m(&format!("big{round}")));
        assert!(
            got == old || got == new,
            "round {round}: partial file after a crash: {got:?}, expected {old:?} or {new:?}"
        );
        assert!(
            fs::read_dir(f.work.join("work")).unwrap().next().is_none(),
            "leftovers in workdir after remount"
        );
        // The union still works for writing.
        OpenOptions::new()
            .append(true)
            .open(f.m(&format!("big{round}")))
            .unwrap()
            .write_all(b"!")
            .unwrap();
        f.unmount();
    }
}
