//! The library's API, also re-exported at the crate root: enough to train clients, aggregate
//! their uploads, run a whole federation, and generate from, evaluate or export a model file.
//! Everything else is internal (public only with the `internals` feature, which the crate's
//! own tests, benches and tools use).

pub use crate::codec::{MaskCoder, RangeCoder};
pub use crate::data::locate::Split;
pub use crate::data::partition::Partition;
pub use crate::data::resolve::load_dataset;
pub use crate::data::Dataset;
pub use crate::error::{Error, GpuError, Result};
pub use crate::eval::{evaluate, EvalRow, EvalSetup, Evaluation, Metrics};
pub use crate::fl::checkpoint::Checkpoint;
pub use crate::fl::message::{decode, encode, Payload, Upload};
pub use crate::fl::server::receive;
pub use crate::fl::simulation::{run, Fit, RoundMetrics, RoundTiming, Run, RunOptions, RunSummary};
pub use crate::fl::{
    AggregateReport, ClientState, DpConfig, Failure, FailureReason, FeatureSpace, LocalRun,
    LossChoice, Prism, ServerModel, Strategy, TrainConfig, Trainer,
};
pub use crate::generate::{ChannelStats, Generator, GeneratorOptions, PopulationStats};
pub use crate::gpu::{Gpu, GpuOptions, Tensor};
pub use crate::io::grid::{write_grid, write_images, write_npy, Images};
pub use crate::model::{from_checkpoint, load_safetensors, masks_from_scores, MaskKind, Model};
pub use crate::nn::{Architecture, Layer, Normalisation, Shape, WeightMode};
pub use crate::rng::HostRng;
