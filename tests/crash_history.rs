//! kill -9 at random moments during writes, copy-ups, checkpoints and
//! rollbacks; after each remount: the union is readable throughout, every
//! completed checkpoint is listed and verifies clean and rolls back to
//! exactly what it captured, an interrupted rollback is either complete or
//! absent, and the journal explains every object in the upper.
//!
//! CI runs 25 kills; `LAYERFS_CRASH_KILLS=200 cargo test --release --test
//! crash_history` (or tests/crash-long.sh) runs the long version.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::Value;

const CTL: &str = env!("CARGO_BIN_EXE_layerfs-ctl");

/// A small deterministic generator (no extra crates; seed printed on failure).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

type Snap = BTreeMap<String, String>;

fn snap(root: &Path) -> std::io::Result<Snap> {
    let mut out = Snap::new();
    fn walk(base: &Path, d: &Path, out: &mut Snap) -> std::io::Result<()> {
        for e in fs::read_dir(d)? {
            let p = e?.path();
            let rel = p.strip_prefix(base).unwrap_or(&p).display().to_string();
            let md = fs::symlink_metadata(&p)?;
            if md.is_dir() {
                out.insert(rel, "dir".into());
                walk(base, &p, out)?;
            } else if md.file_type().is_symlink() {
                out.insert(rel, format!("link:{}", fs::read_link(&p)?.display()));
            } else {
                let data = fs::read(&p)?;
                out.insert(rel, format!("{}:{:x}", data.len(), fnv(&data)));
            }
        }
        Ok(())
    }
    walk(root, root, &mut out)?;
    Ok(out)
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ u64::from(*x)).wrapping_mul(0x100000001b3)
    })
}

fn ctl(sock: &Path, args: &[&str]) -> Result<Value, String> {
    let o = Command::new(CTL)
        .arg("-s")
        .arg(sock)
        .arg("--json")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| e.to_string())?;
    if !o.status.success() {
        return Err(String::from_utf8_lossy(&o.stderr).into_owned());
    }
    serde_json::from_slice(&o.stdout).map_err(|e| e.to_string())
}

fn mount(f: &mut Fixture) -> PathBuf {
    f.mount();
    let s = layerfs::control::socket_path_for(&f.mnt);
    wait_for(|| s.exists(), "control socket");
    s
}

