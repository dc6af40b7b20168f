//! FUSE over io_uring (Linux 6.14+): per-CPU request queues.
//!
//! With `/dev/fuse`, a request made on one CPU wakes a daemon thread that
//! may sleep on another; in a virtual machine each such cross-CPU wake-up
//! costs tens of microseconds, more than the work. Here the kernel queues a
//! request on the CPU that made it, and a daemon thread pinned to that CPU
//! serves it: the application and the daemon hand over on one CPU.
//!
//! Each queue (one per possible CPU, as the kernel wants) gets a few threads
//! (the mount's `threads=` shared out, at least two), each with its own ring
//! and one registered entry (header and payload buffers), so one slow request
//! (an fsync, a big copy-up) does not hold up the others from that CPU. A thread waits for a request, serves it through
//! `fuse_wire`, and commits the reply together with fetching the next one.
//! FORGET and INTERRUPT still come through `/dev/fuse` (fuser's threads).
//!
//! A thread waits as SCHED_IDLE (see `serve_queue`): without that, the
//! scheduler sees the CPU busy (with us) when the reply wakes the
//! application and moves the application to an idle CPU, so every reply
//! became a cross-CPU wake-up again. Measured (10,000 creates, 2 vCPUs): 30k
//! migrations and 0.5-1.1 s without, under 100 migrations and 0.42 s with.
//! With every CPU busy (3 spinning processes per CPU) a create took 83-88 us
//! on average instead of 70-72 us, and the tail (p99, max) did not change.
//! Switching policy costs 3.7 us a pair here, so light requests (lookups,
//! attributes, xattrs: `fuse_wire::is_light`) are served still SCHED_IDLE;
//! the rest switch to SCHED_OTHER first. Measured on 2 vCPUs: a GETATTR
//! round trip p50 20 -> 15-18 us, p99 40-58 -> 28-31 us, 5,000 creates
//! 0.95-1.02 -> 0.73-0.83 s; with 6 spinning processes the p999/max tail
//! is the same as switching for every request (about 4 ms / 5-9 ms).

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};
use tracing::{debug, info, warn};

use crate::fs::LayerFs;
use crate::fuse_wire::{self, HEADER_SIZE};
use crate::sys::uring::{pin_to_cpu, Ring, UringCmd};
use crate::sys::{set_sched_policy, SchedPolicy};

const FUSE_IO_URING_CMD_REGISTER: u32 = 1;
const FUSE_IO_URING_CMD_COMMIT_AND_FETCH: u32 = 2;

/// Threads per online CPU's queue at least (offline ones get one).
const MIN_THREADS_PER_QUEUE: usize = 2;

/// Payload buffer per entry: at least the kernel's largest request or
/// reply (max_write and max_pages are 1 MiB, see `fuse_dev::init`).
const PAYLOAD_SIZE: usize = (1 << 20) + 4096;

const PARAM: &str = "/sys/module/fuse/parameters/enable_uring";

/// What INIT decided, for the mount to start the queues after it.
#[derive(Default)]
pub struct Negotiated {
    state: Mutex<Option<bool>>,
    cv: Condvar,
}

impl Negotiated {
    /// `used`: io_uring was requested and the kernel agreed.
    pub fn set(&self, used: bool) {
        *self.state.lock() = Some(used);
        self.cv.notify_all();
    }

    /// Wait for INIT: Some(used) once it was answered.
    pub fn wait(&self, timeout: Duration) -> Option<bool> {
        let deadline = Instant::now() + timeout;
        let mut s = self.state.lock();
        while s.is_none() {
            if self.cv.wait_until(&mut s, deadline).timed_out() {
                break;
            }
        }
        *s
    }
}

/// The `uring=` mount option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Use it when the kernel offers it (its `enable_uring` parameter is on).
    Auto,
    /// Turn the kernel's `enable_uring` parameter on if needed, then use it.
    On,
    Off,
}

