//! layerfs-ctl: the admin command line of a mounted layerfs. It talks to the
//! mount's control socket: status, the change journal, checkpoints, rollback,
//! restore, verify and prune.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::exit;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{CommandFactory, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::Value;

use layerfs::control::client::{Client, ClientError};
use layerfs::control::proto::{
    CheckpointInfo, DiffEntry, ErrorCode, JournalQuery, JournalRecord, Op, PruneReport, Retention,
    RollbackReport, Status, VerifyReport,
};

const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  the operation failed
  2  usage error (bad arguments)
  3  cannot reach the control socket (not mounted, no upperdir, server gone)
  4  permission denied (the control socket is for root, or its group, only)
  5  not found (no such checkpoint or path)
  6  verify found corruption (each problem is printed)

The mount is chosen with -m MOUNTPOINT, -s SOCKET, or the LAYERFS_SOCKET
environment variable. Times are printed in UTC (ending in 'Z').";

const TIME_HELP: &str =
    "2026-11-25T10:00:00Z (no offset: UTC), 10m / 2h / 3d / 1w ago, or unix seconds";

/// Journal operation names (`--op`).
const OPS: &[&str] = &[
    "create",
    "mkdir",
    "mknod",
    "symlink",
    "link",
    "write",
    "truncate",
    "fallocate",
    "unlink",
    "rmdir",
    "rename",
    "chmod",
    "chown",
    "utimes",
    "setxattr",
    "removexattr",
    "rollback",
    "restore",
    "recovered",
];

#[derive(Parser)]
#[command(
    name = "layerfs-ctl",
    version,
    about = "Inspect and control a mounted layerfs: journal, checkpoints, rollback",
    after_help = EXIT_CODES
)]
struct Cli {
    /// Mountpoint of the layerfs to talk to (finds its control socket).
    #[arg(
        short = 'm',
        long = "mount",
        value_name = "MOUNTPOINT",
        global = true,
        conflicts_with = "socket"
    )]
    mount: Option<PathBuf>,
    /// Path of the control socket (default: $LAYERFS_SOCKET).
    #[arg(short = 's', long = "socket", value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// Print results as JSON (follow: one record per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount, layers, journal position, checkpoints, space, health.
    Status,
    /// Show journal records (oldest first); every option narrows the result.
    Log(LogArgs),
    /// Print journal records as they are written (Ctrl-C to stop).
    Follow {
        /// Start at this sequence number (default: only new records).
        #[arg(long, value_name = "N")]
        from_seq: Option<u64>,
    },
    /// Create, list, show, compare and delete checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// Make the union exactly checkpoint NAME (the current state is saved first).
    Rollback { name: String },
    /// Bring back PATHs (union paths such as /etc/hosts) as they are in checkpoint NAME.
    Restore {
        name: String,
        #[arg(required = true, value_name = "PATH")]
        paths: Vec<String>,
    },
    /// Re-hash every stored object; exit 6 if any is missing or corrupt.
    Verify,
    /// Delete checkpoints not kept by any of the given rules.
    Prune(PruneArgs),
}

#[derive(clap::Args)]
struct LogArgs {
    /// Records at or after this time [T: 2026-11-25T10:00:00Z, 10m, 2h, 3d, unix seconds].
    #[arg(long, value_name = "T", value_parser = parse_time)]
    since: Option<i64>,
    /// Records at or before this time.
    #[arg(long, value_name = "T", value_parser = parse_time)]
    until: Option<i64>,
    /// Union path prefix: /etc matches /etc and everything below it.
    #[arg(long, value_name = "PREFIX")]
    path: Option<String>,
    /// Only these operations (repeat, or separate with commas).
    #[arg(long = "op", value_name = "OP", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(OPS))]
    ops: Vec<String>,
    /// Process name (comm), exact.
    #[arg(long, value_name = "NAME")]
    comm: Option<String>,
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// Records with sequence number >= N.
    #[arg(long, value_name = "N")]
    from_seq: Option<u64>,
    /// At most N records (server default 1000, at most 100000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100000))]
    limit: Option<u64>,
}

