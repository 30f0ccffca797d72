//! The `prism` command line: parses arguments, calls the library, reports. `src/main.rs`
//! only calls [`main`].

use std::path::PathBuf;
use std::process::ExitCode;

use crate::data::locate::{self, Named};
use crate::error::Error;
use crate::fl::simulation::{self, RunOptions};
use crate::generate::GeneratorOptions;
use crate::gpu::{describe_adapter, list_adapters};
use crate::model;
use clap::{CommandFactory, FromArgMatches};

mod args;

use args::*;

fn info(gpu_args: &GpuArgs) -> Result<(), Error> {
    println!("adapters wgpu can see:");
    let all = list_adapters(gpu_args.backends()?);
    if all.is_empty() {
        println!("  (none)");
    }
    for (info, compute) in all {
        let note = if compute {
            ""
        } else {
            "  [no compute shaders]"
        };
        println!("  {}{note}", describe_adapter(&info));
    }
    println!();
    let gpu = gpu_args.open()?;
    println!("selected:");
    print!("{}", gpu.report());
    Ok(())
}

fn train(a: &TrainArgs, gpu_args: &GpuArgs, given: &dyn Fn(&str) -> bool) -> Result<(), Error> {
    let cfg = a.resolve(given)?;
    cfg.validate()?;
    if a.stop_after == Some(0) {
        return Err(Error::invalid(
            "--stop-after 0 would stop before the first round: give 1 or more",
        ));
    }
    let gpu = gpu_args.open()?;
    let mut opts = RunOptions::new(&a.out);
    opts.data = a.data.clone();
    opts.fetch = !a.no_fetch;
    opts.resume = a.resume;
    opts.overwrite = a.overwrite;
    opts.progress = !a.quiet;
    opts.sample_every = a.sample_every;
    opts.eval_every = a.eval_every;
    opts.checkpoint_every = a.checkpoint_every;
    opts.stop_after = a.stop_after;
    let s = simulation::run(&gpu, &cfg, &opts)?;
    if s.rounds_done == cfg.rounds {
        let path = a.out.join("model.prism");
        let mut m = model::from_checkpoint(&s.checkpoint, model::MaskKind::Sample)?;
        m.calibrate(&gpu)?;
        m.save(&path)?;
        eprintln!(
            "model: {} ({} bytes)",
            path.display(),
            std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0)
        );
    }
    // Only files that exist are named (a run stopped before its first grid or checkpoint
    // has none).
    let written = |label: &str, p: &std::path::Path| {
        if p.exists() {
            format!("; {label}: {}", p.display())
        } else {
            String::new()
        }
    };
    eprintln!(
        "{} of {} rounds in {:.1} s{}{}",
        s.rounds_done,
        cfg.rounds,
        s.wall_s,
        written("samples", &s.grid),
        written("checkpoint", &s.checkpoint)
    );
    if let Some(m) = &s.last {
        eprintln!(
            "last round: loss {}, held-out MMD^2 {}, {:.3} bits per weight uploaded",
            m.loss_last.map_or("-".into(), |v| format!("{v:.4}")),
            m.mmd_heldout.map_or("-".into(), |v| format!("{v:.4}")),
            m.bits_per_weight
        );
    }
    let t = &s.timing;
    eprintln!(
        "time: local steps {:.1} s ({:.1} ms a step: record {:.1} s, device {:.1} s, readback \
         {:.1} s), uploads {:.1} s, aggregation {:.1} s, evaluation {:.1} s, grids {:.1} s, \
         checkpoints {:.1} s",
        t.local_record_s + t.local_device_s + t.local_readback_s,
        t.ms_per_local_step(),
        t.local_record_s,
        t.local_device_s,
        t.local_readback_s,
        t.upload_s,
        t.aggregate_s,
        t.eval_s,
        t.grid_s,
        s.checkpoint_s
    );
    Ok(())
}

