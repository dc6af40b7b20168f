//! layerctl: the admin command line of the layerd agent. It talks HTTP/1.1
//! over layerd's Unix socket (`layerfs_agent::http_client`) and shows the
//! same data as `layerfs-ctl`, rendered by `layerfs::control::render`.

use std::io::{BufReader, IsTerminal};
use std::path::PathBuf;
use std::process::exit;

use clap::{CommandFactory, Parser, Subcommand, ValueEnum};
use serde::de::DeserializeOwned;
use serde_json::{json, Map, Value};

use layerfs::control::cli::{self, log_more_hint, CheckpointCmd, MountCmd};
use layerfs::control::proto::{
    CheckpointInfo, DiffEntry, JournalRecord, PruneReport, RollbackReport, Status, VerifyReport,
};
use layerfs::control::render::{
    self, clean, fmt_ms, fmt_time, follow_line, parse_time, render_created, render_deleted,
    render_diff, render_list, render_log, render_pairs, render_prune, render_restore,
    render_rollback, render_show, render_status, render_verify, Table,
};
use layerfs_agent::audit::{AuditRecord, AuditResult};
use layerfs_agent::http_client::{self, encode, query, HttpError};
use layerfs_agent::{AgentError, Caller};

const DEFAULT_SOCKET: &str = "/run/layerd.sock";
/// Largest response body read whole (a full journal page is far smaller).
const MAX_BODY: u64 = 256 << 20;
/// Longest line of the follow stream (one journal record).
const MAX_LINE: usize = 16 << 20;

/// The name in messages.
const PROG: &str = "layerctl";
const EXIT_CODES: &str = "\
Exit codes:
  0  ok
  1  the operation failed
  2  usage error (bad arguments)
  3  cannot reach layerd, or layerd cannot reach the mount
  4  permission denied (the message names the role the operation needs)
  5  not found (no such mount, checkpoint or path)
  6  verify found corruption (each problem is printed)

layerd's socket is -s PATH, else $LAYERCTL_SOCKET, else /run/layerd.sock.
The mount is -m NAME (a [[mount]] name of agent.toml); without it, the only
mount. Times are printed in UTC (ending in 'Z').";

#[derive(Parser)]
#[command(
    name = "layerctl",
    version,
    about = "Operate the layerfs mounts of this server through the layerd agent",
    after_help = EXIT_CODES
)]
struct Cli {
    /// layerd's socket (default: $LAYERCTL_SOCKET, else /run/layerd.sock).
    #[arg(short = 's', long = "socket", value_name = "PATH", global = true)]
    socket: Option<PathBuf>,
    /// The mount to operate on, by its name in agent.toml (default: the only one).
    #[arg(short = 'm', long = "mount", value_name = "NAME", global = true)]
    mount: Option<String>,
    /// Print results as JSON (follow: one record per line).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// The agent and each mount: layers, journal position, checkpoints, space, health.
    Status,
    #[command(flatten)]
    Mount(MountCmd),
    /// The agent's audit log: every call, who made it, and its result.
    Audit(AuditArgs),
    /// Print a shell completion script to stdout.
    Completions {
        #[arg(value_enum)]
        shell: CompletionShell,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

#[derive(clap::Args)]
struct AuditArgs {
    /// Calls at or after this time [T: 2026-11-25T10:00:00Z, 10m, 2h, 3d, unix seconds].
    #[arg(long, value_name = "T", value_parser = parse_time)]
    since: Option<i64>,
    /// Calls at or before this time.
    #[arg(long, value_name = "T", value_parser = parse_time)]
    until: Option<i64>,
    /// Calls of this local uid (without the manager role: only your own).
    #[arg(long, value_name = "N")]
    uid: Option<u32>,
    /// Only this operation (rollback, checkpoint_create, follow, ...).
    #[arg(long, value_name = "OP")]
    op: Option<String>,
    /// Only calls that were denied.
    #[arg(long)]
    denied: bool,
    /// At most N records.
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100000))]
    limit: Option<u64>,
}

