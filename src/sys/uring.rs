//! A minimal io_uring: one ring per thread, 128-byte SQEs, used only to
//! carry FUSE requests (`IORING_OP_URING_CMD` on `/dev/fuse`). Written here
//! rather than taken from a crate because the io-uring crate ships no
//! bindings for s390x, the platform layerfs runs on; the ring ABI itself is
//! the same on every architecture (native byte order, fixed layouts).

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU32, Ordering};

const IORING_SETUP_SQE128: u32 = 1 << 10;
const IORING_FEAT_SINGLE_MMAP: u32 = 1;
const IORING_OFF_SQ_RING: i64 = 0;
const IORING_OFF_CQ_RING: i64 = 0x800_0000;
const IORING_OFF_SQES: i64 = 0x1000_0000;
const IORING_ENTER_GETEVENTS: u32 = 1;
const IORING_OP_URING_CMD: u8 = 46;
const SQE_SIZE: usize = 128;
const CQE_SIZE: usize = 16;

#[repr(C)]
#[derive(Default)]
struct SqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    flags: u32,
    dropped: u32,
    array: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct CqOffsets {
    head: u32,
    tail: u32,
    ring_mask: u32,
    ring_entries: u32,
    overflow: u32,
    cqes: u32,
    flags: u32,
    resv1: u32,
    user_addr: u64,
}

#[repr(C)]
#[derive(Default)]
struct Params {
    sq_entries: u32,
    cq_entries: u32,
    flags: u32,
    sq_thread_cpu: u32,
    sq_thread_idle: u32,
    features: u32,
    wq_fd: u32,
    resv: [u32; 3],
    sq_off: SqOffsets,
    cq_off: CqOffsets,
}

struct Map {
    ptr: *mut u8,
    len: usize,
}

impl Map {
    fn new(fd: BorrowedFd<'_>, len: usize, off: i64) -> io::Result<Map> {
        // SAFETY: a fresh shared mapping of the ring's own fd; checked below.
        let p = unsafe {
            libc::mmap(
                ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                off,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Map { ptr: p.cast(), len })
    }

    /// A pointer `off` bytes into the mapping (offsets come from the kernel).
    fn at<T>(&self, off: u32) -> *mut T {
        debug_assert!((off as usize) < self.len);
        // SAFETY: `off` lies inside the mapping (kernel-given ring offsets).
        unsafe { self.ptr.add(off as usize).cast() }
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One completion: the `user_data` of its submission and the result
/// (negative errno on failure).
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    pub user_data: u64,
    pub res: i32,
}

/// A `IORING_OP_URING_CMD` submission: `cmd` is the 80-byte command area.
pub struct UringCmd<'a> {
    pub fd: BorrowedFd<'a>,
    pub cmd_op: u32,
    /// `sqe->addr` and `sqe->len` (FUSE: an iovec array and its length).
    pub addr: u64,
    pub len: u32,
    pub user_data: u64,
    pub cmd: [u8; 80],
}

pub struct Ring {
    fd: OwnedFd,
    // The mappings stay alive as long as the pointers below.
    _sq: Map,
    _cq: Option<Map>,
    sqes: Map,
    sq_tail: *const AtomicU32,
    sq_head: *const AtomicU32,
    sq_mask: u32,
    sq_entries: u32,
    sq_array: *mut u32,
    cq_head: *const AtomicU32,
    cq_tail: *const AtomicU32,
    cq_mask: u32,
    cqes: *const u8,
    /// Queued but not yet handed to the kernel.
    unsubmitted: u32,
}

// The ring is used by the one thread that owns it; moving it there is fine.
unsafe impl Send for Ring {}

impl Ring {
    pub fn new(entries: u32) -> io::Result<Ring> {
        let mut p = Params {
            flags: IORING_SETUP_SQE128,
            ..Default::default()
        };
        // SAFETY: io_uring_setup fills `p`, which outlives the call.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_io_uring_setup,
                entries as libc::c_long,
                &mut p as *mut Params,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel just returned this descriptor to us alone.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let sq_len = p.sq_off.array as usize + p.sq_entries as usize * 4;
        let cq_len = p.cq_off.cqes as usize + p.cq_entries as usize * CQE_SIZE;
        let single = p.features & IORING_FEAT_SINGLE_MMAP != 0;
        let bfd = fd.as_fd();
        let sq = Map::new(
            bfd,
            if single { sq_len.max(cq_len) } else { sq_len },
            IORING_OFF_SQ_RING,
        )?;
        let cq = if single {
            None
        } else {
            Some(Map::new(bfd, cq_len, IORING_OFF_CQ_RING)?)
        };
        let sqes = Map::new(bfd, p.sq_entries as usize * SQE_SIZE, IORING_OFF_SQES)?;
        let cqm = cq.as_ref().unwrap_or(&sq);
        // SAFETY (all reads below): offsets and masks come from the kernel
        // for these mappings.
        let sq_mask = unsafe { *sq.at::<u32>(p.sq_off.ring_mask) };
        let cq_mask = unsafe { *cqm.at::<u32>(p.cq_off.ring_mask) };
        Ok(Ring {
            sq_tail: sq.at(p.sq_off.tail),
            sq_head: sq.at(p.sq_off.head),
            sq_array: sq.at(p.sq_off.array),
            sq_mask,
            sq_entries: p.sq_entries,
            cq_head: cqm.at(p.cq_off.head),
            cq_tail: cqm.at(p.cq_off.tail),
            cqes: cqm.at(p.cq_off.cqes),
            cq_mask,
            unsubmitted: 0,
            fd,
            _sq: sq,
            _cq: cq,
            sqes,
        })
    }