fn sample(a: &SampleArgs, gpu_args: &GpuArgs) -> Result<(), Error> {
    use crate::io::grid;
    use crate::limits::{MAX_GRID_IMAGES, MAX_IMAGES};
    let (count, out) = (a.count, &a.out);
    if count == 0 || count > MAX_IMAGES {
        return Err(Error::invalid(format!(
            "--count {count}: give 1 to {MAX_IMAGES} images (latent indices are 32-bit)"
        )));
    }
    // Folders and .npy files stream; the grid is held in memory, so it has a limit.
    let streams = a.folder.is_some() || a.raw.is_some();
    if count > MAX_GRID_IMAGES && !streams {
        return Err(Error::invalid(format!(
            "{count} images would make a grid larger than its limit of {MAX_GRID_IMAGES}; \
             write them with --folder DIR or --raw FILE.npy (which stream; the grid then shows \
             the first {MAX_GRID_IMAGES})"
        )));
    }
    let m = a.source.load()?;
    let shape = m.arch.output()?;
    let drawable = grid::check_drawable(shape);
    if drawable.is_err() && (a.raw.is_none() || a.folder.is_some()) {
        return drawable;
    }
    let in_grid = if drawable.is_ok() {
        count.min(MAX_GRID_IMAGES)
    } else {
        0
    };
    let batch = a.batch.clamp(1, count);
    let per = shape.len();
    crate::limits::check_host(
        ((in_grid + 2 * batch) * per * 4) as u64,
        &format!("a grid of {in_grid} images and batches of {batch}"),
        &|_| "use fewer images (-n) or a smaller --batch".into(),
    )?;
    if a.f16 && gpu_args.portable {
        return Err(Error::invalid(
            "--f16 needs the SHADER_F16 kernels, which --portable turns off: drop one of them",
        ));
    }
    let gpu = gpu_args.open()?;
    let g = m.generator_with(
        &gpu,
        &GeneratorOptions {
            half: a.f16,
            norm: a.norm.normalisation(),
            ..GeneratorOptions::population(batch)
        },
    )?;
    let mut npy = match &a.raw {
        Some(path) => Some(grid::NpyStream::create(path, count, shape)?),
        None => None,
    };
    if let Some(dir) = &a.folder {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    }
    let mut shown: Vec<f32> = Vec::with_capacity(in_grid * per);
    let mut done = 0usize;
    let progress = if count >= 10_000 {
        indicatif::ProgressBar::new(count as u64)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let t = std::time::Instant::now();
    g.generate_each(&gpu, count, a.latents, &mut |imgs| {
        if let Some(s) = npy.as_mut() {
            s.push(imgs)?;
        }
        if let Some(dir) = &a.folder {
            for (i, img) in imgs.chunks_exact(per).enumerate() {
                grid::write_image_at(dir, img, shape, done + i)?;
            }
        }
        let room = (in_grid * per).saturating_sub(shown.len());
        shown.extend_from_slice(&imgs[..room.min(imgs.len())]);
        done += imgs.len() / per;
        progress.inc((imgs.len() / per) as u64);
        Ok(())
    })?;
    progress.finish_and_clear();
    let dt = t.elapsed().as_secs_f64();
    if let Some(s) = npy {
        s.finish()?;
    }
    let note = if in_grid == 0 {
        "no grid (not an image a PNG can show)".to_string()
    } else {
        let images = grid::Images {
            values: &shown,
            count: in_grid,
            shape,
        };
        grid::write_grid(out, &images, (in_grid as f64).sqrt().ceil() as usize)?;
        if in_grid < count {
            format!("grid of the first {in_grid}: {}", out.display())
        } else {
            format!("grid: {}", out.display())
        }
    };
    eprintln!(
        "{count} images in {dt:.2} s ({:.1} images/s); {note}",
        count as f64 / dt
    );
    Ok(())
}

fn eval(
    source: &Source,
    count: usize,
    data: Option<&PathBuf>,
    norm: &NormArgs,
    gpu_args: &GpuArgs,
) -> Result<(), Error> {
    let m = source.load()?;
    let gpu = gpu_args.open()?;
    let report = m.evaluate(&gpu, count, data.map(|p| p.as_path()), norm.normalisation())?;
    print!("{report}");
    Ok(())
}

fn export(
    source: &Source,
    out: Option<&std::path::Path>,
    st: Option<&std::path::Path>,
    gpu_args: &GpuArgs,
) -> Result<(), Error> {
    if out.is_none() && st.is_none() {
        return Err(Error::invalid(
            "give --out FILE.prism and/or --safetensors FILE",
        ));
    }
    let mut m = source.load()?;
    let f32_bytes = 4 * m.weights();
    if let Some(path) = out {
        if m.population.is_none() {
            m.calibrate(&gpu_args.open()?)?;
        }
        m.save(path)?;
        let size = std::fs::metadata(path)
            .map_err(|e| Error::io(path, e))?
            .len();
        eprintln!(
            "{}: {size} bytes for {} weights ({:.3} bits per weight; f32 weights would take {f32_bytes} bytes, {:.1} times more)",
            path.display(),
            m.weights(),
            8.0 * size as f64 / m.weights() as f64,
            f32_bytes as f64 / size as f64
        );
    }
    if let Some(path) = st {
        m.export_safetensors(path)?;
        eprintln!("{}: dense f32 weights", path.display());
    }
    Ok(())
}

/// The `prism` command: parses the process's arguments and runs the command.
pub fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // Which flags the user typed (not defaulted): they override a --config file.
    let given = |id: &str| {
        matches
            .subcommand_matches("train")
            .is_some_and(|m| typed_flags(m)(id))
    };
    let result = match &cli.command {
        Command::Info { gpu } => info(gpu),
        Command::Train { args, gpu } => train(args, gpu, &given),
        Command::Sample { args, gpu } => sample(args, gpu),
        Command::Eval {
            source,
            count,
            data,
            norm,
            gpu,
        } => eval(source, *count, data.as_ref(), norm, gpu),
        Command::Export {
            source,
            out,
            safetensors,
            gpu,
        } => export(source, out.as_deref(), safetensors.as_deref(), gpu),
        Command::Fetch { name } => match Named::parse(name) {
            Some(n) => {
                locate::fetch_into(n).map(|d| eprintln!("{} ready in {}", n.name(), d.display()))
            }
            None => Err(Error::invalid(format!(
                "unknown dataset {name:?}: mnist, fashion-mnist or cifar10"
            ))),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit_code())
        }
    }
}
