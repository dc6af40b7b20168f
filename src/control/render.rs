//! Human output shared by the command lines (`layerfs-ctl` for one mount,
//! `layerctl` through the agent): tables of journal records and checkpoints,
//! diff lines, reports, UTC times, time arguments, and escaping of control
//! characters. Everything returns strings; the callers decide where they go.

use std::io::Write;
use std::time::{SystemTime, UNIX_EPOCH};

use super::proto::{
    CheckpointInfo, DiffEntry, JournalRecord, PruneReport, RollbackReport, Status, VerifyReport,
};

/// What a time argument may look like (for help and error messages).
pub const TIME_HELP: &str =
    "2026-11-25T10:00:00Z (no offset: UTC), 10m / 2h / 3d / 1w ago, or unix seconds";

/// Journal operation names (`--op`).
pub const JOURNAL_OPS: &[&str] = &[
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

// ---- Results ----------------------------------------------------------------

pub fn render_status(s: &Status) -> String {
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

/// `checkpoint show`.
pub fn render_show(c: &CheckpointInfo) -> String {
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

/// `checkpoint create`: one line.
pub fn render_created(c: &CheckpointInfo) -> String {
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
}

/// `checkpoint list`.
pub fn render_list(list: &[CheckpointInfo]) -> String {
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

/// `checkpoint delete`: the report is optional (an older server may send none).
pub fn render_deleted(name: &str, report: Option<&PruneReport>) -> String {
    let mut s = format!("deleted checkpoint {}", clean(name));
    if let Some(r) = report {
        s.push_str(&format!(" (freed {})", fmt_bytes(r.freed_bytes)));
    }
    s.push('\n');
    s
}

/// Journal records as a table (`log`).
pub fn render_log(records: &[JournalRecord]) -> String {
    let mut t = Table::new(
        &["SEQ", "TIME", "OP", "PATH", "UID", "PID", "COMM", "DETAIL"],
        &[0, 4, 5],
    );
    for r in records {
        t.row(vec![
            r.seq.to_string(),
            fmt_time(r.time_ns),
            record_ops(r),
            record_path(r),
            r.uid.to_string(),
            r.pid.to_string(),
            clean(&r.comm),
            r.detail.as_deref().map(clean).unwrap_or_default(),
        ]);
    }
    t.render()
}

/// "create" or, with changes folded in, "create+write+chmod".
pub fn record_ops(r: &JournalRecord) -> String {
    let mut s = clean(&r.op);
    for o in &r.also {
        s.push('+');
        s.push_str(&clean(o));
    }
    s
}

/// "path" or "path -> path2" (rename, link).
pub fn record_path(r: &JournalRecord) -> String {
    match &r.path2 {
        Some(p2) => format!("{} -> {}", clean(&r.path), clean(p2)),
        None => clean(&r.path),
    }
}

/// One record of `follow` (a stream cannot be aligned as a whole).
pub fn follow_line(r: &JournalRecord) -> String {
    let mut s = format!(
        "{:>8}  {}  {:<11}  {}  uid={} pid={} comm={}",
        r.seq,
        fmt_time(r.time_ns),
        record_ops(r),
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

/// `checkpoint diff`: "A|M|D  path  (kind / size / hash)" lines.
pub fn render_diff(entries: &[DiffEntry]) -> String {
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

/// `rollback` report; `tool` names the command that rolls forward again
/// ("layerfs-ctl", "layerctl -m root").
pub fn render_rollback(r: &RollbackReport, tool: &str) -> String {
    let mut s = format!(
        "rolled back to {}: {} path(s) changed (writes held {}, took {})\n",
        clean(&r.checkpoint),
        r.changed_paths,
        fmt_ms(r.hold_ms),
        fmt_ms(r.took_ms)
    );
    if let Some(saved) = &r.saved_as {
        s.push_str(&format!(
            "the state before is saved as checkpoint {0} ({tool} rollback {0} goes back)\n",
            clean(saved)
        ));
    }
    s
}

/// `restore` report.
pub fn render_restore(r: &RollbackReport) -> String {
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
}

/// `verify` report: one line when clean, else a table of the problems.
pub fn render_verify(r: &VerifyReport) -> String {
    if r.problems.is_empty() {
        return format!(
            "verified {} objects ({}): no problems\n",
            r.objects,
            fmt_bytes(r.bytes)
        );
    }
    let mut t = Table::new(&["CHECKPOINT", "PATH", "OBJECT", "PROBLEM"], &[]);
    for p in &r.problems {
        t.row(vec![
            clean(&p.checkpoint),
            clean(&p.path),
            clean(&p.object),
            clean(&p.problem),
        ]);
    }
    t.render()
}

/// The one-line summary of a verify that found problems (for stderr).
pub fn verify_summary(r: &VerifyReport) -> String {
    format!(
        "verify found {} problem(s) in {} objects",
        r.problems.len(),
        r.objects
    )
}

/// `prune` (and checkpoint delete with `--json` off) report.
pub fn render_prune(r: &PruneReport) -> String {
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
}

// ---- Layout -------------------------------------------------------------------

/// "key: value" lines with the values aligned.
pub fn render_pairs(pairs: &[(String, String)]) -> String {
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
pub struct Table {
    head: Vec<String>,
    right: Vec<bool>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// `right`: indexes of right-aligned (numeric) columns.
    pub fn new(head: &[&str], right: &[usize]) -> Table {
        Table {
            head: head.iter().map(|h| h.to_string()).collect(),
            right: (0..head.len()).map(|i| right.contains(&i)).collect(),
            rows: Vec::new(),
        }
    }

    /// Cells are printed as given: escape untrusted text with `clean` first.
    pub fn row(&mut self, r: Vec<String>) {
        self.rows.push(r);
    }

    pub fn render(&self) -> String {
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
pub fn clean(s: &str) -> String {
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

pub fn fmt_bytes(n: u64) -> String {
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

pub fn fmt_ms(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1000.0)
    } else {
        format!("{ms:.1} ms")
    }
}

/// `v` as indented JSON with a final newline (`--json` output).
pub fn pretty_json(v: &serde_json::Value) -> String {
    let s = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    format!("{s}\n")
}

/// Write and flush `s` to stdout. `Ok(false)`: stdout is gone (a closed pipe,
/// `| head`), and the caller should end quietly.
pub fn emit(s: &str) -> std::io::Result<bool> {
    let mut o = std::io::stdout().lock();
    match o.write_all(s.as_bytes()).and_then(|_| o.flush()) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(false),
        Err(e) => Err(e),
    }
}

// ---- Time -------------------------------------------------------------------

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
pub fn fmt_time(ns: i64) -> String {
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

/// The current time in unix nanoseconds.
pub fn now_ns() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

/// A time argument as unix nanoseconds (a clap `value_parser`).
pub fn parse_time(s: &str) -> Result<i64, String> {
    parse_time_at(s, now_ns()).ok_or_else(|| format!("'{s}' is not a time; use {TIME_HELP}"))
}

/// A time argument relative to `now` (unix ns): "now", "10m" / "2h ago"
/// (s, m, h, d, w), unix seconds with an optional fraction, or RFC 3339.
pub fn parse_time_at(s: &str, now: i64) -> Option<i64> {
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
    let y: i64 = digits(s.get(0..4)?)?;
    let mo: u32 = digits(s.get(5..7)?)?;
    let d: u32 = digits(s.get(8..10)?)?;
    if !(1..=12).contains(&mo) || d == 0 || d > days_in_month(y, mo) {
        return None;
    }
    let mut rest = s.get(10..)?;
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
            let oh: i64 = digits(hm.get(..2)?)?;
            let om: i64 = digits(hm.get(2..)?)?;
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
            // Multi-byte characters where digits are expected must not panic.
            "2026-11-0é",
            "2026-11-25T10:00+0é0",
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

    #[test]
    fn reports() {
        let r = RollbackReport {
            checkpoint: "nightly".into(),
            saved_as: Some("auto-1".into()),
            changed_paths: 3,
            hold_ms: 1.0,
            took_ms: 2500.0,
        };
        assert_eq!(
            render_rollback(&r, "layerctl"),
            "rolled back to nightly: 3 path(s) changed (writes held 1.0 ms, took 2.50 s)\n\
             the state before is saved as checkpoint auto-1 (layerctl rollback auto-1 goes back)\n"
        );
        let p = PruneReport {
            deleted: vec![],
            kept: vec!["a".into(), "b\x07".into()],
            freed_bytes: 0,
        };
        assert_eq!(
            render_prune(&p),
            "deleted (0): -\nkept (2):    a, b\\u{7}\nfreed:       0 B\n"
        );
        assert_eq!(
            render_deleted("old", None),
            "deleted checkpoint old\n".to_string()
        );
    }
}