/// Before mounting: whether to ask for io_uring at INIT. `On` turns the
/// kernel's switch on (root only); failing that, one log line and the
/// `/dev/fuse` path.
pub fn prepare(mode: Mode) -> bool {
    let enabled = || {
        std::fs::read_to_string(PARAM)
            .map(|s| s.trim() == "Y")
            .unwrap_or(false)
    };
    match mode {
        Mode::Off => false,
        Mode::Auto => enabled(),
        Mode::On => {
            if enabled() {
                return true;
            }
            match std::fs::write(PARAM, "Y") {
                Ok(()) => {
                    info!("turned on the kernel's FUSE io_uring support ({PARAM})");
                    true
                }
                Err(e) => {
                    warn!(err = %e, "FUSE over io_uring unavailable (needs Linux 6.14 with {PARAM}); using /dev/fuse");
                    false
                }
            }
        }
    }
}

/// Possible CPUs (the kernel makes one queue per possible CPU) and which
/// of them are online.
fn cpus() -> (usize, Vec<bool>) {
    let parse = |path: &str| -> Vec<usize> {
        let s = std::fs::read_to_string(path).unwrap_or_default();
        let mut v = Vec::new();
        for part in s.trim().split(',').filter(|p| !p.is_empty()) {
            let mut it = part.splitn(2, '-');
            let a: Option<usize> = it.next().and_then(|x| x.parse().ok());
            let b = it.next().and_then(|x| x.parse().ok()).or(a);
            if let (Some(a), Some(b)) = (a, b) {
                v.extend(a..=b);
            }
        }
        v
    };
    let possible = parse("/sys/devices/system/cpu/possible");
    let n = possible.iter().max().map_or(1, |m| m + 1);
    let online = parse("/sys/devices/system/cpu/online");
    let mut on = vec![false; n];
    for c in online {
        if c < n {
            on[c] = true;
        }
    }
    (n, on)
}

/// The running queue threads; they end when the connection goes away.
pub struct Queues {
    threads: Vec<JoinHandle<()>>,
}

impl Queues {
    pub fn join(self) {
        for t in self.threads {
            let _ = t.join();
        }
    }
}

/// Start the queues on the connection `dev` (after INIT agreed to io_uring).
/// `threads`: the mount's request threads, shared out over the online CPUs'
/// queues (at least two each, so that one slow request, an fsync or a big
/// copy-up, does not hold up the next one from that CPU).
pub fn start(fs: Arc<LayerFs>, dev: Arc<OwnedFd>, threads: usize) -> io::Result<Queues> {
    let (n, online) = cpus();
    let n_online = online.iter().filter(|&&o| o).count().max(1);
    let per_online = threads.div_ceil(n_online).max(MIN_THREADS_PER_QUEUE);
    let mut threads = Vec::new();
    for (qid, &on) in online.iter().enumerate().take(n) {
        let per = if on { per_online } else { 1 };
        for t in 0..per {
            let (fs, dev) = (fs.clone(), dev.clone());
            let h = std::thread::Builder::new()
                .name(format!("ring-{qid}.{t}"))
                .spawn(move || {
                    if on {
                        if let Err(e) = pin_to_cpu(qid) {
                            debug!(qid, err = %e, "cannot pin a ring thread");
                        }
                    }
                    match serve_queue(&fs, &dev, qid as u16) {
                        Ok(()) => debug!(qid, "ring thread done"),
                        Err(e) => warn!(qid, err = %e, "ring thread stopped"),
                    }
                })?;
            threads.push(h);
        }
    }
    info!(queues = n, "FUSE requests go through io_uring queues");
    Ok(Queues { threads })
}

/// One entry's buffers; they stay at one address while registered.
struct Entry {
    header: Box<[u8]>,
    payload: Box<[u8]>,
    iov: Box<[libc::iovec; 2]>,
}

