//! The audit log: one record per call (local API and coordinator alike),
//! stored durably in RocksDB at `state_dir/audit`.
//!
//! Format (version 1): key = sequence number, u64 big-endian (so keys sort in
//! call order); value = one version byte (1) followed by the record's JSON.
//! Records of denied and state-changing calls are written with a synced WAL
//! (they survive a power loss once the call has answered); read-only calls
//! are written through the WAL without fsync (they survive a crash of
//! layerd, and a power loss only if the OS wrote them back).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};

use anyhow::Context;
use rocksdb::{ColumnFamilyDescriptor, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use crate::{Caller, Role};

/// Filter for the audit log; every field narrows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditQuery {
    pub since_ns: Option<i64>,
    pub until_ns: Option<i64>,
    pub uid: Option<u32>,
    pub op: Option<String>,
    /// Only denied calls.
    pub denied: bool,
    pub limit: Option<u64>,
}

/// Records returned when the query sets no limit, and the most it may ask for.
pub const DEFAULT_LIMIT: u64 = 1000;
pub const MAX_LIMIT: u64 = 100_000;
pub const FORMAT_VERSION: u8 = 1;
const CF_AUDIT: &str = "audit";
/// Records carry the call's start time but are numbered at its end, so the
/// time order can differ from the key order by up to the longest call (and
/// by clock steps): a backwards scan stops only this far before `since_ns`.
const TIME_SLACK_NS: i64 = 24 * 3600 * 1_000_000_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditResult {
    Ok,
    Denied,
    Error,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// Assigned by `AuditLog::append` (0 before).
    pub seq: u64,
    /// When the call started (Unix ns).
    pub time_ns: i64,
    pub caller: Caller,
    /// The caller's role at the time (None: no grant).
    pub role: Option<Role>,
    /// "checkpoint_create", "follow", ...
    pub op: String,
    /// Mount name, for operations on one mount.
    pub mount: Option<String>,
    /// The operation's arguments (the `AgentOp`'s fields).
    pub args: serde_json::Value,
    pub result: AuditResult,
    pub error: Option<String>,
    pub duration_ms: f64,
}

impl AuditRecord {
    fn matches(&self, q: &AuditQuery) -> bool {
        if q.since_ns.is_some_and(|t| self.time_ns < t)
            || q.until_ns.is_some_and(|t| self.time_ns > t)
        {
            return false;
        }
        if let Some(u) = q.uid {
            if !matches!(self.caller, Caller::Local { uid, .. } if uid == u) {
                return false;
            }
        }
        if q.op.as_deref().is_some_and(|o| o != self.op) {
            return false;
        }
        !(q.denied && self.result != AuditResult::Denied)
    }
}