#[derive(Subcommand)]
enum CheckpointCmd {
    /// Snapshot the upper layer now (writes are held only briefly).
    Create {
        #[arg(long, value_name = "NAME")]
        name: Option<String>,
        #[arg(long, value_name = "TEXT")]
        message: Option<String>,
    },
    /// All checkpoints, oldest first.
    List,
    /// Details of one checkpoint.
    Show { name: String },
    /// What changed from checkpoint A to B (default: to the live state).
    Diff { a: String, b: Option<String> },
    /// Delete a checkpoint (objects no other checkpoint uses are freed).
    Delete { name: String },
}

#[derive(clap::Args)]
struct PruneArgs {
    /// Keep the N newest checkpoints.
    #[arg(long, value_name = "N")]
    keep_last: Option<u32>,
    /// Keep the newest checkpoint of each of the last N hours.
    #[arg(long, value_name = "N")]
    keep_hourly: Option<u32>,
    /// Keep the newest checkpoint of each of the last N days.
    #[arg(long, value_name = "N")]
    keep_daily: Option<u32>,
    /// Keep the newest checkpoint of each of the last N weeks.
    #[arg(long, value_name = "N")]
    keep_weekly: Option<u32>,
}

fn main() {
    let cli = Cli::parse();
    let socket = match (&cli.socket, &cli.mount) {
        (Some(s), _) => s.clone(),
        (None, Some(m)) => layerfs::control::socket_path_for(m),
        (None, None) => match std::env::var_os("LAYERFS_SOCKET").filter(|s| !s.is_empty()) {
            Some(s) => PathBuf::from(s),
            None => Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "say which mount: -m MOUNTPOINT or -s SOCKET (or set LAYERFS_SOCKET)",
                )
                .exit(),
        },
    };
    if let Cmd::Prune(p) = &cli.cmd {
        if p.keep_last.is_none()
            && p.keep_hourly.is_none()
            && p.keep_daily.is_none()
            && p.keep_weekly.is_none()
        {
            Cli::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "prune needs at least one --keep-* rule (with none, every checkpoint would be deleted)",
                )
                .exit();
        }
    }
    if let Cmd::Restore { paths, .. } = &cli.cmd {
        if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
            Cli::command()
                .error(
                    clap::error::ErrorKind::ValueValidation,
                    format!("restore takes union paths starting with '/' (such as /etc/hosts), not '{p}'"),
                )
                .exit();
        }
    }
    let mut client = Client::connect(&socket).unwrap_or_else(|e| fail(&e));
    let code = run(&mut client, cli.cmd, cli.json).unwrap_or_else(|e| fail(&e));
    exit(code);
}

fn fail(e: &ClientError) -> ! {
    eprintln!("layerfs-ctl: {e}");
    exit(exit_code(e))
}

fn exit_code(e: &ClientError) -> i32 {
    match e {
        ClientError::Connect(_) | ClientError::Io(_) => 3,
        ClientError::Protocol(_) => 1,
        ClientError::Api(a) => match a.code {
            ErrorCode::PermissionDenied => 4,
            ErrorCode::NotFound => 5,
            ErrorCode::Corrupt => 6,
            ErrorCode::BadRequest => 2,
            _ => 1,
        },
    }
}