fn cmd_req(qid: u16, commit_id: u64) -> [u8; 80] {
    // struct fuse_uring_cmd_req: flags u64, commit_id u64, qid u16.
    let mut c = [0u8; 80];
    c[8..16].copy_from_slice(&commit_id.to_ne_bytes());
    c[16..18].copy_from_slice(&qid.to_ne_bytes());
    c
}

fn serve_queue(fs: &LayerFs, dev: &OwnedFd, qid: u16) -> io::Result<()> {
    let mut ring = Ring::new(4)?;
    let mut e = Entry {
        header: vec![0u8; HEADER_SIZE].into_boxed_slice(),
        payload: vec![0u8; PAYLOAD_SIZE].into_boxed_slice(),
        iov: Box::new(
            [libc::iovec {
                iov_base: std::ptr::null_mut(),
                iov_len: 0,
            }; 2],
        ),
    };
    e.iov[0] = libc::iovec {
        iov_base: e.header.as_mut_ptr().cast(),
        iov_len: e.header.len(),
    };
    e.iov[1] = libc::iovec {
        iov_base: e.payload.as_mut_ptr().cast(),
        iov_len: e.payload.len(),
    };
    let register = |ring: &mut Ring, e: &Entry| {
        ring.push(&UringCmd {
            fd: dev.as_fd(),
            cmd_op: FUSE_IO_URING_CMD_REGISTER,
            addr: e.iov.as_ptr() as u64,
            len: 2,
            user_data: 0,
            cmd: cmd_req(qid, 0),
        })
    };
    register(&mut ring, &e)?;
    // The kernel accepts registrations only once it has processed the INIT
    // reply; until then it answers EAGAIN.
    let deadline = Instant::now() + Duration::from_secs(5);
    // Waiting (and committing the reply, in the same call) as SCHED_IDLE:
    // the scheduler then sees this CPU as free when the reply wakes the
    // application, and runs it here instead of moving it to another CPU
    // (whose wake-up, in a VM, costs more than the request). Root only:
    // leaving SCHED_IDLE needs CAP_SYS_NICE.
    let mut yield_cpu = crate::sys::geteuid() == 0;
    // Whether this thread is SCHED_IDLE now: light requests are served
    // without the two policy switches (a few microseconds each in a VM,
    // a sixth of a round trip); anything that may run long (copy-up,
    // data, listings, fsync) leaves SCHED_IDLE first, so it cannot starve
    // behind busy processes.
    let mut idle = false;
    loop {
        if yield_cpu && !idle {
            yield_cpu = set_sched_policy(SchedPolicy::Idle).is_ok();
            idle = yield_cpu;
        }
        ring.submit_and_wait()?;
        while let Some(c) = ring.next_completion() {
            match c.res {
                0 => {
                    let light =
                        fuse_wire::header(&e.header).is_ok_and(|h| fuse_wire::is_light(h.opcode));
                    if idle && !light {
                        if let Err(e) = set_sched_policy(SchedPolicy::Other) {
                            warn!(qid, err = %e, "cannot leave SCHED_IDLE; the queue thread stops");
                            return Err(e);
                        }
                        idle = false;
                    }
                    let commit_id = fuse_wire::serve(fs, &mut e.header, &mut e.payload)?;
                    ring.push(&UringCmd {
                        fd: dev.as_fd(),
                        cmd_op: FUSE_IO_URING_CMD_COMMIT_AND_FETCH,
                        addr: 0,
                        len: 0,
                        user_data: 0,
                        cmd: cmd_req(qid, commit_id),
                    })?;
                }
                r if r == -libc::EAGAIN && Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2));
                    register(&mut ring, &e)?;
                }
                // The connection is gone (unmounted or aborted).
                r if r == -libc::ENOTCONN || r == -libc::ECANCELED || r == -libc::ENODEV => {
                    return Ok(())
                }
                r => return Err(io::Error::from_raw_os_error(-r)),
            }
        }
    }
}
