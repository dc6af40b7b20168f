//! The command-line parts shared by `layerfs-ctl` (control socket) and
//! `layerctl` (layerd's HTTP API): the per-mount subcommands, their options
//! and help texts, and their checks, so both tools take the same arguments.

use clap::{CommandFactory, Subcommand};
use serde_json::Value;

use crate::control::proto::{JournalQuery, JournalRecord, Retention};
use crate::control::render::{self, parse_time, JOURNAL_OPS};

/// The subcommands that act on one mount, the same in both tools.
#[derive(Subcommand)]
pub enum MountCmd {
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

impl MountCmd {
    /// The checks clap cannot express; a failure exits as a usage error
    /// (code 2) with the usage of the tool `C`.
    pub fn validate<C: CommandFactory>(&self) {
        match self {
            MountCmd::Prune(p) if p.is_empty() => C::command()
                .error(
                    clap::error::ErrorKind::MissingRequiredArgument,
                    "prune needs at least one --keep-* rule (with none, every checkpoint would be deleted)",
                )
                .exit(),
            MountCmd::Restore { paths, .. } => {
                if let Some(p) = paths.iter().find(|p| !p.starts_with('/')) {
                    C::command()
                        .error(
                            clap::error::ErrorKind::ValueValidation,
                            format!("restore takes union paths starting with '/' (such as /etc/hosts), not '{p}'"),
                        )
                        .exit();
                }
            }
            _ => {}
        }
    }
}

#[derive(clap::Args)]
pub struct LogArgs {
    /// Records at or after this time [T: 2026-11-25T10:00:00Z, 10m, 2h, 3d, unix seconds].
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub since: Option<i64>,
    /// Records at or before this time.
    #[arg(long, value_name = "T", value_parser = parse_time)]
    pub until: Option<i64>,
    /// Union path prefix: /etc matches /etc and everything below it.
    #[arg(long, value_name = "PREFIX")]
    pub path: Option<String>,
    /// Only these operations (repeat, or separate with commas).
    #[arg(long = "op", value_name = "OP", value_delimiter = ',',
          value_parser = clap::builder::PossibleValuesParser::new(JOURNAL_OPS))]
    pub ops: Vec<String>,
    /// Process name (comm), exact.
    #[arg(long, value_name = "NAME")]
    pub comm: Option<String>,
    #[arg(long, value_name = "N")]
    pub uid: Option<u32>,
    /// Records with sequence number >= N.
    #[arg(long, value_name = "N")]
    pub from_seq: Option<u64>,
    /// At most N records (server default 1000, at most 100000).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=100000))]
    pub limit: Option<u64>,
}

impl LogArgs {
    /// The options as a journal query (times already in nanoseconds).
    pub fn into_query(self) -> JournalQuery {
        JournalQuery {
            from_seq: self.from_seq,
            since_ns: self.since,
            until_ns: self.until,
            path_prefix: self.path,
            ops: self.ops,
            comm: self.comm,
            uid: self.uid,
            limit: self.limit,
        }
    }
}

/// The hint printed after a page of `records` that may not be the last one
/// (a full page of `limit`, by default the server's 1000).
pub fn log_more_hint(records: &[JournalRecord], limit: Option<u64>) -> Option<String> {
    if records.len() as u64 != limit.unwrap_or(1000) {
        return None;
    }
    let next = records.last().map_or(0, |r| r.seq + 1);
    Some(format!(
        "(showing the first {} records; continue with --from-seq {next})",
        records.len()
    ))
}

#[derive(Subcommand)]
pub enum CheckpointCmd {
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
pub struct PruneArgs {
    /// Keep the N newest checkpoints.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest checkpoint of each of the last N hours.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest checkpoint of each of the last N days.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest checkpoint of each of the last N weeks.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
}

impl PruneArgs {
    /// The rules by their wire names, in a fixed order.
    pub fn rules(&self) -> [(&'static str, Option<u32>); 4] {
        [
            ("keep_last", self.keep_last),
            ("keep_hourly", self.keep_hourly),
            ("keep_daily", self.keep_daily),
            ("keep_weekly", self.keep_weekly),
        ]
    }

    /// No rule given (prune would keep nothing).
    pub fn is_empty(&self) -> bool {
        self.rules().iter().all(|(_, v)| v.is_none())
    }

    pub fn retention(&self) -> Retention {
        Retention {
            keep_last: self.keep_last,
            keep_hourly: self.keep_hourly,
            keep_daily: self.keep_daily,
            keep_weekly: self.keep_weekly,
        }
    }
}

// ---- Output ---------------------------------------------------------------

/// Write and flush to stdout; false if stdout is gone (`| head`). Any other
/// write error ends the tool `prog` with exit code 1.
pub fn emit(prog: &str, s: &str) -> bool {
    render::emit(s).unwrap_or_else(|e| {
        eprintln!("{prog}: cannot write the output: {e}");
        std::process::exit(1)
    })
}

/// Write to stdout; a closed pipe ends the program quietly.
pub fn out(prog: &str, s: &str) {
    if !emit(prog, s) {
        std::process::exit(0);
    }
}

pub fn print_json(prog: &str, v: &Value) {
    out(prog, &render::pretty_json(v));
}

/// A list result: a bare array, or an object holding it under `key`.
pub fn list_value<'a>(v: &'a Value, key: &str) -> &'a Value {
    match v.get(key) {
        Some(inner) if v.is_object() => inner,
        _ => v,
    }
}