/// Runs one command; returns the exit code.
fn run(client: &mut Client, cmd: Cmd, json: bool) -> Result<i32, ClientError> {
    match cmd {
        Cmd::Status => {
            let v = client.call(Op::Status)?;
            show(json, v, |s: Status| render_status(&s))
        }
        Cmd::Log(a) => {
            let query = JournalQuery {
                from_seq: a.from_seq,
                since_ns: a.since,
                until_ns: a.until,
                path_prefix: a.path,
                ops: a.ops,
                comm: a.comm,
                uid: a.uid,
                limit: a.limit,
            };
            let v = client.call(Op::Journal { query })?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            let records: Vec<JournalRecord> = list_of(&v, "records")?;
            if records.is_empty() {
                eprintln!("no journal records match");
                return Ok(0);
            }
            out(&render_log(&records));
            if records.len() as u64 == a.limit.unwrap_or(1000) {
                let next = records.last().map_or(0, |r| r.seq + 1);
                eprintln!(
                    "(showing the first {} records; continue with --from-seq {next})",
                    records.len()
                );
            }
            Ok(0)
        }
        Cmd::Follow { from_seq } => follow(client, from_seq, json),
        Cmd::Checkpoint(c) => checkpoint(client, c, json),
        Cmd::Rollback { name } => {
            let v = call_with_progress(client, Op::Rollback { name })?;
            show(json, v, |r: RollbackReport| {
                let mut s = format!(
                    "rolled back to {}: {} path(s) changed (writes held {}, took {})\n",
                    clean(&r.checkpoint),
                    r.changed_paths,
                    fmt_ms(r.hold_ms),
                    fmt_ms(r.took_ms)
                );
                if let Some(saved) = &r.saved_as {
                    s.push_str(&format!(
                        "the state before is saved as checkpoint {0} (layerfs-ctl rollback {0} goes back)\n",
                        clean(saved)
                    ));
                }
                s
            })
        }
        Cmd::Restore { name, paths } => {
            let v = call_with_progress(client, Op::Restore { name, paths })?;
            show(json, v, |r: RollbackReport| {
                let mut s = format!(
                    "restored from checkpoint {}: {} path(s) changed (writes held {}, took {})\n",
                    clean(&r.checkpoint),
                    r.changed_paths,
                    fmt_ms(r.hold_ms),
                    fmt_ms(r.took_ms)
                );
                if let Some(saved) = &r.saved_as {
                    s.push_str(&format!(
                        "the state before is saved as checkpoint {}\n",
                        clean(saved)
                    ));
                }
                s
            })
        }
        Cmd::Verify => {
            let v = call_with_progress(client, Op::Verify)?;
            let r: VerifyReport = parse(&v)?;
            if json {
                print_json(&v);
            } else if r.problems.is_empty() {
                out(&format!(
                    "verified {} objects ({}): no problems\n",
                    r.objects,
                    fmt_bytes(r.bytes)
                ));
            } else {
                let mut t = Table::new(&["CHECKPOINT", "PATH", "OBJECT", "PROBLEM"], &[]);
                for p in &r.problems {
                    t.row(vec![
                        clean(&p.checkpoint),
                        clean(&p.path),
                        clean(&p.object),
                        clean(&p.problem),
                    ]);
                }
                out(&t.render());
            }
            if r.problems.is_empty() {
                Ok(0)
            } else {
                eprintln!(
                    "layerfs-ctl: verify found {} problem(s) in {} objects",
                    r.problems.len(),
                    r.objects
                );
                Ok(6)
            }
        }
        Cmd::Prune(p) => {
            let policy = Retention {
                keep_last: p.keep_last,
                keep_hourly: p.keep_hourly,
                keep_daily: p.keep_daily,
                keep_weekly: p.keep_weekly,
            };
            let v = client.call(Op::Prune { policy })?;
            show(json, v, |r: PruneReport| {
                let names = |l: &[String]| {
                    if l.is_empty() {
                        "-".to_string()
                    } else {
                        l.iter().map(|n| clean(n)).collect::<Vec<_>>().join(", ")
                    }
                };
                render_pairs(&[
                    (format!("deleted ({})", r.deleted.len()), names(&r.deleted)),
                    (format!("kept ({})", r.kept.len()), names(&r.kept)),
                    ("freed".to_string(), fmt_bytes(r.freed_bytes)),
                ])
            })
        }
    }
}

