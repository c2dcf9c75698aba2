//! `tensafe scan PATH...`: what each file would do if loaded with pickle.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Args;
use tensafe_pickle::{scan_file, ScanOptions, ScanReport, Severity, Verdict};

/// Arguments of `tensafe scan`.
#[derive(Args)]
pub struct ScanArgs {
    /// Files, or folders to scan recursively (links to files are scanned, links to folders are not followed).
    #[arg(required = true)]
    paths: Vec<PathBuf>,
    /// Print one JSON report per file (a JSON array).
    #[arg(long)]
    json: bool,
    /// Accept objects of this class (`module.Name` or `module.*`) as not a
    /// finding. Repeatable.
    #[arg(long = "allow-class", value_name = "PATTERN")]
    allow_class: Vec<String>,
    /// Show every import and call, not only findings.
    #[arg(long, short)]
    verbose: bool,
}

/// The files under `path`, in name order, into `out`. A path given on the
/// command line is followed wherever it links; inside a directory, links to
/// directories are not (they could loop) and are listed in `skipped`.
fn collect(path: &Path, given: bool, out: &mut Vec<PathBuf>, skipped: &mut Vec<PathBuf>) {
    let metadata = if given { std::fs::metadata(path) } else { std::fs::symlink_metadata(path) };
    match metadata {
        Ok(m) if m.is_dir() => {
            let mut entries: Vec<PathBuf> = match std::fs::read_dir(path) {
                Ok(rd) => rd.filter_map(|e| e.ok().map(|e| e.path())).collect(),
                Err(_) => {
                    out.push(path.to_owned());
                    return;
                }
            };
            entries.sort();
            for e in entries {
                collect(&e, false, out, skipped);
            }
        }
        Ok(m) if m.file_type().is_symlink() && path.is_dir() => skipped.push(path.to_owned()),
        _ => out.push(path.to_owned()),
    }
}

/// Runs the subcommand. Exit codes: 0 every file holds only allowlisted
/// content; 1 something suspicious or dangerous was found; 2 a file could
/// not be scanned completely (malformed, unreadable) and nothing worse was
/// found (or there was no file to scan, or a directory link was not
/// followed: "safe" would claim too much); 3 a
/// file is in a container the scanner does not open (a compressed wrapper)
/// and nothing of the above was found.
pub fn run(args: &ScanArgs) -> ExitCode {
    let options = ScanOptions { allow_opaque: args.allow_class.clone(), ..Default::default() };
    let (mut files, mut skipped) = (Vec::new(), Vec::new());
    for p in &args.paths {
        collect(p, true, &mut files, &mut skipped);
    }
    for link in &skipped {
        say_err!("tensafe scan: not following {}, a link to a directory (scan it by its own path)", link.display());
    }
    if files.is_empty() {
        say_err!("tensafe scan: no file to scan");
        return ExitCode::from(2);
    }
    let reports: Vec<ScanReport> = files.iter().map(|f| scan_file(f, &options)).collect();
    if args.json {
        crate::emit_json(&reports);
    } else {
        for r in &reports {
            print_report(r, args.verbose);
        }
    }
    let worst = reports.iter().map(|r| r.verdict).max().unwrap_or(Verdict::Safe);
    let flagged = reports.iter().any(|r| matches!(r.verdict, Verdict::Suspicious | Verdict::Dangerous));
    // A directory link not followed is a part not scanned.
    let incomplete = !skipped.is_empty() || reports.iter().any(|r| r.verdict == Verdict::Error && !r.unsupported);
    if flagged {
        ExitCode::from(1)
    } else if incomplete {
        ExitCode::from(2)
    } else if worst == Verdict::Error {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    }
}

fn label(v: Verdict) -> &'static str {
    match v {
        Verdict::Safe => "SAFE",
        Verdict::Suspicious => "SUSPICIOUS",
        Verdict::Dangerous => "DANGEROUS",
        Verdict::Error => "ERROR",
    }
}

fn print_report(r: &ScanReport, verbose: bool) {
    let tensors = if r.tensors.is_empty() { String::new() } else { format!(", {}", crate::count(r.tensors.len(), "tensor")) };
    say!("{:<10}  {}  ({}{tensors})", label(r.verdict), r.path, r.container);
    if let Some(e) = &r.error {
        say!("  error: {e}");
    }
    let show = |s: Severity| verbose || s > Severity::Safe;
    for f in r.findings.iter().filter(|f| show(f.severity)) {
        say!("  [{:?}] {}: {}", f.severity, f.kind, f.detail);
    }
    for p in &r.pickles {
        let rep = &p.report;
        for i in rep.imports.iter().filter(|i| show(i.severity)) {
            let raw = i.raw.as_ref().map(|r| format!(" (written as {r})")).unwrap_or_default();
            say!("  [{:?}] {}, opcode at {}: {} {}{raw} ({})", i.severity, rep.name, i.offset, i.opcode, i.global, i.status);
        }
        for c in rep.calls.iter().filter(|c| show(c.severity)) {
            // Reachability matters for calls that would run code; modelled
            // calls are consumed by the rebuild that follows them.
            let reach = match (c.severity, c.reachable) {
                (Severity::Safe, _) => "",
                (_, true) => " [result reachable from the unpickled object]",
                (_, false) => " [result discarded or only in the memo: it would run all the same]",
            };
            say!("  [{:?}] {}, opcode at {}: {} {} {}{reach}", c.severity, rep.name, c.offset, c.opcode, c.callee, c.args);
        }
        for a in rep.anomalies.iter().filter(|a| show(a.severity)) {
            say!("  [{:?}] {}, opcode at {}: {}: {}", a.severity, rep.name, a.offset, a.kind, a.detail);
        }
        if rep.dropped_events > 0 && (verbose || rep.severity() > Severity::Safe) {
            say!("  {}: {} more {} not recorded", rep.name, rep.dropped_events, crate::plural(u128::from(rep.dropped_events), "event"));
        }
        // Already said as the file's error when it stopped the scan.
        if let Some(e) = rep.error.as_ref().filter(|e| !r.error.as_ref().is_some_and(|whole| whole.starts_with(e.as_str()))) {
            say!("  {}: stopped: {e}", rep.name);
        }
    }
}
