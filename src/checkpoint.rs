//! Checkpoints of the upper layer and rollback to them, while mounted.
//!
//! A checkpoint is a root tree in the object store (`store`) plus a record
//! in the state database. `head` says which tree the upper equals, up to
//! the journal records after `head.seq`: a new checkpoint re-reads only the
//! paths those records name (and files open for writing), so its cost grows
//! with what changed, not with the size of the overlay.
//!
//! Capture and rollback hold the union's gate exclusively: FUSE requests
//! wait, so no request sees (or makes) a half-captured or half-rolled-back
//! state. Data written through kernel passthrough by a process that keeps a
//! file open is captured as the file is at that moment.
//!
//! Crash safety: a checkpoint exists once its record is written (after its
//! objects are synced); unreferenced objects are swept by the next delete or
//! prune. A rollback writes an intent first (the saved current tree and the
//! target); if the daemon dies midway, the next mount finishes it.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::control::proto::{
    ApiError, CheckpointInfo, DiffEntry, ErrorCode, PruneReport, Retention, RollbackReport,
    VerifyProblem, VerifyReport,
};
use crate::files::{Handles, OpenFile};
use crate::journal::{self, now_ns, Journal, Op, Record, CF_CHECKPOINTS};
use crate::store::apply::{self, ApplyOptions};
use crate::store::capture::{self, Depth};
use crate::store::diff::{self, ChangeKind};
use crate::store::objects::{self, ObjectStore};
use crate::store::{Entry, Hash, Payload};
use crate::union::Union;

const REC_VERSION: u8 = 1;
const META_HEAD: &str = "head";
const META_INTENT: &str = "rollback-intent";

/// A checkpoint record as stored (version byte, then JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointRec {
    name: String,
    root: String,
    time_ns: i64,
    message: Option<String>,
    seq: u64,
    files: u64,
    dirs: u64,
    others: u64,
    bytes: u64,
    auto: bool,
}

/// The tree the upper equals, up to journal records after `seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Head {
    root: String,
    seq: u64,
    /// Totals of `root` (so an incremental capture knows the new totals).
    #[serde(default)]
    totals: Option<[u64; 4]>,
}

fn pack(t: &capture::Totals) -> [u64; 4] {
    [t.files, t.dirs, t.others, t.bytes]
}

fn unpack(a: [u64; 4]) -> capture::Totals {
    capture::Totals {
        files: a[0],
        dirs: a[1],
        others: a[2],
        bytes: a[3],
    }
}

/// A rollback or restore in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Intent {
    current: String,
    target: String,
    /// Restore: only these paths.
    only: Option<Vec<Vec<u8>>>,
    checkpoint: String,
}

fn encode<T: Serialize>(v: &T) -> io::Result<Vec<u8>> {
    let mut o = vec![REC_VERSION];
    serde_json::to_writer(&mut o, v).map_err(io::Error::other)?;
    Ok(o)
}

fn decode<T: for<'a> Deserialize<'a>>(b: &[u8]) -> io::Result<T> {
    match b.split_first() {
        Some((&REC_VERSION, rest)) => {
            serde_json::from_slice(rest).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
        }
        Some((v, _)) => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("state record of unknown version {v}"),
        )),
        None => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "empty state record",
        )),
    }
}

fn root_of(hex: &str) -> io::Result<Hash> {
    objects::parse_hex(hex)
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad tree hash in state"))
}

fn db_err(e: rocksdb::Error) -> io::Error {
    io::Error::other(format!("state database: {e}"))
}

/// Names an operator can type and a shell need not quote.
pub fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 64
        && !n.starts_with(['.', '-'])
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-:@+".contains(&b))
}

fn kind_name(e: &Entry) -> &'static str {
    diff::kind_name(e)
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1000.0
}

/// What the kernel must forget after the upper changed underneath it.
pub trait Invalidate: Send + Sync {
    fn entry(&self, parent: u64, name: &std::ffi::OsStr);
    fn inode(&self, ino: u64);
}