fn checkpoint(client: &mut Client, c: CheckpointCmd, json: bool) -> Result<i32, ClientError> {
    match c {
        CheckpointCmd::Create { name, message } => {
            let v = call_with_progress(client, Op::CheckpointCreate { name, message })?;
            show(json, v, |c: CheckpointInfo| {
                let mut s = format!(
                    "created checkpoint {} ({} files, {} dirs, {}; journal seq {})",
                    clean(&c.name),
                    c.files,
                    c.dirs,
                    fmt_bytes(c.bytes),
                    c.seq
                );
                if let (Some(h), Some(t)) = (c.hold_ms, c.took_ms) {
                    s.push_str(&format!("; writes held {}, took {}", fmt_ms(h), fmt_ms(t)));
                }
                s.push('\n');
                s
            })
        }
        CheckpointCmd::List => {
            let v = client.call(Op::CheckpointList)?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            let list: Vec<CheckpointInfo> = list_of(&v, "checkpoints")?;
            if list.is_empty() {
                eprintln!("no checkpoints");
                return Ok(0);
            }
            out(&render_list(&list));
            Ok(0)
        }
        CheckpointCmd::Show { name } => {
            let v = client.call(Op::CheckpointShow { name })?;
            show(json, v, |c: CheckpointInfo| render_show(&c))
        }
        CheckpointCmd::Diff { a, b } => {
            let v = client.call(Op::CheckpointDiff { a, b })?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            let entries: Vec<DiffEntry> = list_of(&v, "entries")?;
            if entries.is_empty() {
                eprintln!("no differences");
                return Ok(0);
            }
            out(&render_diff(&entries));
            Ok(0)
        }
        CheckpointCmd::Delete { name } => {
            let v = client.call(Op::CheckpointDelete { name: name.clone() })?;
            if json {
                print_json(&v);
                return Ok(0);
            }
            let mut s = format!("deleted checkpoint {}", clean(&name));
            if let Ok(r) = serde_json::from_value::<PruneReport>(v) {
                s.push_str(&format!(" (freed {})", fmt_bytes(r.freed_bytes)));
            }
            s.push('\n');
            out(&s);
            Ok(0)
        }
    }
}

fn follow(client: &mut Client, from_seq: Option<u64>, json: bool) -> Result<i32, ClientError> {
    let from_seq = match from_seq {
        Some(s) => s,
        None => {
            let st: Status = parse(&client.call(Op::Status)?)?;
            st.journal_seq + 1
        }
    };
    let mut bad: Option<ClientError> = None;
    let mut on_event = |ev: Value| -> bool {
        // Records come as they are (or wrapped as {"record": ...}); other
        // events (heartbeats, progress) only keep the stream alive.
        let rec = match ev {
            Value::Object(mut m) if m.contains_key("record") => {
                m.remove("record").unwrap_or_default()
            }
            Value::Object(m) if m.contains_key("seq") && m.contains_key("op") => Value::Object(m),
            _ => return true,
        };
        if json {
            return emit(&format!("{rec}\n"));
        }
        match serde_json::from_value::<JournalRecord>(rec) {
            Ok(r) => emit(&follow_line(&r)),
            Err(e) => {
                bad = Some(ClientError::Protocol(format!(
                    "unreadable journal record: {e}"
                )));
                false
            }
        }
    };
    let res = client.call_stream(Op::Follow { from_seq }, &mut on_event);
    if let Some(e) = bad {
        return Err(e);
    }
    res.map(|_| 0)
}

/// Call `op`, showing its progress events on a terminal's stderr.
fn call_with_progress(client: &mut Client, op: Op) -> Result<Value, ClientError> {
    let tty = std::io::stderr().is_terminal();
    let mut shown = false;
    let res = client.call_stream(op, &mut |ev: Value| {
        if let (true, Some(p)) = (tty, ev.get("progress").and_then(|p| p.as_str())) {
            eprint!("\r\x1b[K{} ...", clean(p));
            shown = true;
        }
        true
    });
    if shown {
        eprint!("\r\x1b[K");
    }
    res
}

// ---- Output ---------------------------------------------------------------