/// Why a command failed: the exit code and what to print.
#[derive(Debug)]
struct Fail {
    code: i32,
    message: String,
}

impl Fail {
    fn new(code: i32, message: impl Into<String>) -> Fail {
        Fail {
            code,
            message: message.into(),
        }
    }
}

/// What every command needs: where layerd is and which mount to use.
struct Ctx {
    socket: PathBuf,
    /// As given with -m; None: `_`, the only mount.
    mount: Option<String>,
    json: bool,
}

impl Ctx {
    /// "/v1/mounts/{mount}" with the name percent-encoded.
    fn mount_url(&self) -> String {
        format!(
            "/v1/mounts/{}",
            encode(self.mount.as_deref().unwrap_or("_"))
        )
    }

    /// How to run layerctl again on this mount (for hints).
    fn tool(&self) -> String {
        match &self.mount {
            Some(m) => format!("layerctl -m {}", clean(m)),
            None => "layerctl".to_string(),
        }
    }
}

fn main() {
    let cli = Cli::parse();
    if let Cmd::Completions { shell } = cli.cmd {
        let mut cmd = Cli::command();
        let mut o = std::io::stdout();
        match shell {
            CompletionShell::Bash => {
                clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "layerctl", &mut o)
            }
            CompletionShell::Zsh => {
                clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "layerctl", &mut o)
            }
            CompletionShell::Fish => {
                clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "layerctl", &mut o)
            }
        }
        exit(0);
    }
    if let Cmd::Mount(m) = &cli.cmd {
        m.validate::<Cli>();
    }
    if cli.mount.as_deref() == Some("") {
        Cli::command()
            .error(
                clap::error::ErrorKind::ValueValidation,
                "-m needs a mount name (see `layerctl status`)",
            )
            .exit();
    }
    let socket = cli.socket.clone().unwrap_or_else(|| {
        std::env::var_os("LAYERCTL_SOCKET")
            .filter(|s| !s.is_empty())
            .map_or_else(|| PathBuf::from(DEFAULT_SOCKET), PathBuf::from)
    });
    let ctx = Ctx {
        socket,
        mount: cli.mount,
        json: cli.json,
    };
    match run(&ctx, cli.cmd) {
        Ok(code) => exit(code),
        Err(f) => {
            eprintln!("layerctl: {}", f.message);
            exit(f.code)
        }
    }
}

/// Runs one command; returns the exit code.
fn run(ctx: &Ctx, cmd: Cmd) -> Result<i32, Fail> {
    match cmd {
        Cmd::Completions { .. } => Ok(0),
        Cmd::Status => status(ctx),
        Cmd::Mount(c) => mount_cmd(ctx, c),
        Cmd::Audit(a) => audit(ctx, a),
    }
}