pub struct Checkpoints {
    union: Arc<Union>,
    files: Arc<Handles<OpenFile>>,
    journal: Arc<Journal>,
    store: ObjectStore,
    /// One state-changing operation at a time (create, rollback, delete...).
    op_lock: Mutex<()>,
    retention: Retention,
    sync: bool,
    kernel: Mutex<Option<Box<dyn Invalidate>>>,
}

impl Checkpoints {
    pub fn open(
        union: Arc<Union>,
        files: Arc<Handles<OpenFile>>,
        journal: Arc<Journal>,
        state: BorrowedFd<'_>,
        retention: Retention,
    ) -> io::Result<Checkpoints> {
        let store = ObjectStore::open(state)?;
        let sync = !union.volatile;
        Ok(Checkpoints {
            union,
            files,
            journal,
            store,
            op_lock: Mutex::new(()),
            retention,
            sync,
            kernel: Mutex::new(None),
        })
    }

    pub fn set_kernel(&self, k: Box<dyn Invalidate>) {
        *self.kernel.lock() = Some(k);
    }

    pub fn store(&self) -> &ObjectStore {
        &self.store
    }

    fn upper(&self) -> Result<BorrowedFd<'_>, ApiError> {
        self.union.layers.upper_root().ok_or_else(|| {
            ApiError::new(
                ErrorCode::ReadOnly,
                "this mount has no upper layer: nothing to checkpoint",
            )
        })
    }

    fn head(&self) -> io::Result<Option<Head>> {
        self.journal
            .meta_get(META_HEAD)?
            .map(|b| decode(&b))
            .transpose()
    }

    fn records(&self) -> io::Result<Vec<CheckpointRec>> {
        let db = self.journal.db();
        let cf = db
            .cf_handle(CF_CHECKPOINTS)
            .ok_or_else(|| io::Error::other("checkpoint column family missing"))?;
        let mut out = Vec::new();
        for item in db.iterator_cf(&cf, rocksdb::IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            match decode::<CheckpointRec>(&v) {
                Ok(r) => out.push(r),
                Err(e) => warn!(name = %String::from_utf8_lossy(&k), err = %e,
                                "skipping an unreadable checkpoint record"),
            }
        }
        out.sort_by_key(|r| (r.time_ns, r.name.clone()));
        Ok(out)
    }

    fn record(&self, name: &str) -> Result<CheckpointRec, ApiError> {
        let db = self.journal.db();
        let cf = db.cf_handle(CF_CHECKPOINTS).ok_or_else(|| {
            ApiError::new(ErrorCode::Internal, "checkpoint column family missing")
        })?;
        match db.get_cf(&cf, name.as_bytes()).map_err(db_err)? {
            Some(v) => Ok(decode(&v)?),
            None => Err(ApiError::new(
                ErrorCode::NotFound,
                format!("no checkpoint named '{name}' (see `checkpoint list`)"),
            )),
        }
    }

    /// Write records and meta keys in one synced batch.
    fn commit(
        &self,
        recs: &[&CheckpointRec],
        deletes: &[&str],
        meta: &[(&str, Option<Vec<u8>>)],
    ) -> io::Result<()> {
        let db = self.journal.db();
        let cf = db
            .cf_handle(CF_CHECKPOINTS)
            .ok_or_else(|| io::Error::other("checkpoint column family missing"))?;
        let mcf = db
            .cf_handle(journal::CF_META)
            .ok_or_else(|| io::Error::other("meta column family missing"))?;
        let mut b = WriteBatch::default();
        for r in recs {
            b.put_cf(&cf, r.name.as_bytes(), encode(r)?);
        }
        for d in deletes {
            b.delete_cf(&cf, d.as_bytes());
        }
        for (k, v) in meta {
            match v {
                Some(v) => b.put_cf(&mcf, k.as_bytes(), v),
                None => b.delete_cf(&mcf, k.as_bytes()),
            }
        }
        let mut wo = rocksdb::WriteOptions::default();
        wo.set_sync(true);
        db.write_opt(b, &wo).map_err(db_err)
    }

    /// Paths that may differ from `head`'s tree: journal records after
    /// `from` up to `to`, and files open for writing now (passthrough writes
    /// never reach the daemon).
    fn dirty(&self, from: u64, to: u64) -> io::Result<BTreeMap<Vec<u8>, Depth>> {
        let mut d: BTreeMap<Vec<u8>, Depth> = BTreeMap::new();
        let mut add = |p: &[u8], deep: bool| {
            let e = d.entry(p.to_vec()).or_insert(Depth::Shallow);
            if deep {
                *e = Depth::Deep;
            }
        };
        if to > from {
            self.journal.scan(from + 1, to, |r| {
                add(&r.path, r.op.deep());
                if let Some(p2) = &r.path2 {
                    add(p2, r.op.deep());
                }
                true
            })?;
        }
        for f in self.files.filter(|f| f.writable) {
            if let Some(p) = self.union.path_of(f.ino) {
                add(&p, false);
            }
        }
        Ok(d)
    }

    /// Capture the upper as it is now (gate held by the caller). Returns the
    /// root, the journal seq it includes, and the capture's totals.
    /// Capture outside the pause first: new data is stored and hashed while
    /// writers run, so the capture under the pause only re-reads what changed
    /// in between. Its result is thrown away (unreferenced objects are swept).
    fn prepare(&self) -> capture::HashCache {
        let cache = capture::HashCache::default();
        let t = Instant::now();
        if let Err(e) = self.capture_now(Some(&cache)) {
            // The real capture will report it, under the pause.
            tracing::debug!(err = %e, "capture outside the pause failed");
        }
        tracing::debug!(ms = ms(t), "capture outside the pause");
        cache
    }

    fn capture_now(
        &self,
        cache: Option<&capture::HashCache>,
    ) -> Result<(Hash, u64, capture::Totals), ApiError> {
        let upper = self.upper()?;
        // Under the gate nothing new is queued: after this, the journal is complete.
        self.journal.flush();
        let seq = self.journal.last_seq();
        let head = self.head()?;
        let (base, dirty) = match &head {
            Some(h) => (Some(root_of(&h.root)?), self.dirty(h.seq, seq)?),
            None => (None, BTreeMap::new()),
        };
        let (root, stats) =
            capture::capture_cached(&self.store, upper, base.as_ref(), &dirty, cache)?;
        let base_totals = match (&head, &base) {
            (
                Some(Head {
                    totals: Some(t), ..
                }),
                _,
            ) => Some(unpack(*t)),
            // A head written without totals: count its tree once.
            (_, Some(b)) if !stats.complete => Some(capture::totals(&self.store, b)?),
            _ => None,
        };
        let totals = stats.totals(base_totals).unwrap_or_default();
        Ok((root, seq, totals))
    }

    fn unique_name(&self, prefix: &str) -> Result<String, ApiError> {
        let base = format!("{prefix}{}", utc_stamp(now_ns()));
        let mut n = base.clone();
        let mut i = 1;
        while self.record(&n).is_ok() {
            i += 1;
            n = format!("{base}.{i}");
        }
        Ok(n)
    }

    pub fn create(
        &self,
        name: Option<String>,
        message: Option<String>,
    ) -> Result<CheckpointInfo, ApiError> {
        let t0 = Instant::now();
        let _op = self.op_lock.lock();
        let name = match name {
            Some(n) if !valid_name(&n) => {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("invalid checkpoint name '{n}': use 1-64 letters, digits and ._-:@+, not starting with '.' or '-'"),
                ))
            }
            Some(n) => {
                if self.record(&n).is_ok() {
                    return Err(ApiError::new(
                        ErrorCode::Exists,
                        format!("a checkpoint named '{n}' exists; pick another name or delete it first"),
                    ));
                }
                n
            }
            None => self.unique_name("cp-")?,
        };
        let cache = self.prepare();
        let gate = self.union.gate.write();
        let th = Instant::now();
        let captured = self.capture_now(Some(&cache));
        drop(gate);
        let hold_ms = ms(th);
        let (root, seq, stats) = captured?;
        // Objects first, then the record that makes them a checkpoint.
        self.store.sync()?;
        let rec = CheckpointRec {
            name: name.clone(),
            root: objects::hex(&root),
            time_ns: now_ns(),
            message,
            seq,
            files: stats.files,
            dirs: stats.dirs,
            others: stats.others,
            bytes: stats.bytes,
            auto: false,
        };
        let head = encode(&Head {
            root: rec.root.clone(),
            seq,
            totals: Some(pack(&stats)),
        })?;
        self.commit(&[&rec], &[], &[(META_HEAD, Some(head))])?;
        let took_ms = ms(t0);
        info!(checkpoint = %name, files = stats.files, hold_ms, took_ms, "checkpoint created");
        if self.retention != Retention::default() {
            let policy = self.retention.clone();
            if let Err(e) = self.prune_locked(&policy) {
                warn!(err = %e, "automatic retention failed");
            }
        }
        let mut info = to_info(&rec);
        info.hold_ms = Some(hold_ms);
        info.took_ms = Some(took_ms);
        Ok(info)
    }

    pub fn list(&self) -> Result<Vec<CheckpointInfo>, ApiError> {
        Ok(self.records()?.iter().map(to_info).collect())
    }

    pub fn show(&self, name: &str) -> Result<CheckpointInfo, ApiError> {
        Ok(to_info(&self.record(name)?))
    }

    pub fn last(&self) -> io::Result<Option<String>> {
        Ok(self
            .records()?
            .into_iter()
            .rfind(|r| !r.auto)
            .map(|r| r.name))
    }

    pub fn count(&self) -> io::Result<u64> {
        Ok(self.records()?.len() as u64)
    }

    /// Changes from `a` to `b` (None: the live state).
    pub fn diff(&self, a: &str, b: Option<&str>) -> Result<Vec<DiffEntry>, ApiError> {
        let ra = root_of(&self.record(a)?.root)?;
        let rb = match b {
            Some(b) => root_of(&self.record(b)?.root)?,
            None => {
                let _op = self.op_lock.lock();
                let cache = self.prepare();
                let gate = self.union.gate.write();
                let r = self.capture_now(Some(&cache));
                drop(gate);
                r?.0
            }
        };
        let changes = diff::diff(&self.store, Some(&ra), &rb)?;
        Ok(changes
            .into_iter()
            .map(|c| {
                let e = c.new.as_ref().or(c.old.as_ref());
                // A whiteout appearing in the upper is a deletion in the union.
                let (change, kind) = match (c.kind, e) {
                    (ChangeKind::Added, Some(e)) if e.is_whiteout() => ("deleted", "whiteout"),
                    (ChangeKind::Deleted, Some(e)) if e.is_whiteout() => ("added", "whiteout"),
                    (ChangeKind::Added, Some(e)) => ("added", kind_name(e)),
                    (ChangeKind::Modified, Some(e)) => ("modified", kind_name(e)),
                    (ChangeKind::Deleted, Some(e)) => ("deleted", kind_name(e)),
                    (_, None) => ("modified", "file"),
                };
                let size = |e: &Option<Entry>| e.as_ref().filter(|e| !e.is_dir()).map(|e| e.size);
                let hash = |e: &Option<Entry>| match e.as_ref().map(|e| &e.payload) {
                    Some(Payload::File(h)) => Some(objects::hex(h)),
                    _ => None,
                };
                DiffEntry {
                    change: change.into(),
                    path: journal::show_path(&c.path),
                    kind: kind.into(),
                    old_size: size(&c.old),
                    new_size: size(&c.new),
                    old_hash: hash(&c.old),
                    new_hash: hash(&c.new),
                }
            })
            .collect())
    }

    pub fn delete(&self, name: &str) -> Result<PruneReport, ApiError> {
        let _op = self.op_lock.lock();
        self.record(name)?;
        self.commit(&[], &[name], &[])?;
        let freed = self.sweep()?;
        info!(checkpoint = %name, freed, "checkpoint deleted");
        Ok(PruneReport {
            deleted: vec![name.to_string()],
            kept: self.records()?.into_iter().map(|r| r.name).collect(),
            freed_bytes: freed,
        })
    }

    pub fn prune(&self, policy: &Retention) -> Result<PruneReport, ApiError> {
        let _op = self.op_lock.lock();
        self.prune_locked(policy)
    }

    fn prune_locked(&self, policy: &Retention) -> Result<PruneReport, ApiError> {
        let recs = self.records()?;
        let keep = retention_keep(&recs, policy);
        let (kept, gone): (Vec<_>, Vec<_>) = recs.into_iter().partition(|r| keep.contains(&r.name));
        let names: Vec<&str> = gone.iter().map(|r| r.name.as_str()).collect();
        if !names.is_empty() {
            self.commit(&[], &names, &[])?;
        }
        let freed = if names.is_empty() { 0 } else { self.sweep()? };
        if !names.is_empty() {
            info!(deleted = names.len(), freed, "retention applied");
        }
        Ok(PruneReport {
            deleted: gone.into_iter().map(|r| r.name).collect(),
            kept: kept.into_iter().map(|r| r.name).collect(),
            freed_bytes: freed,
        })
    }

    /// Remove objects no checkpoint (and not the head) references.
    fn sweep(&self) -> io::Result<u64> {
        let mut roots: Vec<Hash> = self
            .records()?
            .iter()
            .filter_map(|r| objects::parse_hex(&r.root))
            .collect();
        if let Some(h) = self.head()? {
            roots.extend(objects::parse_hex(&h.root));
        }
        if let Some(i) = self.intent()? {
            roots.extend(objects::parse_hex(&i.current));
            roots.extend(objects::parse_hex(&i.target));
        }
        let (live, problems) = objects::reachable(&self.store, &roots);
        if !problems.is_empty() {
            // Never delete what an unreadable tree might reference.
            warn!(
                problems = problems.len(),
                "not sweeping: some trees are unreadable (run verify)"
            );
            return Ok(0);
        }
        let mut freed = 0;
        for h in self.store.list()? {
            if !live.contains_key(&h) {
                freed += self.store.size(&h).unwrap_or(0);
                self.store.remove(&h)?;
            }
        }
        Ok(freed)
    }

    fn intent(&self) -> io::Result<Option<Intent>> {
        self.journal
            .meta_get(META_INTENT)?
            .map(|b| decode(&b))
            .transpose()
    }

    /// Make the union exactly checkpoint `name`; the state before is kept as
    /// an automatic checkpoint, so the rollback can itself be rolled back.
    pub fn rollback(&self, name: &str) -> Result<RollbackReport, ApiError> {
        self.switch(name, None)
    }

    /// Bring back `paths` as they are in checkpoint `name`.
    pub fn restore(&self, name: &str, paths: &[String]) -> Result<RollbackReport, ApiError> {
        if paths.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "restore needs at least one path",
            ));
        }
        let mut only = Vec::new();
        for p in paths {
            let rel = p.trim_matches('/');
            if rel
                .split('/')
                .any(|c| c == ".." || c == "." || c.is_empty())
                && !rel.is_empty()
            {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!(
                        "invalid path '{p}': give a path inside the union, without '.' or '..'"
                    ),
                ));
            }
            only.push(rel.as_bytes().to_vec());
        }
        self.switch(name, Some(only))
    }

    fn switch(&self, name: &str, only: Option<Vec<Vec<u8>>>) -> Result<RollbackReport, ApiError> {
        let t0 = Instant::now();
        let _op = self.op_lock.lock();
        let target_rec = self.record(name)?;
        root_of(&target_rec.root)?;
        let upper = self.upper()?;
        let work = self.union.layers.work()?;
        let cache = self.prepare();
        let gate = self.union.gate.write();
        let th = Instant::now();
        // Save the current state: the roll-forward point.
        let (current, seq, stats) = self.capture_now(Some(&cache))?;
        self.store.sync()?;
        let saved = CheckpointRec {
            name: self.unique_name(if only.is_some() {
                "pre-restore-"
            } else {
                "pre-rollback-"
            })?,
            root: objects::hex(&current),
            time_ns: now_ns(),
            message: Some(format!(
                "automatic: the state before {} {name}",
                if only.is_some() {
                    "restore from"
                } else {
                    "rollback to"
                }
            )),
            seq,
            files: stats.files,
            dirs: stats.dirs,
            others: stats.others,
            bytes: stats.bytes,
            auto: true,
        };
        let intent = Intent {
            current: saved.root.clone(),
            target: target_rec.root.clone(),
            only: only.clone(),
            checkpoint: name.to_string(),
        };
        self.commit(&[&saved], &[], &[(META_INTENT, Some(encode(&intent)?))])?;
        let changed = self.finish(upper, work, &intent)?;
        // Node states are fixed before any request runs again.
        let stale = self.union.revalidate(&changed);
        let hold_ms = ms(th);
        drop(gate);
        self.tell_kernel(&stale);
        info!(checkpoint = %name, changed = changed.len(), hold_ms, saved = %saved.name,
              restore = only.is_some(), "switched the upper to a checkpoint");
        Ok(RollbackReport {
            checkpoint: name.to_string(),
            saved_as: Some(saved.name),
            changed_paths: changed.len() as u64,
            hold_ms,
            took_ms: ms(t0),
        })
    }

    /// Apply an intent (again, after a crash: apply is idempotent), record
    /// it in the journal, move the head, clear the intent. Gate held.
    fn finish(
        &self,
        upper: BorrowedFd<'_>,
        work: BorrowedFd<'_>,
        intent: &Intent,
    ) -> Result<Vec<Vec<u8>>, ApiError> {
        let current = root_of(&intent.current)?;
        let target = root_of(&intent.target)?;
        // Data is synced once below, not per file.
        let opts = ApplyOptions { sync: false };
        let changed = apply::apply(
            &self.store,
            upper,
            work,
            Some(&current),
            &target,
            intent.only.as_deref(),
            &opts,
        )?;
        if self.sync {
            // The root descriptor is O_PATH; syncfs needs a real one.
            let d = crate::sys::reopen(upper, libc::O_RDONLY | libc::O_DIRECTORY)?;
            crate::sys::syncfs(d.as_fd())?;
        }
        let op = if intent.only.is_some() {
            Op::Restore
        } else {
            Op::Rollback
        };
        let paths: Vec<Vec<u8>> = match &intent.only {
            Some(o) => o.clone(),
            None => vec![Vec::new()],
        };
        let mut seq = 0;
        for p in &paths {
            seq = self.journal.append(Record {
                seq: 0,
                time_ns: now_ns(),
                op,
                path: p.clone(),
                path2: None,
                uid: 0,
                gid: 0,
                pid: std::process::id(),
                comm: b"layerfs".to_vec(),
                detail: Some(format!("checkpoint {}", intent.checkpoint)),
                also: 0,
            })?;
        }
        // A full rollback makes the upper exactly the target; a restore
        // leaves the head where it was (its paths are now journaled as dirty).
        let head = if intent.only.is_none() {
            let t = self
                .record(&intent.checkpoint)
                .ok()
                .map(|r| [r.files, r.dirs, r.others, r.bytes]);
            Some(encode(&Head {
                root: intent.target.clone(),
                seq,
                totals: t,
            })?)
        } else {
            None
        };
        let mut meta = vec![(META_INTENT, None)];
        if let Some(h) = head {
            meta.push((META_HEAD, Some(h)));
        }
        self.commit(&[], &[], &meta)?;
        Ok(changed)
    }

    /// At mount: finish a rollback a crash interrupted.
    pub fn recover(&self) -> io::Result<()> {
        let Some(intent) = self.intent()? else {
            return Ok(());
        };
        let (Some(upper), Ok(work)) = (self.union.layers.upper_root(), self.union.layers.work())
        else {
            return Ok(());
        };
        warn!(checkpoint = %intent.checkpoint, "finishing a rollback interrupted by a crash");
        self.finish(upper, work, &intent)
            .map_err(|e| io::Error::other(e.message))?;
        info!(checkpoint = %intent.checkpoint, "interrupted rollback finished");
        Ok(())
    }

    /// After a crash: anything in the upper changed since shortly before the
    /// last journal record may have no record (the daemon died between the
    /// change and its record, or while a passthrough writer had the file
    /// open). Record such paths as `recovered`, so the journal explains the
    /// upper and the next checkpoint re-reads them. Walks the upper once.
    pub fn repair_journal(&self) -> io::Result<()> {
        let last = self.journal.last_seq();
        let Some(upper) = self.union.layers.upper_root() else {
            return Ok(());
        };
        // A new journal: the first checkpoint reads the whole upper anyway.
        if last == 0 && self.head()?.is_none() {
            return Ok(());
        }
        let t_last = self.journal.get(last)?.map(|r| r.time_ns).unwrap_or(0);
        // Timestamps are coarse (jiffies) on some filesystems: a margin.
        let since = t_last - 2_000_000_000;
        let mut found: Vec<Vec<u8>> = Vec::new();
        let root = crate::sys::openat(
            upper,
            std::ffi::OsStr::new("."),
            libc::O_PATH | libc::O_DIRECTORY,
            0,
        )?;
        let mut stack: Vec<(std::os::fd::OwnedFd, Vec<u8>)> = vec![(root, Vec::new())];
        while let Some((dir, path)) = stack.pop() {
            for e in crate::sys::read_dir_all(dir.as_fd())? {
                let name = std::ffi::OsStr::from_bytes(&e.name);
                let st = match crate::sys::fstatat(dir.as_fd(), name) {
                    Ok(st) => st,
                    Err(_) => continue,
                };
                let p = crate::layers::join(&path, &e.name);
                let ctime = st.st_ctime * 1_000_000_000 + st.st_ctime_nsec;
                if ctime >= since {
                    found.push(p.clone());
                }
                if st.st_mode & libc::S_IFMT == libc::S_IFDIR {
                    let sub = crate::sys::openat(
                        dir.as_fd(),
                        name,
                        libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                        0,
                    )?;
                    stack.push((sub, p));
                }
            }
        }
        found.sort();
        for p in &found {
            self.journal.append(Record {
                seq: 0,
                time_ns: now_ns(),
                op: Op::Recovered,
                path: p.clone(),
                path2: None,
                uid: 0,
                gid: 0,
                pid: 0,
                comm: b"?".to_vec(),
                detail: Some("changed around a crash of the daemon; who made it is unknown".into()),
                also: 0,
            })?;
        }
        if found.is_empty() {
            info!("the previous daemon stopped uncleanly; the journal explains the upper");
        } else {
            warn!(
                paths = found.len(),
                "the previous daemon stopped uncleanly; recorded changes found in the upper as 'recovered'"
            );
        }
        Ok(())
    }

    /// Outside the gate: the kernel may need a request served to drop an entry.
    fn tell_kernel(&self, r: &crate::union::Revalidated) {
        if let Some(k) = self.kernel.lock().as_ref() {
            for (p, n) in &r.entries {
                k.entry(*p, n);
            }
            for i in &r.inodes {
                k.inode(*i);
            }
        }
    }

    /// Take a checkpoint every `every` while something changed since the
    /// last one (automatic retention then applies as after any checkpoint).
    pub fn spawn_periodic(self: &Arc<Self>, every: std::time::Duration) -> io::Result<()> {
        let me = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("checkpoint-timer".into())
            .spawn(move || loop {
                std::thread::sleep(every);
                let Some(cp) = me.upgrade() else { return };
                let changed = match cp.head() {
                    Ok(Some(h)) => cp.journal.last_seq() > h.seq,
                    Ok(None) => true,
                    Err(_) => false,
                };
                if changed {
                    let msg = Some("automatic (checkpoint_every)".to_string());
                    match cp
                        .unique_name("auto-")
                        .and_then(|n| cp.create(Some(n), msg))
                    {
                        Ok(i) => info!(checkpoint = %i.name, "periodic checkpoint taken"),
                        Err(e) => warn!(err = %e, "periodic checkpoint failed"),
                    }
                }
            })?;
        Ok(())
    }

    /// Re-hash every stored object reachable from a checkpoint.
    pub fn verify(&self) -> Result<VerifyReport, ApiError> {
        let mut seen = std::collections::HashSet::new();
        let mut report = VerifyReport {
            objects: 0,
            bytes: 0,
            problems: vec![],
        };
        for r in self.records()? {
            let Some(root) = objects::parse_hex(&r.root) else {
                continue;
            };
            let (objs, bad_trees) = objects::reachable(&self.store, &[root]);
            for (h, path, err) in bad_trees {
                report.problems.push(VerifyProblem {
                    checkpoint: r.name.clone(),
                    path,
                    object: objects::hex(&h),
                    problem: err,
                });
            }
            for (h, (_, path)) in objs {
                if !seen.insert(h) {
                    continue;
                }
                report.objects += 1;
                report.bytes += self.store.size(&h).unwrap_or(0);
                let problem = match self.store.verify(&h) {
                    Ok(true) => continue,
                    Ok(false) => "corrupt".to_string(),
                    Err(e) if e.kind() == io::ErrorKind::NotFound => "missing".to_string(),
                    Err(e) => format!("unreadable: {e}"),
                };
                report.problems.push(VerifyProblem {
                    checkpoint: r.name.clone(),
                    path,
                    object: objects::hex(&h),
                    problem,
                });
            }
        }
        Ok(report)
    }
}