/// Print `v` as JSON, or render it as `T`; a result that is not a `T`
/// (a server newer than this tool) is printed as JSON rather than lost.
fn show<T: DeserializeOwned>(
    json: bool,
    v: Value,
    render: impl FnOnce(T) -> String,
) -> Result<i32, ClientError> {
    if json {
        print_json(&v);
        return Ok(0);
    }
    let t: T = parse(&v)?;
    out(&render(t));
    Ok(0)
}

fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, ClientError> {
    serde_json::from_value(v.clone())
        .map_err(|e| ClientError::Protocol(format!("unexpected result {v}: {e}")))
}

/// A list result: a bare array, or an object holding it under `key`.
fn list_of<T: DeserializeOwned>(v: &Value, key: &str) -> Result<Vec<T>, ClientError> {
    match v.get(key) {
        Some(inner) if v.is_object() => parse(inner),
        _ => parse(v),
    }
}

fn print_json(v: &Value) {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    out(&format!("{s}\n"));
}

/// Write to stdout; a closed pipe (`| head`) ends the program quietly.
fn out(s: &str) {
    if !emit(s) {
        exit(0);
    }
}

/// Write and flush to stdout; false if stdout is gone.
fn emit(s: &str) -> bool {
    let mut o = std::io::stdout().lock();
    match o.write_all(s.as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => false,
        Err(e) => {
            eprintln!("layerfs-ctl: cannot write the output: {e}");
            exit(1);
        }
    }
}

fn render_status(s: &Status) -> String {
    let mut pairs = vec![("mountpoint".to_string(), clean(&s.mountpoint))];
    for (i, l) in s.lowers.iter().enumerate() {
        pairs.push((format!("lower {}", i + 1), clean(l)));
    }
    pairs.push((
        "upper".into(),
        s.upper.as_deref().map_or("none (read-only)".into(), clean),
    ));
    pairs.push((
        "state dir".into(),
        s.statedir.as_deref().map_or("-".into(), clean),
    ));
    pairs.push(("journal seq".into(), s.journal_seq.to_string()));
    pairs.push(("checkpoints".into(), s.checkpoints.to_string()));
    pairs.push((
        "last checkpoint".into(),
        s.last_checkpoint.as_deref().map_or("-".into(), clean),
    ));
    pairs.push(("store size".into(), fmt_bytes(s.store_bytes)));
    let used = s.overlay_total_bytes.saturating_sub(s.overlay_free_bytes);
    let pct = if s.overlay_total_bytes > 0 {
        used as f64 * 100.0 / s.overlay_total_bytes as f64
    } else {
        0.0
    };
    pairs.push((
        "overlay".into(),
        format!(
            "{} free of {} ({pct:.0}% used)",
            fmt_bytes(s.overlay_free_bytes),
            fmt_bytes(s.overlay_total_bytes)
        ),
    ));
    pairs.push(("health".into(), clean(&s.health)));
    pairs.push(("version".into(), clean(&s.version)));
    render_pairs(&pairs)
}

fn render_show(c: &CheckpointInfo) -> String {
    let mut pairs = vec![
        ("name".to_string(), clean(&c.name)),
        ("id".into(), clean(&c.id)),
        ("time".into(), fmt_time(c.time_ns)),
        ("journal seq".into(), c.seq.to_string()),
        ("files".into(), c.files.to_string()),
        ("dirs".into(), c.dirs.to_string()),
        ("others".into(), c.others.to_string()),
        ("size".into(), fmt_bytes(c.bytes)),
        (
            "created".into(),
            if c.auto {
                "automatically (before a rollback)".into()
            } else {
                "by request".into()
            },
        ),
        (
            "message".into(),
            c.message.as_deref().map_or("-".into(), clean),
        ),
    ];
    if let Some(h) = c.hold_ms {
        pairs.push(("writes held".into(), fmt_ms(h)));
    }
    if let Some(t) = c.took_ms {
        pairs.push(("took".into(), fmt_ms(t)));
    }
    render_pairs(&pairs)
}