pub struct AuditLog {
    db: Arc<DB>,
    path: PathBuf,
    next_seq: Arc<AtomicU64>,
    /// To the writer thread (see `record`); None once dropping.
    writer: Option<mpsc::Sender<Pending>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Drop for AuditLog {
    /// Stop the writer (it finishes what is queued) so the database is
    /// closed when this returns and can be opened again.
    fn drop(&mut self) {
        self.writer.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A record (numbered and encoded by its caller, so the writer thread
/// only writes) waiting for the writer thread, and who waits for it.
struct Pending {
    seq: u64,
    value: Vec<u8>,
    sync: bool,
    done: oneshot::Sender<Result<(), String>>,
}

/// Most records the writer puts in one write.
const MAX_BATCH: usize = 1024;

impl AuditLog {
    /// Open (or create) the audit database at `dir` (created 0700: the
    /// arguments of calls are nobody else's business).
    pub fn open(dir: &Path) -> anyhow::Result<AuditLog> {
        std::os::unix::fs::DirBuilderExt::mode(std::fs::DirBuilder::new().recursive(true), 0o700)
            .create(dir)
            .with_context(|| format!("cannot create the audit directory {}", dir.display()))?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Small footprint: a guest, small records.
        opts.set_write_buffer_size(4 << 20);
        opts.set_max_write_buffer_number(2);
        opts.set_max_open_files(64);
        opts.set_keep_log_file_num(2);
        opts.set_max_total_wal_size(16 << 20);
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        let cfs = [ColumnFamilyDescriptor::new(CF_AUDIT, Options::default())];
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            let s = e.to_string();
            if s.contains("lock") || s.contains("Resource temporarily unavailable") {
                anyhow::anyhow!(
                    "the audit log {} is in use by another process (is another layerd running with this state_dir?): {s}",
                    dir.display()
                )
            } else {
                anyhow::anyhow!("cannot open the audit log {}: {s}", dir.display())
            }
        })?;
        let last = {
            let cf = db
                .cf_handle(CF_AUDIT)
                .context("audit column family missing")?;
            match db.iterator_cf(&cf, IteratorMode::End).next() {
                Some(Ok((k, _))) => u64::from_be_bytes(k.as_ref().try_into().unwrap_or([0; 8])),
                Some(Err(e)) => anyhow::bail!("cannot read the audit log {}: {e}", dir.display()),
                None => 0,
            }
        };
        let db = Arc::new(db);
        let next_seq = Arc::new(AtomicU64::new(last + 1));
        let (tx, rx) = mpsc::channel();
        let thread = {
            let (db, path) = (db.clone(), dir.to_path_buf());
            std::thread::Builder::new()
                .name("audit-writer".into())
                .spawn(move || write_batches(&db, &path, rx))
                .context("cannot start the audit writer thread")?
        };
        Ok(AuditLog {
            db,
            path: dir.to_path_buf(),
            next_seq,
            writer: Some(tx),
            thread: Some(thread),
        })
    }

    /// Store `rec` under the next sequence number (returned) and return once
    /// it is written (`sync`: and the WAL synced). Concurrent callers share
    /// writes (one WAL write, and one fsync, per batch): this is how calls
    /// are audited.
    pub async fn record(&self, mut rec: AuditRecord, sync: bool) -> anyhow::Result<u64> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        rec.seq = seq;
        let mut value = Vec::with_capacity(512);
        value.push(FORMAT_VERSION);
        serde_json::to_writer(&mut value, &rec)?;
        let (done, rx) = oneshot::channel();
        self.writer
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("the audit log is closing"))?
            .send(Pending {
                seq,
                value,
                sync,
                done,
            })
            .map_err(|_| anyhow::anyhow!("the audit writer thread is gone"))?;
        match rx.await {
            Ok(r) => r.map(|_| seq).map_err(|e| anyhow::anyhow!("{e}")),
            Err(_) => anyhow::bail!("the audit writer thread is gone"),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Highest sequence number handed out (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.next_seq.load(Ordering::SeqCst) - 1
    }

    /// Store `rec` under the next sequence number (returned); `sync`: fsync
    /// the WAL before returning.
    pub fn append(&self, mut rec: AuditRecord, sync: bool) -> anyhow::Result<u64> {
        let seq = self.next_seq.fetch_add(1, Ordering::SeqCst);
        rec.seq = seq;
        let mut value = vec![FORMAT_VERSION];
        serde_json::to_writer(&mut value, &rec)?;
        let cf = self
            .db
            .cf_handle(CF_AUDIT)
            .context("audit column family missing")?;
        let mut wo = WriteOptions::default();
        wo.set_sync(sync);
        self.db
            .put_cf_opt(&cf, seq.to_be_bytes(), value, &wo)
            .with_context(|| format!("cannot write to the audit log {}", self.path.display()))?;
        Ok(seq)
    }

    /// The most recent `limit` records matching `q`, oldest first.
    pub fn query(&self, q: &AuditQuery) -> anyhow::Result<Vec<AuditRecord>> {
        let limit = q.limit.unwrap_or(DEFAULT_LIMIT).min(MAX_LIMIT) as usize;
        let cf = self
            .db
            .cf_handle(CF_AUDIT)
            .context("audit column family missing")?;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(&cf, IteratorMode::End) {
            if out.len() >= limit {
                break;
            }
            let (k, v) =
                item.with_context(|| format!("cannot read the audit log {}", self.path.display()))?;
            let rec = match decode(&v) {
                Ok(r) => r,
                Err(e) => {
                    let seq = k.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
                    tracing::warn!(seq, "unreadable audit record skipped: {e}");
                    continue;
                }
            };
            if q.since_ns
                .is_some_and(|t| rec.time_ns < t.saturating_sub(TIME_SLACK_NS))
            {
                break;
            }
            if rec.matches(q) {
                out.push(rec);
            }
        }
        out.reverse();
        Ok(out)
    }
}

/// The writer thread: takes what is queued (at most `MAX_BATCH`), writes
/// it in one batch (synced if any record asks for it), answers. Ends when
/// the `AuditLog` is dropped.
fn write_batches(db: &DB, path: &Path, rx: mpsc::Receiver<Pending>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let r = match db.cf_handle(CF_AUDIT) {
            None => Err("audit column family missing".to_string()),
            Some(cf) => {
                let mut wb = WriteBatch::default();
                for p in &batch {
                    wb.put_cf(&cf, p.seq.to_be_bytes(), &p.value);
                }
                let mut wo = WriteOptions::default();
                wo.set_sync(batch.iter().any(|p| p.sync));
                db.write_opt(wb, &wo)
                    .map_err(|e| format!("cannot write to the audit log {}: {e}", path.display()))
            }
        };
        for p in batch {
            let _ = p.done.send(r.clone());
        }
    }
}

fn decode(v: &[u8]) -> anyhow::Result<AuditRecord> {
    match v.split_first() {
        Some((&FORMAT_VERSION, json)) => Ok(serde_json::from_slice(json)?),
        Some((other, _)) => {
            anyhow::bail!("record format version {other}, this layerd reads {FORMAT_VERSION}")
        }
        None => anyhow::bail!("empty record"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(uid: u32, op: &str, result: AuditResult, t: i64) -> AuditRecord {
        AuditRecord {
            seq: 0,
            time_ns: t,
            caller: Caller::Local {
                uid,
                gid: uid,
                pid: 7,
                groups: vec![],
            },
            role: Some(Role::Monitor),
            op: op.into(),
            mount: Some("root".into()),
            args: serde_json::json!({"name": "x"}),
            result,
            error: None,
            duration_ms: 0.5,
        }
    }

    #[test]
    fn append_query_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state/audit");
        {
            let log = AuditLog::open(&p).unwrap();
            assert_eq!(log.last_seq(), 0);
            assert_eq!(
                log.append(rec(1, "status", AuditResult::Ok, 10), false)
                    .unwrap(),
                1
            );
            assert_eq!(
                log.append(rec(2, "checkpoint_create", AuditResult::Denied, 20), true)
                    .unwrap(),
                2
            );
            log.append(rec(1, "rollback", AuditResult::Error, 30), true)
                .unwrap();
        }
        let log = AuditLog::open(&p).unwrap();
        assert_eq!(log.last_seq(), 3);
        let all = log.query(&AuditQuery::default()).unwrap();
        assert_eq!(all.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![1, 2, 3]);
        assert_eq!(all[1].op, "checkpoint_create");
        let q = |f: fn(&mut AuditQuery)| {
            let mut q = AuditQuery::default();
            f(&mut q);
            log.query(&q)
                .unwrap()
                .iter()
                .map(|r| r.seq)
                .collect::<Vec<_>>()
        };
        assert_eq!(q(|q| q.uid = Some(1)), vec![1, 3]);
        assert_eq!(q(|q| q.denied = true), vec![2]);
        assert_eq!(q(|q| q.op = Some("rollback".into())), vec![3]);
        assert_eq!(q(|q| q.since_ns = Some(15)), vec![2, 3]);
        assert_eq!(q(|q| q.until_ns = Some(20)), vec![1, 2]);
        // The most recent ones, oldest first.
        assert_eq!(q(|q| q.limit = Some(2)), vec![2, 3]);
        assert_eq!(
            log.append(rec(1, "status", AuditResult::Ok, 40), false)
                .unwrap(),
            4
        );
        // Stored format: version byte, then JSON.
        let cf = log.db.cf_handle(CF_AUDIT).unwrap();
        let v = log.db.get_cf(&cf, 4u64.to_be_bytes()).unwrap().unwrap();
        assert_eq!(v[0], 1);
        let j: serde_json::Value = serde_json::from_slice(&v[1..]).unwrap();
        assert_eq!(j["result"], "ok");
        assert_eq!(j["caller"]["kind"], "local");
    }

    #[test]
    fn concurrent_records_are_batched_and_numbered() {
        let dir = tempfile::tempdir().unwrap();
        let log = Arc::new(AuditLog::open(dir.path()).unwrap());
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        let mut seqs: Vec<u64> = rt.block_on(async {
            let tasks: Vec<_> = (0..200)
                .map(|i| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let r = rec(i, "status", AuditResult::Ok, i as i64);
                        log.record(r, i % 50 == 0).await.unwrap()
                    })
                })
                .collect();
            let mut v = Vec::new();
            for t in tasks {
                v.push(t.await.unwrap());
            }
            v
        });
        seqs.sort();
        assert_eq!(seqs, (1..=200).collect::<Vec<_>>());
        let all = log
            .query(&AuditQuery {
                limit: Some(1000),
                ..Default::default()
            })
            .unwrap();
        assert_eq!(all.len(), 200);
        // Each record is stored under the number it was given.
        for r in &all {
            let Caller::Local { uid, .. } = r.caller else {
                panic!()
            };
            assert_eq!(r.time_ns, uid as i64);
        }
        assert_eq!(log.last_seq(), 200);
    }

    #[test]
    fn second_opener_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _a = AuditLog::open(dir.path()).unwrap();
        let e = AuditLog::open(dir.path()).err().unwrap().to_string();
        assert!(e.contains("in use"), "{e}");
    }
}
