//! An in-process simulation of a federated run: K clients on one GPU, all randomness derived
//! from the configuration's seed (same seed, same adapter: same result), checkpoints after
//! rounds so that a killed run resumes exactly, a progress bar, a metrics log, sample grids.
//! This file is the driver [`run`]; the round loop's steps are [`Run`]'s (`fl/run.rs`), the
//! options and records `fl/records.rs`'s.

use super::config::TrainConfig;
pub use super::records::{RoundMetrics, RoundTiming, RunOptions, RunSummary};
pub use super::run::{Fit, Run};
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Runs (or resumes) a federated training, with a progress bar when `opts.progress`.
pub fn run(gpu: &Gpu, cfg: &TrainConfig, opts: &RunOptions) -> Result<RunSummary> {
    let mut run = Run::start(gpu, cfg, opts)?;
    let bar = if opts.progress {
        let pb = indicatif::ProgressBar::new(cfg.rounds as u64);
        pb.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} round {pos}/{len} {msg} [{elapsed_precise} < {eta_precise}]",
            )
            .map_err(|e| Error::invalid(e.to_string()))?,
        );
        pb.set_position(run.start_round() as u64);
        Some(pb)
    } else {
        None
    };
    while run.wants_round() {
        let m = run.round()?;
        if let Some(pb) = &bar {
            let eps = m.epsilon.map_or(String::new(), |e| format!(" eps {e:.2}"));
            let lam = m
                .lambda
                .map_or(String::new(), |l| format!(" lambda {l:.3}"));
            let loss = m.loss_last.map_or("-".into(), |l| format!("{l:.4}"));
            pb.set_message(format!("loss {loss}{lam}{eps}"));
            pb.set_position(run.rounds_done() as u64);
        }
    }
    if let Some(pb) = bar {
        pb.finish();
    }
    Ok(run.summary())
}
