//! layerfs-ctl: the admin command line of a mounted layerfs. It talks to the
//! mount's control socket: status, the change journal, checkpoints, rollback,
//! restore, verify and prune.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::exit;

use clap::{CommandFactory, Parser, Subcommand};
use serde::de::DeserializeOwned;
use serde_json::Value;

use layerfs::control::cli::{self, log_more_hint, CheckpointCmd, MountCmd};
use layerfs::control::client::{Client, ClientError};
use layerfs::control::proto::{
    CheckpointInfo, DiffEntry, ErrorCode, JournalRecord, Op, PruneReport, RollbackReport, Status,
    VerifyReport,
};
use layerfs::control::render::{
    self, clean, follow_line, render_created, render_deleted, render_diff, render_list, render_log,
    render_prune, render_restore, render_rollback, render_show, render_status, render_verify,
};

/// The name in messages.
const PROG: &str = "layerfs-ctl";
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
    #[command(flatten)]
    Mount(MountCmd),
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
    if let Cmd::Mount(m) = &cli.cmd {
        m.validate::<Cli>();
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
        Cmd::Mount(m) => mount_cmd(client, m, json),
    }
}

/// Runs one of the per-mount commands shared with layerctl.
fn mount_cmd(client: &mut Client, cmd: MountCmd, json: bool) -> Result<i32, ClientError> {
    match cmd {
        MountCmd::Log(a) => {
            let limit = a.limit;
            let query = a.into_query();
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
            if let Some(hint) = log_more_hint(&records, limit) {
                eprintln!("{hint}");
            }
            Ok(0)
        }
        MountCmd::Follow { from_seq } => follow(client, from_seq, json),
        MountCmd::Checkpoint(c) => checkpoint(client, c, json),
        MountCmd::Rollback { name } => {
            let v = call_with_progress(client, Op::Rollback { name })?;
            show(json, v, |r: RollbackReport| {
                render_rollback(&r, "layerfs-ctl")
            })
        }
        MountCmd::Restore { name, paths } => {
            let v = call_with_progress(client, Op::Restore { name, paths })?;
            show(json, v, |r: RollbackReport| render_restore(&r))
        }
        MountCmd::Verify => {
            let v = call_with_progress(client, Op::Verify)?;
            let r: VerifyReport = parse(&v)?;
            if json {
                print_json(&v);
            } else {
                out(&render_verify(&r));
            }
            if r.problems.is_empty() {
                Ok(0)
            } else {
                eprintln!("layerfs-ctl: {}", render::verify_summary(&r));
                Ok(6)
            }
        }
        MountCmd::Prune(p) => {
            let policy = p.retention();
            let v = client.call(Op::Prune { policy })?;
            show(json, v, |r: PruneReport| render_prune(&r))
        }
    }
}

fn checkpoint(client: &mut Client, c: CheckpointCmd, json: bool) -> Result<i32, ClientError> {
    match c {
        CheckpointCmd::Create { name, message } => {
            let v = call_with_progress(client, Op::CheckpointCreate { name, message })?;
            show(json, v, |c: CheckpointInfo| render_created(&c))
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
            let report = serde_json::from_value::<PruneReport>(v).ok();
            out(&render_deleted(&name, report.as_ref()));
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