fn render_list(list: &[CheckpointInfo]) -> String {
    let mut t = Table::new(&["NAME", "TIME", "FILES", "SIZE", "MESSAGE"], &[2, 3]);
    for c in list {
        let mut msg = c.message.as_deref().map(clean).unwrap_or_default();
        if c.auto {
            msg = if msg.is_empty() {
                "[auto]".into()
            } else {
                format!("[auto] {msg}")
            };
        }
        t.row(vec![
            clean(&c.name),
            fmt_time(c.time_ns),
            c.files.to_string(),
            fmt_bytes(c.bytes),
            msg,
        ]);
    }
    t.render()
}

fn render_log(records: &[JournalRecord]) -> String {
    let mut t = Table::new(
        &["SEQ", "TIME", "OP", "PATH", "UID", "PID", "COMM", "DETAIL"],
        &[0, 4, 5],
    );
    for r in records {
        t.row(vec![
            r.seq.to_string(),
            fmt_time(r.time_ns),
            clean(&r.op),
            record_path(r),
            r.uid.to_string(),
            r.pid.to_string(),
            clean(&r.comm),
            r.detail.as_deref().map(clean).unwrap_or_default(),
        ]);
    }
    t.render()
}

fn record_path(r: &JournalRecord) -> String {
    match &r.path2 {
        Some(p2) => format!("{} -> {}", clean(&r.path), clean(p2)),
        None => clean(&r.path),
    }
}

/// One record of `follow` (a stream cannot be aligned as a whole).
fn follow_line(r: &JournalRecord) -> String {
    let mut s = format!(
        "{:>8}  {}  {:<11}  {}  uid={} pid={} comm={}",
        r.seq,
        fmt_time(r.time_ns),
        clean(&r.op),
        record_path(r),
        r.uid,
        r.pid,
        clean(&r.comm)
    );
    if let Some(d) = &r.detail {
        s.push_str("  ");
        s.push_str(&clean(d));
    }
    s.push('\n');
    s
}

fn render_diff(entries: &[DiffEntry]) -> String {
    let mut s = String::new();
    for e in entries {
        let letter = match e.change.as_str() {
            "added" => "A",
            "modified" => "M",
            "deleted" => "D",
            _ => "?",
        };
        let mut parts = Vec::new();
        if e.kind != "file" {
            parts.push(clean(&e.kind));
        }
        let size = pair(e.old_size.map(fmt_bytes), e.new_size.map(fmt_bytes));
        let hash = pair(
            e.old_hash.as_deref().map(short_hash),
            e.new_hash.as_deref().map(short_hash),
        );
        parts.extend(size);
        parts.extend(hash);
        s.push_str(&format!("{letter}  {}", clean(&e.path)));
        if !parts.is_empty() {
            s.push_str(&format!("  ({})", parts.join(" / ")));
        }
        s.push('\n');
    }
    s
}

/// "old -> new" for a modification where both are known and differ, else the one that applies.
fn pair(old: Option<String>, new: Option<String>) -> Option<String> {
    match (old, new) {
        (Some(o), Some(n)) if o != n => Some(format!("{o} -> {n}")),
        (Some(o), _) => Some(o),
        (None, n) => n,
    }
}

fn short_hash(h: &str) -> String {
    clean(&h.chars().take(12).collect::<String>())
}

/// "key: value" lines with the values aligned.
fn render_pairs(pairs: &[(String, String)]) -> String {
    let w = pairs
        .iter()
        .map(|(k, _)| k.chars().count())
        .max()
        .unwrap_or(0)
        + 1;
    let mut s = String::new();
    for (k, v) in pairs {
        s.push_str(&format!("{:<w$} {v}\n", format!("{k}:")));
    }
    s
}

