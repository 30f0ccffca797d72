//! What a run takes and what it writes down: its options, the metrics log's lines, the
//! rounds' timing, and the summary of a finished run.

use std::path::PathBuf;

use serde::Serialize;

/// Options of a run that do not change its result.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Folder for metrics, samples, checkpoints and the model.
    pub out: PathBuf,
    /// Where the dataset is (else $PRISM_DATA, ./data, ~/.cache/prism/data).
    pub data: Option<PathBuf>,
    /// Fetch the dataset when it is missing.
    pub fetch: bool,
    /// Write a sample grid every this many rounds (and after the last).
    pub sample_every: usize,
    /// Measure MMD to held-out images every this many rounds (and after the last).
    pub eval_every: usize,
    /// Save a checkpoint every this many rounds (and after the last).
    pub checkpoint_every: usize,
    /// Continue from the folder's checkpoint (an error when there is none).
    pub resume: bool,
    /// Replace the run in the folder (its files are removed first); without it, and without
    /// `resume`, a folder that holds a run is refused.
    pub overwrite: bool,
    /// Show a progress bar.
    pub progress: bool,
    /// Stop after this many rounds in this process (the run can be resumed).
    pub stop_after: Option<usize>,
}

impl RunOptions {
    pub fn new(out: impl Into<PathBuf>) -> Self {
        Self {
            out: out.into(),
            data: None,
            fetch: false,
            sample_every: 4,
            eval_every: 4,
            checkpoint_every: 1,
            resume: false,
            overwrite: false,
            progress: false,
            stop_after: None,
        }
    }
}

/// Output into `runs/mnist` (the CLI's default folder), everything else as [`RunOptions::new`]
/// (unlike the CLI: no fetching and no progress bar unless asked).
impl Default for RunOptions {
    fn default() -> Self {
        Self::new("runs/mnist")
    }
}

/// One line of the metrics log.
#[derive(Clone, Debug, Serialize)]
pub struct RoundMetrics {
    pub round: u32,
    /// Mean over participating clients of their mean local loss (None, `null` in the log,
    /// when no client trained this round).
    pub loss: Option<f64>,
    /// Mean over participating clients of their last local loss (None likewise).
    pub loss_last: Option<f64>,
    pub lambda: Option<f64>,
    pub selected: usize,
    pub valid_uploads: usize,
    /// Uploads that did not count: malformed, dropped, unexpected, duplicate, rejected.
    pub failures: usize,
    /// Of those, rejected by robust aggregation.
    pub rejected: usize,
    pub kept_previous: bool,
    /// Bits received from all clients this round.
    pub bits_up: u64,
    /// Mean bits per uploading client, and per masked weight.
    pub bits_up_per_client: f64,
    pub bits_per_weight: f64,
    /// Bits the server broadcast (f32 scores to every selected client).
    pub bits_down: u64,
    pub epsilon: Option<f64>,
    /// MMD^2 (biased, pixel space) between generated and held-out real images.
    pub mmd_heldout: Option<f64>,
    pub wall_s: f64,
    /// Where the round's wall time went (the checkpoint after it is in [`RunSummary`]).
    pub timing: RoundTiming,
}

/// Wall time of a round's phases, in seconds. The local runs' three parts are summed over
/// clients; `local_steps` counts the steps they took, so that
/// `(local_record_s + local_device_s + local_readback_s) / local_steps` is a client step's cost
/// as the run pays it, comparable with the training bench's device time of one step.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct RoundTiming {
    pub local_steps: usize,
    pub local_record_s: f64,
    pub local_device_s: f64,
    pub local_readback_s: f64,
    /// Encoding each upload as the wire message and the server's intake of it.
    pub upload_s: f64,
    /// Aggregation and MADA.
    pub aggregate_s: f64,
    /// Drawing the round's model and the held-out MMD.
    pub eval_s: f64,
    /// Generating and writing the sample grids.
    pub grid_s: f64,
}

impl RoundTiming {
    pub(crate) fn add(&mut self, o: &RoundTiming) {
        self.local_steps += o.local_steps;
        self.local_record_s += o.local_record_s;
        self.local_device_s += o.local_device_s;
        self.local_readback_s += o.local_readback_s;
        self.upload_s += o.upload_s;
        self.aggregate_s += o.aggregate_s;
        self.eval_s += o.eval_s;
        self.grid_s += o.grid_s;
    }

    /// The local runs' wall time per step, in milliseconds.
    pub fn ms_per_local_step(&self) -> f64 {
        let local = self.local_record_s + self.local_device_s + self.local_readback_s;
        1e3 * local / self.local_steps.max(1) as f64
    }
}

/// What a finished (or stopped) run produced.
#[derive(Clone, Debug)]
pub struct RunSummary {
    pub rounds_done: usize,
    pub wall_s: f64,
    pub last: Option<RoundMetrics>,
    pub grid: PathBuf,
    pub checkpoint: PathBuf,
    /// The rounds' phases summed over the rounds this run did, and its checkpoints' time.
    pub timing: RoundTiming,
    pub checkpoint_s: f64,
}

#[cfg(test)]
mod tests {
    use super::RunOptions;

    #[test]
    fn run_options_default_writes_into_the_clis_folder() {
        let o = RunOptions::default();
        assert_eq!(o.out, std::path::PathBuf::from("runs/mnist"));
        assert_eq!(
            (o.sample_every, o.eval_every, o.checkpoint_every),
            (4, 4, 1)
        );
        assert!(!o.resume && !o.fetch && o.stop_after.is_none());
    }
}