fn to_info(r: &CheckpointRec) -> CheckpointInfo {
    CheckpointInfo {
        name: r.name.clone(),
        id: r.root.clone(),
        time_ns: r.time_ns,
        message: r.message.clone(),
        seq: r.seq,
        files: r.files,
        dirs: r.dirs,
        others: r.others,
        bytes: r.bytes,
        auto: r.auto,
        hold_ms: None,
        took_ms: None,
    }
}

/// Which checkpoints a retention policy keeps (names).
fn retention_keep(recs: &[CheckpointRec], p: &Retention) -> std::collections::HashSet<String> {
    let mut keep = std::collections::HashSet::new();
    let newest_first: Vec<&CheckpointRec> = recs.iter().rev().collect();
    if let Some(n) = p.keep_last {
        for r in newest_first.iter().take(n as usize) {
            keep.insert(r.name.clone());
        }
    }
    let sec = 1_000_000_000i64;
    for (n, width) in [
        (p.keep_hourly, 3600 * sec),
        (p.keep_daily, 86400 * sec),
        (p.keep_weekly, 7 * 86400 * sec),
    ] {
        let Some(n) = n else { continue };
        let mut buckets = std::collections::HashSet::new();
        for r in &newest_first {
            if buckets.len() >= n as usize {
                break;
            }
            // The newest checkpoint of each period stands for it.
            if buckets.insert(r.time_ns.div_euclid(width)) {
                keep.insert(r.name.clone());
            }
        }
    }
    keep
}

