//! # prism
//!
//! PRISM (Seo, Han, Yoo, ICLR 2025): federated learning of generative models by stochastic
//! binary masks, as hand-written WGSL compute kernels on wgpu.
//!
//! Clients share one frozen random network whose weights are regenerated from a seed inside the
//! kernels and never stored. Each client trains per-weight scores (keep probability
//! `sigmoid(s)`), samples a binary mask and uploads it at one bit per weight; the server
//! averages the masks and applies MADA. The final model is a seed plus a bit mask.
//!
//! The API is the crate root (the same items as [`prelude`]): enough to run a federation,
//! to train clients and aggregate their uploads yourself, and to generate from, evaluate or
//! export a model file. The modules behind it (GPU core, kernels, networks, losses, the host
//! layers; ARCHITECTURE.md) are internal.
//!
//! ## A whole run
//!
//! The default configuration (MNIST, 10 non-IID clients, MADA), then its 1-bit model:
//!
//! ```no_run
//! use prism::{from_checkpoint, run, Gpu, MaskKind, RunOptions, TrainConfig};
//!
//! let gpu = Gpu::new(Default::default())?; // a real GPU first, a software adapter otherwise
//! let summary = run(&gpu, &TrainConfig::default(), &RunOptions::new("runs/mnist"))?;
//! let model = from_checkpoint(&summary.checkpoint, MaskKind::Sample)?;
//! model.save("runs/mnist/model.prism".as_ref())?;
//! let images = model.generator(&gpu, 16)?.generate(&gpu, 16, 0)?; // [16, 1, 28, 28] in [-1, 1]
//! # Ok::<(), prism::Error>(())
//! ```
//!
//! ## The federation by hand
//!
//! Clients and server as separate pieces, the messages between them as bytes
//! (`examples/federation_by_hand.rs`):
//!
//! ```no_run
#![doc = include_str!("../examples/federation_by_hand.rs")]
//! ```
#![cfg_attr(not(feature = "internals"), allow(dead_code, unused_imports))]

pub mod prelude;
pub use prelude::*;

#[doc(hidden)]
pub mod cli;

// The internal modules: crate-private, or public with the `internals` feature (turned on by
// the crate's own tests, benches and tools through a dev-dependency on itself), so that those
// can reach the kernels, their CPU twins and the networks' parts. Declared one by one, not by a
// macro, so that rustfmt sees them.
#[cfg(feature = "internals")]
pub mod bytes;
#[cfg(not(feature = "internals"))]
pub(crate) mod bytes;
#[cfg(feature = "internals")]
pub mod codec;
#[cfg(not(feature = "internals"))]
pub(crate) mod codec;
#[cfg(feature = "internals")]
pub mod data;
#[cfg(not(feature = "internals"))]
pub(crate) mod data;
#[cfg(feature = "internals")]
pub mod error;
#[cfg(not(feature = "internals"))]
pub(crate) mod error;
#[cfg(feature = "internals")]
pub mod eval;
#[cfg(not(feature = "internals"))]
pub(crate) mod eval;
#[cfg(feature = "internals")]
pub mod fl;
#[cfg(not(feature = "internals"))]
pub(crate) mod fl;
#[cfg(feature = "internals")]
pub mod generate;
#[cfg(not(feature = "internals"))]
pub(crate) mod generate;
#[cfg(feature = "internals")]
pub mod gpu;
#[cfg(not(feature = "internals"))]
pub(crate) mod gpu;
#[cfg(feature = "internals")]
pub mod io;
#[cfg(not(feature = "internals"))]
pub(crate) mod io;
#[cfg(feature = "internals")]
pub mod kernels;
#[cfg(not(feature = "internals"))]
pub(crate) mod kernels;
#[cfg(feature = "internals")]
pub mod limits;
#[cfg(not(feature = "internals"))]
pub(crate) mod limits;
#[cfg(feature = "internals")]
pub mod loss;
#[cfg(not(feature = "internals"))]
pub(crate) mod loss;
#[cfg(feature = "internals")]
pub mod model;
#[cfg(not(feature = "internals"))]
pub(crate) mod model;
#[cfg(feature = "internals")]
pub mod nn;
#[cfg(not(feature = "internals"))]
pub(crate) mod nn;
#[cfg(feature = "internals")]
pub mod rng;
#[cfg(not(feature = "internals"))]
pub(crate) mod rng;