    /// Queue one command; `submit_and_wait` hands it to the kernel.
    pub fn push(&mut self, c: &UringCmd<'_>) -> io::Result<()> {
        // SAFETY: only this thread writes the tail; the kernel writes the head.
        let tail = unsafe { (*self.sq_tail).load(Ordering::Relaxed) };
        let head = unsafe { (*self.sq_head).load(Ordering::Acquire) };
        if tail.wrapping_sub(head) >= self.sq_entries {
            return Err(io::Error::from_raw_os_error(libc::EBUSY));
        }
        let idx = tail & self.sq_mask;
        let mut sqe = [0u8; SQE_SIZE];
        sqe[0] = IORING_OP_URING_CMD;
        sqe[4..8].copy_from_slice(&c.fd.as_raw_fd().to_ne_bytes());
        sqe[8..12].copy_from_slice(&c.cmd_op.to_ne_bytes());
        sqe[16..24].copy_from_slice(&c.addr.to_ne_bytes());
        sqe[24..28].copy_from_slice(&c.len.to_ne_bytes());
        sqe[32..40].copy_from_slice(&c.user_data.to_ne_bytes());
        sqe[48..128].copy_from_slice(&c.cmd);
        // SAFETY: slot `idx` of the SQE array is ours until the tail moves
        // past it; the array and SQEs are inside their mappings.
        unsafe {
            ptr::copy_nonoverlapping(
                sqe.as_ptr(),
                self.sqes.ptr.add(idx as usize * SQE_SIZE),
                SQE_SIZE,
            );
            *self.sq_array.add(idx as usize) = idx;
            (*self.sq_tail).store(tail.wrapping_add(1), Ordering::Release);
        }
        self.unsubmitted += 1;
        Ok(())
    }

    /// Submit what was queued and sleep until at least one completion is
    /// there. Interrupted waits are retried.
    pub fn submit_and_wait(&mut self) -> io::Result<()> {
        loop {
            // SAFETY: io_uring_enter on our own ring, no signal mask.
            let r = unsafe {
                libc::syscall(
                    libc::SYS_io_uring_enter,
                    self.fd.as_raw_fd() as libc::c_long,
                    self.unsubmitted as libc::c_long,
                    1 as libc::c_long,
                    IORING_ENTER_GETEVENTS as libc::c_long,
                    ptr::null::<libc::sigset_t>(),
                    0 as libc::c_long,
                )
            };
            if r >= 0 {
                self.unsubmitted = self.unsubmitted.saturating_sub(r as u32);
                return Ok(());
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }

    /// Take the next completion, if any.
    pub fn next_completion(&mut self) -> Option<Completion> {
        // SAFETY: the kernel publishes the tail with release semantics; we
        // own the head. CQE slots below the tail are complete.
        unsafe {
            let head = (*self.cq_head).load(Ordering::Relaxed);
            let tail = (*self.cq_tail).load(Ordering::Acquire);
            if head == tail {
                return None;
            }
            let p = self.cqes.add((head & self.cq_mask) as usize * CQE_SIZE);
            let mut b = [0u8; CQE_SIZE];
            ptr::copy_nonoverlapping(p, b.as_mut_ptr(), CQE_SIZE);
            (*self.cq_head).store(head.wrapping_add(1), Ordering::Release);
            Some(Completion {
                user_data: u64::from_ne_bytes(b[0..8].try_into().unwrap_or_default()),
                res: i32::from_ne_bytes(b[8..12].try_into().unwrap_or_default()),
            })
        }
    }
}

/// Pin the calling thread to one CPU (best effort: an offline CPU fails).
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET bounds-checks
    // against the set size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if cpu >= libc::CPU_SETSIZE as usize {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}