fn kill9(f: &mut Fixture) {
    if let Some(mut c) = f.child.take() {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = Command::new("umount").arg("-l").arg(&f.mnt).status();
}

/// Random changes through the union until told to stop or the mount dies.
fn churn(m: &Path, rng: &mut Rng, n: usize) {
    for _ in 0..n {
        let i = rng.below(12);
        let p = m.join(format!("d{}/f{}", rng.below(3), i));
        let r = match rng.below(6) {
            0 | 1 => fs::write(&p, vec![b'a' + (i as u8); 1 + rng.below(20_000) as usize]),
            2 => fs::remove_file(&p),
            3 => fs::rename(&p, m.join(format!("d{}/f{}", rng.below(3), rng.below(12)))),
            4 => fs::OpenOptions::new()
                .append(true)
                .open(m.join(format!("lower/big{}", rng.below(2))))
                .and_then(|mut fh| std::io::Write::write_all(&mut fh, b"appended\n")),
            _ => fs::create_dir_all(m.join(format!("d{}/sub{}", rng.below(3), rng.below(3)))),
        };
        if let Err(e) = r {
            if e.raw_os_error() == Some(libc::ENOTCONN) {
                return;
            }
        }
    }
}

/// Is every object in the upper named by the journal (itself, an ancestor
/// with a whole-subtree record, or a descendant: a copied-up parent)?
fn journal_explains_upper(sock: &Path, upper: &Path) -> Result<(), String> {
    let recs = ctl(sock, &["log", "--limit", "100000"])?;
    let recs = recs.as_array().cloned().unwrap_or_default();
    let mut named: Vec<(String, bool)> = Vec::new();
    for r in &recs {
        let deep = matches!(
            r["op"].as_str(),
            Some("rollback" | "restore" | "recovered" | "rename" | "mkdir" | "rmdir")
        );
        for k in ["path", "path2"] {
            if let Some(p) = r[k].as_str() {
                named.push((p.trim_start_matches('/').to_string(), deep));
            }
        }
    }
    let under = |p: &str, pre: &str| {
        pre.is_empty() || p == pre || (p.starts_with(pre) && p.as_bytes()[pre.len()] == b'/')
    };
    let mut bad = Vec::new();
    fn walk(base: &Path, d: &Path, out: &mut Vec<String>) {
        if let Ok(rd) = fs::read_dir(d) {
            for e in rd.flatten() {
                let p = e.path();
                out.push(p.strip_prefix(base).unwrap_or(&p).display().to_string());
                if fs::symlink_metadata(&p)
                    .map(|m| m.is_dir())
                    .unwrap_or(false)
                {
                    walk(base, &p, out);
                }
            }
        }
    }
    let mut all = Vec::new();
    walk(upper, upper, &mut all);
    for p in all {
        let ok = named
            .iter()
            .any(|(n, deep)| n == &p || (*deep && under(&p, n)) || under(n, &p));
        if !ok {
            bad.push(p);
        }
    }
    if bad.is_empty() {
        Ok(())
    } else {
        Err(format!("upper paths with no journal record: {bad:?}"))
    }
}

#[test]
fn kill_nine_at_random_moments() {
    let kills: usize = std::env::var("LAYERFS_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(25);
    let seed: u64 = std::env::var("LAYERFS_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_1234_abcd);
    eprintln!("crash test: {kills} kills, seed {seed}");
    let mut rng = Rng(seed);
    let mut f = Fixture::new();
    for d in 0..3 {
        fs::create_dir_all(f.l2.join(format!("d{d}"))).unwrap();
        for i in 0..12 {
            fs::write(f.l2.join(format!("d{d}/f{i}")), format!("lower {d}/{i}\n")).unwrap();
        }
    }
    fs::create_dir_all(f.l1.join("lower")).unwrap();
    for b in 0..2 {
        // Big enough that copy-up is a window worth killing in.
        fs::write(f.l1.join(format!("lower/big{b}")), vec![b'x'; 8 << 20]).unwrap();
    }
    // Completed checkpoints and the state each captured.
    let mut done: BTreeMap<String, Snap> = BTreeMap::new();
    let mut sock = mount(&mut f);
    for k in 0..kills {
        // The driver: changes, then a checkpoint or a rollback, sequentially,
        // so the state a checkpoint captures is known exactly.
        let stop = Arc::new(AtomicBool::new(false));
        let delay = Duration::from_millis(5 + rng.below(400));
        let pid = f.child.as_ref().map(|c| c.id()).unwrap_or(0);
        let killer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                std::thread::sleep(delay);
                stop.store(true, Ordering::SeqCst);
                // SAFETY-free: kill(1) the daemon with SIGKILL.
                let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            })
        };
        let mut pending: Option<(String, Snap, Option<Snap>)> = None;
        let mut round = 0;
        while !stop.load(Ordering::SeqCst) && round < 50 {
            round += 1;
            let n = 1 + rng.below(15) as usize;
            churn(&f.mnt, &mut rng, n);
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(before) = snap(&f.mnt) else { break };
            if done.is_empty() || rng.below(3) > 0 {
                let name = format!("k{k}r{round}");
                pending = Some((name.clone(), before.clone(), None));
                match ctl(&sock, &["checkpoint", "create", "--name", &name]) {
                    Ok(_) => {
                        done.insert(name, before);
                        pending = None;
                    }
                    Err(_) => break,
                }
            } else {
                let names: Vec<&String> = done.keys().collect();
                let target = names[rng.below(names.len() as u64) as usize].clone();
                let want = done[&target].clone();
                pending = Some((target.clone(), before.clone(), Some(want.clone())));
                match ctl(&sock, &["rollback", &target]) {
                    Ok(_) => {
                        pending = None;
                        match snap(&f.mnt) {
                            Ok(now) => assert_eq!(
                                now, want,
                                "kill {k}: rollback to {target} (seed {seed})"
                            ),
                            // Killed right after the rollback answered.
                            Err(_) if stop.load(Ordering::SeqCst) => break,
                            Err(e) => panic!("kill {k}: walk after rollback: {e}"),
                        }
                    }
                    Err(_) => break,
                }
            }
        }
        let _ = killer.join();
        kill9(&mut f);
        sock = mount(&mut f);

        // 1. The union is readable throughout.
        let now =
            snap(&f.mnt).unwrap_or_else(|e| panic!("kill {k}: walk failed: {e} (seed {seed})"));
        // 2. An interrupted rollback is complete or absent.
        if let Some((target, before, Some(want))) = &pending {
            assert!(
                &now == want || &now == before,
                "kill {k}: interrupted rollback to {target} left a mixed state (seed {seed})"
            );
        }
        // 3. Completed checkpoints are all listed; an interrupted one may or may not be.
        let list = ctl(&sock, &["checkpoint", "list"]).expect("list");
        let listed: Vec<String> = list
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["name"].as_str().unwrap_or("").to_string())
            .collect();
        for n in done.keys() {
            assert!(
                listed.contains(n),
                "kill {k}: checkpoint {n} lost (seed {seed})"
            );
        }
        if let Some((name, before, None)) = &pending {
            if listed.contains(name) {
                // It completed just before the kill: it holds what the driver saw.
                done.insert(name.clone(), before.clone());
            }
        }
        // 4. The journal explains the upper.
        if let Err(e) = journal_explains_upper(&sock, &f.upper) {
            panic!("kill {k}: {e} (seed {seed})");
        }
        // 5. Every few rounds: verify everything, and roll back to a random
        //    completed checkpoint and compare with what it captured.
        if k % 5 == 4 || k + 1 == kills {
            let v = ctl(&sock, &["verify"]).expect("verify");
            assert_eq!(
                v["problems"].as_array().map(|a| a.len()),
                Some(0),
                "kill {k}: {v:#?}"
            );
            if !done.is_empty() {
                let names: Vec<&String> = done.keys().collect();
                let t = names[rng.below(names.len() as u64) as usize].clone();
                ctl(&sock, &["rollback", &t]).expect("rollback");
                assert_eq!(snap(&f.mnt).unwrap(), done[&t], "kill {k}: rollback to {t}");
            }
        }
    }
    eprintln!(
        "crash test: {kills} kills survived; {} checkpoints completed",
        done.len()
    );
    f.unmount();
}