/// A text table: columns separated by two spaces, the last one unpadded.
struct Table {
    head: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `right`: indexes of right-aligned (numeric) columns.
    fn new(head: &[&str], right: &[usize]) -> Table {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            right: (0..head.len()).map(|i| right.contains(&i)).collect(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    fn render(&self) -> String {
        let n = self.head.len();
        let mut w = vec![0usize; n];
        for r in std::iter::once(&self.head).chain(&self.rows) {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let mut s = String::new();
        for r in std::iter::once(&self.head).chain(&self.rows) {
            let mut line = String::new();
            for (i, c) in r.iter().enumerate().take(n) {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = w[i] - c.chars().count();
                if self.right[i] {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                } else if i + 1 < n {
                    line.push_str(c);
                    line.push_str(&" ".repeat(pad));
                } else {
                    line.push_str(c);
                }
            }
            s.push_str(line.trim_end());
            s.push('\n');
        }
        s
    }
}

/// Control characters in names (a file called "\x1b[2J") would drive the
/// terminal: show them escaped.
fn clean(s: &str) -> String {
    if !s.chars().any(char::is_control) {
        return s.to_string();
    }
    s.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn fmt_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", UNITS[u])
}

fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

// ---- Time -----------------------------------------------------------------

const NS: i64 = 1_000_000_000;

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm).
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

/// The date of a day number (inverse of `days_from_civil`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Unix nanoseconds as "2026-11-25T10:00:00Z".
fn fmt_time(ns: i64) -> String {
    let secs = ns.div_euclid(NS);
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A time argument as unix nanoseconds.
fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, now_ns()).ok_or_else(|| format!("'{s}' is not a time; use {TIME_HELP}"))
}

fn parse_time_at(s: &str, now: i64) -> Option<i64> {
    let s = s.trim();
    let s = s.strip_suffix(" ago").unwrap_or(s).trim();
    if s == "now" {
        return Some(now);
    }
    // Relative: "10m", "2h", "3d", "1w", "30s".
    if let Some(unit) = s.chars().last().filter(|c| c.is_ascii_alphabetic()) {
        let num = &s[..s.len() - 1];
        if !num.is_empty() && num.bytes().all(|b| b.is_ascii_digit()) {
            let n: i64 = num.parse().ok()?;
            let secs = match unit {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86400,
                'w' => 7 * 86400,
                _ => return None,
            };
            return now.checked_sub(n.checked_mul(secs)?.checked_mul(NS)?);
        }
    }
    // Unix seconds, possibly with a fraction.
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        let (int, frac) = s.split_once('.').unwrap_or((s, ""));
        let secs: i64 = int.parse().ok()?;
        return secs.checked_mul(NS)?.checked_add(parse_frac(frac)?);
    }
    parse_rfc3339(s)
}

/// Digits after a decimal point as nanoseconds.
fn parse_frac(f: &str) -> Option<i64> {
    if f.is_empty() {
        return Some(0);
    }
    if f.len() > 9 || !f.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: i64 = f.parse().ok()?;
    Some(n * 10i64.pow(9 - f.len() as u32))
}