/// Runs one of the per-mount commands shared with layerfs-ctl.
fn mount_cmd(ctx: &Ctx, cmd: MountCmd) -> Result<i32, Fail> {
    let m = ctx.mount_url();
    match cmd {
        MountCmd::Log(a) => {
            let a = a.into_query();
            let mut q: Vec<(&str, String)> = Vec::new();
            push(&mut q, "from_seq", a.from_seq);
            push(&mut q, "since_ns", a.since_ns);
            push(&mut q, "until_ns", a.until_ns);
            push(&mut q, "path", a.path_prefix);
            for op in a.ops {
                q.push(("op", op));
            }
            push(&mut q, "comm", a.comm);
            push(&mut q, "uid", a.uid);
            push(&mut q, "limit", a.limit);
            let v = call(ctx, "GET", &format!("{m}/changes{}", query(&q)), None)?;
            if ctx.json {
                print_json(&v);
                return Ok(0);
            }
            let records: Vec<JournalRecord> = list_of(&v, "records")?;
            if records.is_empty() {
                eprintln!("no journal records match");
                return Ok(0);
            }
            out(&render_log(&records));
            if let Some(hint) = log_more_hint(&records, a.limit) {
                eprintln!("{hint}");
            }
            Ok(0)
        }
        MountCmd::Follow { from_seq } => follow(ctx, from_seq),
        MountCmd::Checkpoint(c) => checkpoint(ctx, c),
        MountCmd::Rollback { name } => {
            let body = json!({ "checkpoint": name });
            let label = format!("rolling back to {}", clean(&name));
            let v = with_progress(&label, || {
                call(ctx, "POST", &format!("{m}/rollback"), Some(body))
            })?;
            show(ctx, v, |r: RollbackReport| render_rollback(&r, &ctx.tool()))
        }
        MountCmd::Restore { name, paths } => {
            let body = json!({ "checkpoint": name, "paths": paths });
            let label = format!("restoring from {}", clean(&name));
            let v = with_progress(&label, || {
                call(ctx, "POST", &format!("{m}/restore"), Some(body))
            })?;
            show(ctx, v, |r: RollbackReport| render_restore(&r))
        }
        MountCmd::Verify => {
            let v = with_progress("verifying", || {
                call(ctx, "POST", &format!("{m}/verify"), None)
            })?;
            let r: VerifyReport = parse(&v)?;
            if ctx.json {
                print_json(&v);
            } else {
                out(&render_verify(&r));
            }
            if r.problems.is_empty() {
                Ok(0)
            } else {
                eprintln!("layerctl: {}", render::verify_summary(&r));
                Ok(6)
            }
        }
        MountCmd::Prune(p) => {
            let mut body = Map::new();
            for (k, v) in p.rules() {
                if let Some(n) = v {
                    body.insert(k.into(), n.into());
                }
            }
            let v = call(
                ctx,
                "POST",
                &format!("{m}/prune"),
                Some(Value::Object(body)),
            )?;
            show(ctx, v, |r: PruneReport| render_prune(&r))
        }
    }
}

