//! `tensafe convert IN OUT`: pickle checkpoint → safetensors, without
//! executing the pickle.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use clap::Args;
use tensafe_pickle::{ConvertOptions, ConvertReport, ExtractOptions, LoadOptions};

/// Arguments of `tensafe convert`.
#[derive(Args)]
pub struct ConvertArgs {
    /// A torch checkpoint (.bin/.pt/.pth/.ckpt: detected by content), a
    /// sharded one (its `*.index.json` or the folder holding it), or a folder
    /// holding `pytorch_model.bin`.
    input: PathBuf,
    /// The .safetensors file to write, or its URL (s3://, gs://, az://); for
    /// an existing folder, `model.safetensors` in it; for a sharded input,
    /// the output folder.
    output: PathBuf,
    #[command(flatten)]
    reading: ReadingArgs,
    /// Keep non-tensor values (epoch, hyper-parameters…) as JSON strings in `__metadata__`.
    #[arg(long)]
    keep_metadata: bool,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// How a torch checkpoint is read into named tensors: `convert`'s options,
/// which `diff` takes too so that it reads a checkpoint as `convert` with
/// the same options writes it.
#[derive(Args)]
pub struct ReadingArgs {
    /// Dotted key of the state dict inside the checkpoint (e.g. `model` or `state_dict`).
    #[arg(long)]
    key: Option<String>,
    /// Take every tensor in every container when no state dict is found
    /// (named by their path, joined with `.`).
    #[arg(long)]
    flatten: bool,
    /// Also take optimizer state (named `optimizer.…`).
    #[arg(long)]
    include_optimizer: bool,
    /// Keep exact aliases once; the file's metadata maps each removed name
    /// to the kept one (the reference's save_model convention).
    #[arg(long)]
    dedupe: bool,
    /// Map BOOL bytes other than 0/1 to 1 instead of refusing the file.
    #[arg(long)]
    lenient_bool: bool,
    /// Refuse meta tensors instead of skipping them.
    #[arg(long)]
    strict_meta: bool,
    /// Accept objects of this class as opaque data (`module.Name` or
    /// `module.*`); they are never executed. Repeatable.
    #[arg(long = "allow-class", value_name = "PATTERN")]
    allow_class: Vec<String>,
}

impl ReadingArgs {
    pub(crate) fn options(&self, keep_metadata: bool) -> ConvertOptions {
        ConvertOptions {
            load: LoadOptions { allow_opaque: self.allow_class.clone(), ..Default::default() },
            extract: ExtractOptions {
                key: self.key.clone(),
                flatten: self.flatten,
                include_optimizer: self.include_optimizer,
                strict_meta: self.strict_meta,
            },
            dedupe: self.dedupe,
            keep_non_tensors: keep_metadata,
            lenient_bool: self.lenient_bool,
            format_metadata: true,
        }
    }
}

/// The index file of a sharded torch checkpoint named by `input` (the index,
/// or a folder holding `pytorch_model.bin.index.json`), if it is one.
pub(crate) fn sharded_index(input: &Path) -> Option<PathBuf> {
    if input.is_dir() {
        let index = input.join("pytorch_model.bin.index.json");
        return index.is_file().then_some(index);
    }
    input.to_string_lossy().ends_with(".index.json").then(|| input.to_owned())
}

/// The torch checkpoint file `input` names: itself, or the
/// `pytorch_model.bin` in a folder holding one.
pub(crate) fn single_input(input: &Path) -> PathBuf {
    match input.join("pytorch_model.bin") {
        single if input.is_dir() && single.is_file() => single,
        _ => input.to_owned(),
    }
}

/// Runs the subcommand. Exit codes: 0 converted, 1 refused or failed.
pub fn run(args: &ConvertArgs) -> ExitCode {
    let options = args.reading.options(args.keep_metadata);
    let start = Instant::now();
    if let Some(url) = crate::remote::url(&args.input) {
        say_err!("tensafe convert: {url}: the input must be a local file (a pickle is checked as a whole, so it would be downloaded first); download it, then convert it");
        return ExitCode::FAILURE;
    }
    let output_url = crate::remote::url(&args.output);
    if let (Some(index), Some(url)) = (sharded_index(&args.input), output_url) {
        say_err!(
            "tensafe convert: {}: a sharded checkpoint converts into a local directory; then upload it with `tensafe reshard DIR {url}`",
            index.display()
        );
        return ExitCode::FAILURE;
    }
    // What is converted: a torch index (named, or in a folder), else one
    // file (named, or a folder's pytorch_model.bin). Already safetensors (a
    // file, index or folder, or a pytorch_model.bin that is one): refused.
    let folder_index = sharded_index(&args.input).filter(|index| index != &args.input);
    let single = single_input(&args.input);
    if folder_index.is_none() && tensafe::ShardedCheckpoint::open(&single).is_ok() {
        say_err!("tensafe convert: {} is already a safetensors checkpoint: nothing to convert", single.display());
        return ExitCode::FAILURE;
    }
    if folder_index.is_none() && single.is_dir() {
        say_err!("tensafe convert: {}: a folder with no torch checkpoint in it (pytorch_model.bin, or pytorch_model.bin.index.json and its shards)", args.input.display());
        return ExitCode::FAILURE;
    }
    if let Some(index) = sharded_index(&args.input) {
        return match tensafe_pickle::convert_sharded(&index, &args.output, &options) {
            Ok(report) => {
                if args.json {
                    crate::emit_json(&report);
                } else {
                    for (input, output, r) in &report.shards {
                        say!("{input} → {output}: {}, {}", crate::count(r.tensors.len(), "tensor"), crate::human_bytes(r.data_bytes as u128));
                        print_details(r);
                    }
                    say!(
                        "wrote {} and {} ({}) in {:.2} s",
                        crate::count(report.shards.len(), "shard"),
                        report.index.display(),
                        crate::human_bytes(report.total_size as u128),
                        start.elapsed().as_secs_f64()
                    );
                }
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e),
        };
    }
    // A folder holding an unsharded `pytorch_model.bin`; a folder as output.
    let input = single;
    let into_dir = output_url.is_none() && args.output.is_dir();
    let output = if into_dir { args.output.join(tensafe::SINGLE_FILE) } else { args.output.clone() };
    let converted = match output_url {
        // A "directory" URL gets `model.safetensors` in it, like a local folder.
        Some(url) if url.ends_with('/') => convert_to_url(&input, &format!("{url}{}", tensafe::SINGLE_FILE), &options),
        Some(url) => convert_to_url(&input, url, &options),
        None => tensafe_pickle::convert_file(&input, &output, &options).map_err(|e| failure(&e)).and_then(|report| {
            // Into a folder: an earlier checkpoint's index or shards there
            // would hide the new file.
            match into_dir.then(|| tensafe::remove_stale_files(&args.output, &[tensafe::SINGLE_FILE.to_owned()], false)) {
                Some(Err(e)) => Err(e.to_string()),
                _ => Ok(report),
            }
        }),
    };
    match converted {
        Ok(report) => {
            if args.json {
                crate::emit_json(&report);
            } else {
                let seconds = start.elapsed().as_secs_f64();
                let root = if report.root.is_empty() { String::new() } else { format!(", state dict at `{}`", report.root) };
                say!(
                    "{} ({} format{root}) → {}: {}, {} in {:.2} s ({:.0} MB/s)",
                    input.display(),
                    report.format,
                    output.display(),
                    crate::count(report.tensors.len(), "tensor"),
                    crate::human_bytes(report.data_bytes as u128),
                    seconds,
                    report.data_bytes as f64 / seconds.max(1e-9) / 1e6
                );
                print_details(&report);
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            say_err!("tensafe convert: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Converts one checkpoint file and uploads the result to `url`, streaming
/// the tensors from the mapped input (as for a local output).
fn convert_to_url(input: &Path, url: &str, options: &ConvertOptions) -> Result<ConvertReport, String> {
    let refused = |e: tensafe_pickle::Error| format!("refused: {}: {e}", input.display());
    let bytes = tensafe_pickle::map_file(input).map_err(refused)?;
    let checkpoint = tensafe_pickle::load(&bytes, &options.load).map_err(refused)?;
    let planned = tensafe_pickle::plan_checkpoint(&checkpoint, options).map_err(refused)?;
    let tensors = planned.tensors.iter().map(|(name, plan)| (name.as_str(), plan));
    crate::remote::with_transfer_progress("upload", || {
        tensafe_remote::serialize_to_url(tensors, Some(&planned.metadata), url, &tensafe_remote::RemoteOptions::default()).map_err(|e| e.to_string())
    })?;
    Ok(planned.report)
}

fn fail(e: &tensafe_pickle::Error) -> ExitCode {
    say_err!("tensafe convert: {}", failure(e));
    ExitCode::FAILURE
}

/// What went wrong: the input refused, or the output not written (which
/// says nothing about the input).
fn failure(e: &tensafe_pickle::Error) -> String {
    match e {
        tensafe_pickle::Error::Write(_) => format!("writing the output: {e}"),
        _ => format!("refused: {e}"),
    }
}

fn print_details(r: &ConvertReport) {
    let copied: Vec<&str> = r.tensors.iter().filter(|t| t.copied).map(|t| t.name.as_str()).collect();
    if !copied.is_empty() {
        say!("  copied to contiguous / little-endian form: {}", list(&copied));
    }
    for group in &r.shared_storages {
        say!("  share one storage: {}", group.join(", "));
    }
    for (removed, kept) in &r.deduplicated {
        say!("  de-duplicated: {removed} → {kept}");
    }
    for (path, why) in &r.skipped {
        say!("  skipped {path}: {why}");
    }
    for (path, json) in &r.non_tensors {
        let shown: String = json.chars().take(100).collect();
        say!("  non-tensor {path} = {shown}{}", if json.chars().count() > 100 { "…" } else { "" });
    }
    for w in &r.warnings {
        say!("  warning: {w}");
    }
}

fn list(names: &[&str]) -> String {
    let shown = names.iter().take(8).copied().collect::<Vec<_>>().join(", ");
    if names.len() > 8 { format!("{shown}, … ({} in all)", names.len()) } else { shown }
}
