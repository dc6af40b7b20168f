//! The control service of a mounted union: answers protocol requests from
//! the journal and the checkpoint store. Access is checked by the server
//! (peer credentials) before a request gets here.

use std::io;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use super::proto::{ApiError, ErrorCode, Handler, Op, Peer, Status};
use crate::checkpoint::Checkpoints;
use crate::journal::Journal;

pub struct Service {
    pub mountpoint: PathBuf,
    pub lowers: Vec<PathBuf>,
    pub upper: Option<PathBuf>,
    pub statedir: Option<PathBuf>,
    pub journal: Arc<Journal>,
    pub checkpoints: Arc<Checkpoints>,
}

fn to_value<T: serde::Serialize>(v: T) -> Result<Value, ApiError> {
    serde_json::to_value(v).map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))
}

fn bad_query(e: io::Error) -> ApiError {
    if e.kind() == io::ErrorKind::InvalidInput {
        ApiError::new(ErrorCode::BadRequest, e.to_string())
    } else {
        e.into()
    }
}

/// Journal records sent per event batch while catching up a follower.
const FOLLOW_BATCH: u64 = 1000;

impl Service {
    fn status(&self) -> Result<Status, ApiError> {
        let (total, free) = self.checkpoints_fs_usage().unwrap_or_default();
        let mut health = Vec::new();
        if self.journal.failed() {
            health.push("journal writes failed (disk full?): changes since are not recorded");
        }
        if total > 0 && free < total / 20 {
            health.push("overlay partition is over 95% full");
        }
        Ok(Status {
            mountpoint: self.mountpoint.display().to_string(),
            lowers: self
                .lowers
                .iter()
                .map(|p| p.display().to_string())
                .collect(),
            upper: self.upper.as_ref().map(|p| p.display().to_string()),
            statedir: self.statedir.as_ref().map(|p| p.display().to_string()),
            // Records still queued count: a caller that just made a change sees it.
            journal_seq: {
                self.journal.flush();
                self.journal.last_seq()
            },
            last_checkpoint: self.checkpoints.last()?,
            checkpoints: self.checkpoints.count()?,
            store_bytes: self.checkpoints.store().total_bytes()?,
            overlay_total_bytes: total,
            overlay_free_bytes: free,
            health: if health.is_empty() {
                "ok".into()
            } else {
                health.join("; ")
            },
            version: env!("CARGO_PKG_VERSION").into(),
        })
    }

    fn checkpoints_fs_usage(&self) -> io::Result<(u64, u64)> {
        let Some(u) = &self.upper else {
            return Ok((0, 0));
        };
        let fd = crate::sys::open_root(u)?;
        let s = crate::sys::fstatvfs(std::os::fd::AsFd::as_fd(&fd))?;
        Ok((s.f_blocks * s.f_frsize, s.f_bavail * s.f_frsize))
    }

    fn follow(
        &self,
        from_seq: u64,
        events: &mut dyn FnMut(Value) -> io::Result<()>,
    ) -> Result<Value, ApiError> {
        let mut next = from_seq.max(1);
        loop {
            let last = self.journal.last_seq();
            while next <= last {
                let to = (next + FOLLOW_BATCH - 1).min(last);
                let mut batch = Vec::new();
                self.journal.scan(next, to, |r| {
                    batch.push(r);
                    true
                })?;
                for r in batch {
                    if events(to_value(r.to_api())?).is_err() {
                        // The client left: the stream ends here.
                        return Ok(json!({ "next_seq": r.seq }));
                    }
                }
                next = to + 1;
            }
            self.journal.wait_after(last, Duration::from_secs(1));
            // A heartbeat lets a vanished client be noticed while idle.
            if self.journal.last_seq() == last && events(json!({ "heartbeat": last })).is_err() {
                return Ok(json!({ "next_seq": next }));
            }
        }
    }
}

impl Handler for Service {
    fn handle(
        &self,
        _peer: &Peer,
        op: Op,
        events: &mut dyn FnMut(Value) -> io::Result<()>,
    ) -> Result<Value, ApiError> {
        match op {
            Op::Status => to_value(self.status()?),
            Op::Journal { query } => {
                let recs = self.journal.query(&query).map_err(bad_query)?;
                to_value(recs.iter().map(|r| r.to_api()).collect::<Vec<_>>())
            }
            Op::Follow { from_seq } => self.follow(from_seq, events),
            Op::CheckpointCreate { name, message } => {
                to_value(self.checkpoints.create(name, message)?)
            }
            Op::CheckpointList => to_value(self.checkpoints.list()?),
            Op::CheckpointShow { name } => to_value(self.checkpoints.show(&name)?),
            Op::CheckpointDiff { a, b } => to_value(self.checkpoints.diff(&a, b.as_deref())?),
            Op::CheckpointDelete { name } => to_value(self.checkpoints.delete(&name)?),
            Op::Rollback { name } => to_value(self.checkpoints.rollback(&name)?),
            Op::Restore { name, paths } => to_value(self.checkpoints.restore(&name, &paths)?),
            Op::Verify => to_value(self.checkpoints.verify()?),
            Op::Prune { policy } => to_value(self.checkpoints.prune(&policy)?),
        }
    }
}