fn checkpoint(ctx: &Ctx, c: CheckpointCmd) -> Result<i32, Fail> {
    let m = ctx.mount_url();
    match c {
        CheckpointCmd::Create { name, message } => {
            let mut body = Map::new();
            if let Some(n) = name {
                body.insert("name".into(), n.into());
            }
            if let Some(msg) = message {
                body.insert("message".into(), msg.into());
            }
            let v = with_progress("creating a checkpoint", || {
                call(
                    ctx,
                    "POST",
                    &format!("{m}/checkpoints"),
                    Some(Value::Object(body)),
                )
            })?;
            show(ctx, v, |c: CheckpointInfo| render_created(&c))
        }
        CheckpointCmd::List => {
            let v = call(ctx, "GET", &format!("{m}/checkpoints"), None)?;
            if ctx.json {
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
            let v = call(
                ctx,
                "GET",
                &format!("{m}/checkpoints/{}", encode(&name)),
                None,
            )?;
            show(ctx, v, |c: CheckpointInfo| render_show(&c))
        }
        CheckpointCmd::Diff { a, b } => {
            let mut q = Vec::new();
            push(&mut q, "to", b);
            let target = format!("{m}/checkpoints/{}/diff{}", encode(&a), query(&q));
            let v = call(ctx, "GET", &target, None)?;
            if ctx.json {
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
            let target = format!("{m}/checkpoints/{}", encode(&name));
            let v = call(ctx, "DELETE", &target, None)?;
            if ctx.json {
                print_json(&v);
                return Ok(0);
            }
            let report = serde_json::from_value::<PruneReport>(v).ok();
            out(&render_deleted(&name, report.as_ref()));
            Ok(0)
        }
    }
}

/// `status`: the agent's fields, then each mount (only -m's, if given).
fn status(ctx: &Ctx) -> Result<i32, Fail> {
    let mut v = call(ctx, "GET", "/v1/status", None)?;
    let mut mounts: Vec<Value> = match v.get("mounts") {
        Some(Value::Array(a)) => a.clone(),
        _ => Vec::new(),
    };
    if let Some(want) = &ctx.mount {
        if want != "_" {
            mounts.retain(|m| m.get("name").and_then(Value::as_str) == Some(want.as_str()));
            if mounts.is_empty() {
                return Err(Fail::new(
                    5,
                    format!(
                        "layerd has no mount named '{}' (see `layerctl status`)",
                        clean(want)
                    ),
                ));
            }
            if let Some(obj) = v.as_object_mut() {
                obj.insert("mounts".into(), Value::Array(mounts.clone()));
            }
        }
    }
    // A mount layerd cannot reach is a failure of `status` (exit 3), as for layerfs-ctl.
    let unreachable = mounts
        .iter()
        .any(|m| m.get("status").is_none_or(Value::is_null));
    let code = if unreachable { 3 } else { 0 };
    if ctx.json {
        print_json(&v);
        return Ok(code);
    }
    let mut s = String::new();
    if let Some(Value::Object(agent)) = v.get("agent") {
        s.push_str(&render_pairs(&agent_pairs(agent)));
    }
    if mounts.is_empty() {
        s.push_str("no mounts (add a [[mount]] to agent.toml)\n");
    }
    for m in &mounts {
        let name = m.get("name").and_then(Value::as_str).unwrap_or("?");
        let path = m.get("path").and_then(Value::as_str).unwrap_or("?");
        s.push_str(&format!("\nmount {} ({}):\n", clean(name), clean(path)));
        let body = match m.get("status") {
            Some(st) if !st.is_null() => match serde_json::from_value::<Status>(st.clone()) {
                Ok(st) => render_status(&st),
                Err(_) => render::pretty_json(st),
            },
            _ => format!(
                "error: {}\n",
                clean(
                    m.get("error")
                        .and_then(Value::as_str)
                        .unwrap_or("no status")
                )
            ),
        };
        for line in body.lines() {
            s.push_str("  ");
            s.push_str(line);
            s.push('\n');
        }
    }
    out(&s);
    Ok(code)
}

/// The agent's part of `status` as "key: value" pairs: the fields this
/// version knows first, in a fixed order, then any others as they are.
fn agent_pairs(agent: &Map<String, Value>) -> Vec<(String, String)> {
    let str_of = |v: &Value| match v {
        Value::String(s) => clean(s),
        Value::Null => "-".to_string(),
        other => clean(&other.to_string()),
    };
    let mut pairs = Vec::new();
    let mut rest = agent.clone();
    for key in [
        "server_id",
        "version",
        "pid",
        "uptime_s",
        "socket",
        "audit_seq",
        "coordinator",
        "caller",
    ] {
        let Some(v) = rest.remove(key) else { continue };
        let (label, text) = match key {
            "uptime_s" => (
                "uptime".to_string(),
                v.as_u64().map_or_else(|| str_of(&v), fmt_duration),
            ),
            "coordinator" => (
                "coordinator".to_string(),
                match &v {
                    Value::Object(c) => {
                        let mut t = str_of(c.get("address").unwrap_or(&Value::Null));
                        if let Some(r) = c.get("role").and_then(Value::as_str) {
                            t.push_str(&format!(" (role {})", clean(r)));
                        }
                        if let Some(st) = c.get("state").filter(|s| !s.is_null()) {
                            t.push_str(&format!(": {}", str_of(st)));
                        }
                        t
                    }
                    other => str_of(other),
                },
            ),
            "caller" => (
                "you".to_string(),
                describe_caller(&v).unwrap_or_else(|| str_of(&v)),
            ),
            _ => (key.replace('_', " "), str_of(&v)),
        };
        pairs.push((label, text));
    }
    for (k, v) in &rest {
        pairs.push((clean(&k.replace('_', " ")), str_of(v)));
    }
    pairs
}

/// `{"who": Caller, "role": Role|null}` as "uid 1001 (role monitor)".
fn describe_caller(v: &Value) -> Option<String> {
    let who: Caller = serde_json::from_value(v.get("who")?.clone()).ok()?;
    let role = match v.get("role").and_then(Value::as_str) {
        Some(r) => format!("role {}", clean(r)),
        None => "no role".to_string(),
    };
    Some(match who {
        Caller::Local { uid, .. } => format!("uid {uid} ({role})"),
        Caller::Coordinator { address } => format!("the coordinator {} ({role})", clean(&address)),
    })
}

/// Seconds as "3d 4h", "2h 5m", "5m 3s", "42s".
fn fmt_duration(s: u64) -> String {
    let (d, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// `follow`: the NDJSON stream of journal records, printed as they come.
fn follow(ctx: &Ctx, from_seq: Option<u64>) -> Result<i32, Fail> {
    let from_seq = match from_seq {
        Some(s) => s,
        None => current_seq(ctx)? + 1,
    };
    let target = format!("{}/changes/follow?from_seq={from_seq}", ctx.mount_url());
    let resp =
        http_client::send(&ctx.socket, "GET", &target, None).map_err(|e| http_fail(ctx, e))?;
    if !(200..300).contains(&resp.status) {
        let status = resp.status;
        let body = resp.read_body(MAX_BODY).map_err(|e| http_fail(ctx, e))?;
        return Err(api_fail(status, &body));
    }
    let mut lines = BufReader::new(resp.into_body());
    loop {
        let line = match http_client::read_line(&mut lines, MAX_LINE) {
            Ok((Some(l), _)) => l,
            // A clean end (the last chunk): layerd is shutting down.
            Ok((None, _)) => {
                eprintln!("layerctl: layerd ended the stream (it is shutting down)");
                return Ok(0);
            }
            // Cut without the last chunk: the mount (or layerd) went away.
            Err(e) if e.kind() != std::io::ErrorKind::InvalidData => {
                return Err(Fail::new(
                    3,
                    format!(
                        "the journal stream ended unexpectedly: {e} (did the mount or layerd go away? see `{} status`)",
                        ctx.tool()
                    ),
                ))
            }
            Err(e) => return Err(http_fail(ctx, HttpError::from(e))),
        };
        if line.trim().is_empty() {
            continue;
        }
        let ev: Value = serde_json::from_str(&line).map_err(|e| {
            Fail::new(
                1,
                format!("unreadable line from layerd ({e}): {}", clean(&line)),
            )
        })?;
        // Records come as they are (or wrapped as {"record": ...}); other
        // objects (heartbeats) only keep the stream alive.
        let rec = match ev {
            Value::Object(mut o) if o.contains_key("record") => {
                o.remove("record").unwrap_or_default()
            }
            Value::Object(o) if o.contains_key("seq") && o.contains_key("op") => Value::Object(o),
            _ => continue,
        };
        let text = if ctx.json {
            format!("{rec}\n")
        } else {
            let r: JournalRecord = serde_json::from_value(rec)
                .map_err(|e| Fail::new(1, format!("unreadable journal record: {e}")))?;
            follow_line(&r)
        };
        if !emit(&text) {
            return Ok(0);
        }
    }
}

/// The journal position of the chosen mount (from /v1/status).
fn current_seq(ctx: &Ctx) -> Result<u64, Fail> {
    let v = call(ctx, "GET", "/v1/status", None)?;
    let mounts = v
        .get("mounts")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    let m = match ctx.mount.as_deref().filter(|m| *m != "_") {
        Some(name) => mounts
            .iter()
            .find(|m| m.get("name").and_then(Value::as_str) == Some(name))
            .ok_or_else(|| Fail::new(5, format!("layerd has no mount named '{}'", clean(name))))?,
        None if mounts.len() == 1 => &mounts[0],
        None => {
            return Err(Fail::new(
                2,
                format!(
                    "layerd has {} mounts: say which with -m NAME (see `layerctl status`)",
                    mounts.len()
                ),
            ))
        }
    };
    match m.get("status").filter(|s| !s.is_null()) {
        Some(s) => Ok(parse::<Status>(s)?.journal_seq),
        None => Err(Fail::new(
            3,
            clean(
                m.get("error")
                    .and_then(Value::as_str)
                    .unwrap_or("the mount has no status"),
            ),
        )),
    }
}

fn audit(ctx: &Ctx, a: AuditArgs) -> Result<i32, Fail> {
    let mut q: Vec<(&str, String)> = Vec::new();
    push(&mut q, "since_ns", a.since);
    push(&mut q, "until_ns", a.until);
    push(&mut q, "uid", a.uid);
    // Accept "checkpoint-create" for "checkpoint_create".
    push(&mut q, "op", a.op.map(|o| o.replace('-', "_")));
    if a.denied {
        q.push(("denied", "true".into()));
    }
    push(&mut q, "limit", a.limit);
    let v = call(ctx, "GET", &format!("/v1/audit{}", query(&q)), None).map_err(|mut f| {
        if f.code == 4 && a.uid.is_none() {
            // Without manager, a caller may still read its own calls.
            let me = layerfs::sys::geteuid();
            f.message
                .push_str(&format!(" (your own calls: layerctl audit --uid {me})"));
        }
        f
    })?;
    if ctx.json {
        print_json(&v);
        return Ok(0);
    }
    let records: Vec<AuditRecord> = list_of(&v, "records")?;
    if records.is_empty() {
        eprintln!("no audit records match");
        return Ok(0);
    }
    let mut t = Table::new(
        &[
            "SEQ", "TIME", "CALLER", "ROLE", "OP", "MOUNT", "RESULT", "TOOK", "ERROR",
        ],
        &[0, 7],
    );
    for r in &records {
        let caller = match &r.caller {
            Caller::Local { uid, pid, .. } => format!("uid {uid} pid {pid}"),
            Caller::Coordinator { address } => format!("coordinator {}", clean(address)),
        };
        let result = match r.result {
            AuditResult::Ok => "ok",
            AuditResult::Denied => "denied",
            AuditResult::Error => "error",
        };
        t.row(vec![
            r.seq.to_string(),
            fmt_time(r.time_ns),
            caller,
            r.role.map_or("-".to_string(), |r| r.to_string()),
            clean(&r.op),
            r.mount.as_deref().map_or("-".to_string(), clean),
            result.to_string(),
            fmt_ms(r.duration_ms),
            r.error.as_deref().map(clean).unwrap_or_default(),
        ]);
    }
    out(&t.render());
    Ok(0)
}

// ---- HTTP ---------------------------------------------------------------------

/// One request to layerd; the JSON of a 2xx answer, or the failure.
fn call(ctx: &Ctx, method: &str, target: &str, body: Option<Value>) -> Result<Value, Fail> {
    let body = body.map(|b| b.to_string().into_bytes());
    let resp = http_client::send(&ctx.socket, method, target, body.as_deref())
        .map_err(|e| http_fail(ctx, e))?;
    let status = resp.status;
    let bytes = resp.read_body(MAX_BODY).map_err(|e| http_fail(ctx, e))?;
    if !(200..300).contains(&status) {
        return Err(api_fail(status, &bytes));
    }
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(Value::Null);
    }
    serde_json::from_slice(&bytes).map_err(|e| {
        Fail::new(
            1,
            format!("layerd's answer is not JSON ({e}): {}", snippet(&bytes)),
        )
    })
}

/// Transport failures: 3 (cannot reach layerd), 4 (no access to its socket), 1 (bad HTTP).
fn http_fail(ctx: &Ctx, e: HttpError) -> Fail {
    let p = ctx.socket.display();
    match e {
        HttpError::Connect { source, .. } => match source.kind() {
            std::io::ErrorKind::PermissionDenied => Fail::new(
                4,
                format!("permission denied on {p}: {source} (layerd's socket is for root or its group)"),
            ),
            _ => Fail::new(
                3,
                format!(
                    "cannot reach layerd at {p}: {source} (is layerd running? systemctl status layerd.socket)"
                ),
            ),
        },
        HttpError::Io(e) => Fail::new(
            3,
            format!("the connection to layerd at {p} failed: {e} (is layerd running? systemctl status layerd.service)"),
        ),
        HttpError::Protocol(m) => Fail::new(
            1,
            format!("bad HTTP answer from layerd at {p}: {m} (are layerctl and layerd the same version?)"),
        ),
    }
}

/// An error answer: `{"error": AgentError}` (or whatever a proxy sent).
fn api_fail(status: u16, body: &[u8]) -> Fail {
    let err = serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").cloned())
        .and_then(|e| serde_json::from_value::<AgentError>(e).ok());
    let Some(err) = err else {
        let code = match status {
            400 | 413 => 2,
            403 => 4,
            404 => 5,
            503 => 3,
            _ => 1,
        };
        let text = snippet(body);
        let text = if text.is_empty() {
            "no details".to_string()
        } else {
            text
        };
        return Fail::new(code, format!("layerd answered HTTP {status}: {text}"));
    };
    let code = match err.code.as_str() {
        "permission_denied" => 4,
        "not_found" => 5,
        "corrupt" => 6,
        "bad_request" => 2,
        "unavailable" => 3,
        _ if status == 404 => 5,
        _ => 1,
    };
    let mut message = clean(&err.message);
    if let Some(role) = err.required_role {
        if !message.contains("needs role") {
            message.push_str(&format!(" (needs role {role})"));
        }
    }
    Fail::new(code, message)
}

/// The start of a body, printable, for error messages.
fn snippet(body: &[u8]) -> String {
    let s = String::from_utf8_lossy(body);
    let s = s.trim();
    let mut out: String = s.chars().take(300).collect();
    if s.chars().count() > 300 {
        out.push_str("...");
    }
    clean(&out)
}

fn push<T: ToString>(q: &mut Vec<(&'static str, String)>, key: &'static str, v: Option<T>) {
    if let Some(v) = v {
        q.push((key, v.to_string()));
    }
}

/// Run `f` with "label ..." on a terminal's stderr meanwhile (the HTTP API
/// sends no progress events; this says at least that it is working).
fn with_progress<T>(label: &str, f: impl FnOnce() -> T) -> T {
    let tty = std::io::stderr().is_terminal();
    if tty {
        eprint!("{label} ...");
    }
    let r = f();
    if tty {
        eprint!("\r\x1b[K");
    }
    r
}

// ---- Output -------------------------------------------------------------------

/// Print `v` as JSON, or render it as `T`; a result that is not a `T`
/// (a server newer than this tool) is printed as JSON rather than lost.
fn show<T: DeserializeOwned>(
    ctx: &Ctx,
    v: Value,
    render: impl FnOnce(T) -> String,
) -> Result<i32, Fail> {
    if ctx.json {
        print_json(&v);
        return Ok(0);
    }
    match serde_json::from_value::<T>(v.clone()) {
        Ok(t) => out(&render(t)),
        Err(_) => print_json(&v),
    }
    Ok(0)
}

fn parse<T: DeserializeOwned>(v: &Value) -> Result<T, Fail> {
    serde_json::from_value(v.clone()).map_err(|e| {
        Fail::new(
            1,
            format!(
                "unexpected answer from layerd: {e}: {}",
                snippet(v.to_string().as_bytes())
            ),
        )
    })
}

/// A list result: a bare array, or an object holding it under `key`.
fn list_of<T: DeserializeOwned>(v: &Value, key: &str) -> Result<Vec<T>, Fail> {
    parse(cli::list_value(v, key))
}

fn print_json(v: &Value) {
    cli::print_json(PROG, v);
}

fn out(s: &str) {
    cli::out(PROG, s);
}

fn emit(s: &str) -> bool {
    cli::emit(PROG, s)
}