/// "YYYY-MM-DD[(T| )HH:MM[:SS[.frac]]][Z|±HH:MM|±HHMM]"; no offset means UTC.
fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 10 || b[4] != b'-' || b[7] != b'-' {
        return None;
    }
    let y: i64 = digits(&s[0..4])?;
    let mo: u32 = digits(&s[5..7])?;
    let d: u32 = digits(&s[8..10])?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return None;
    }
    let mut rest = &s[10..];
    let mut secs_of_day = 0i64;
    let mut frac_ns = 0i64;
    if !rest.is_empty() && !matches!(rest.as_bytes()[0], b'Z' | b'z' | b'+' | b'-') {
        if !matches!(rest.as_bytes()[0], b'T' | b't' | b' ') {
            return None;
        }
        rest = &rest[1..];
        let end = rest.find(['Z', 'z', '+', '-']).unwrap_or(rest.len());
        let (clock, tz) = rest.split_at(end);
        let (hms, frac) = clock.split_once('.').unwrap_or((clock, ""));
        let parts: Vec<&str> = hms.split(':').collect();
        if parts.len() < 2 || parts.len() > 3 || parts.iter().any(|p| p.len() != 2) {
            return None;
        }
        let h: i64 = digits(parts[0])?;
        let mi: i64 = digits(parts[1])?;
        let sec: i64 = if parts.len() == 3 {
            digits(parts[2])?
        } else {
            0
        };
        if h > 23 || mi > 59 || sec > 60 || (!frac.is_empty() && parts.len() != 3) {
            return None;
        }
        secs_of_day = h * 3600 + mi * 60 + sec;
        frac_ns = parse_frac(frac)?;
        rest = tz;
    }
    let offset = match rest {
        "" | "Z" | "z" => 0,
        _ => {
            let sign = match rest.as_bytes()[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let hm = rest[1..].replace(':', "");
            if hm.len() != 4 {
                return None;
            }
            let oh: i64 = digits(&hm[..2])?;
            let om: i64 = digits(&hm[2..])?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    let secs = days_from_civil(y, mo, d) * 86400 + secs_of_day - offset;
    secs.checked_mul(NS)?.checked_add(frac_ns)
}

fn digits<T: std::str::FromStr>(s: &str) -> Option<T> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn days_in_month(y: i64, m: u32) -> u32 {
    match m {
        2 if (y % 4 == 0 && y % 100 != 0) || y % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_round_trip() {
        for days in [-719468i64, -1, 0, 1, 59, 60, 365, 11016, 20597, 2932896] {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days, "{y}-{m}-{d}");
        }
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(11016), (2000, 2, 29));
    }

    #[test]
    fn formats_utc() {
        assert_eq!(fmt_time(0), "1970-01-01T00:00:00Z");
        assert_eq!(fmt_time(1_795_600_800 * NS), "2026-11-25T10:00:00Z");
        assert_eq!(fmt_time(-NS), "1969-12-31T23:59:59Z");
    }

    #[test]
    fn parses_times() {
        let now = 1_795_600_800 * NS;
        assert_eq!(parse_time_at("2026-11-25T10:00:00Z", 0), Some(now));
        assert_eq!(parse_time_at("2026-11-25 10:00:00", 0), Some(now));
        assert_eq!(parse_time_at("2026-11-25T11:00:00+01:00", 0), Some(now));
        assert_eq!(parse_time_at("2026-11-25T05:30-0430", 0), Some(now));
        assert_eq!(
            parse_time_at("2026-11-25T10:00:00.5Z", 0),
            Some(now + NS / 2)
        );
        assert_eq!(parse_time_at("2026-11-25", 0), Some(now - 10 * 3600 * NS));
        assert_eq!(parse_time_at("1795600800", 0), Some(now));
        assert_eq!(parse_time_at("10m", now), Some(now - 600 * NS));
        assert_eq!(parse_time_at("2h ago", now), Some(now - 7200 * NS));
        assert_eq!(parse_time_at("3d", now), Some(now - 3 * 86400 * NS));
        for bad in [
            "",
            "x",
            "10x",
            "2026-13-01",
            "2026-02-30",
            "2026-11-25T25:00Z",
            "m",
        ] {
            assert_eq!(parse_time_at(bad, now), None, "{bad}");
        }
    }

    #[test]
    fn table_aligns() {
        let mut t = Table::new(&["A", "NUM", "LAST"], &[1]);
        t.row(vec!["long-name".into(), "5".into(), "x".into()]);
        t.row(vec!["b".into(), "1234".into(), "".into()]);
        assert_eq!(
            t.render(),
            "A           NUM  LAST\nlong-name     5  x\nb          1234\n"
        );
    }

    #[test]
    fn escapes_control_characters() {
        assert_eq!(clean("a\x1b[2Jb\n"), "a\\u{1b}[2Jb\\n");
        assert_eq!(fmt_bytes(1536), "1.5 KiB");
        assert_eq!(fmt_bytes(12), "12 B");
    }
}