/// "20261125-101500" (UTC) for default checkpoint names.
pub fn utc_stamp(ns: i64) -> String {
    let secs = ns.div_euclid(1_000_000_000);
    let days = secs.div_euclid(86400);
    let rem = secs.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}-{:02}{:02}{:02}",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(name: &str, t: i64) -> CheckpointRec {
        CheckpointRec {
            name: name.into(),
            root: String::new(),
            time_ns: t * 1_000_000_000,
            message: None,
            seq: 0,
            files: 0,
            dirs: 0,
            others: 0,
            bytes: 0,
            auto: false,
        }
    }

    #[test]
    fn names_and_dates() {
        assert!(valid_name("before-upgrade_2.1"));
        assert!(!valid_name("../x"));
        assert!(!valid_name("-rf"));
        assert!(!valid_name(""));
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(utc_stamp(1_764_065_700 * 1_000_000_000), "20251125-101500");
    }

    #[test]
    fn retention_policy() {
        // One per 10 minutes over 3 hours.
        let recs: Vec<_> = (0..18).map(|i| rec(&format!("c{i}"), i * 600)).collect();
        let keep = retention_keep(
            &recs,
            &Retention {
                keep_last: Some(2),
                ..Default::default()
            },
        );
        assert_eq!(keep.len(), 2);
        assert!(keep.contains("c17") && keep.contains("c16"));
        let keep = retention_keep(
            &recs,
            &Retention {
                keep_hourly: Some(2),
                ..Default::default()
            },
        );
        // Newest of hours 2 and 1.
        assert_eq!(keep.len(), 2);
        assert!(keep.contains("c17") && keep.contains("c11"));
        assert!(retention_keep(&recs, &Retention::default()).is_empty());
    }
}
