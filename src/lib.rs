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
//! Layers, from the bottom: [`gpu`] (device, shaders, pipelines, buffers), [`kernels`] (one
//! module per shader file, each with its CPU reference), and the host layers above them.

pub mod bytes;
pub mod codec;
pub mod data;
pub mod error;
pub mod eval;
pub mod fl;
pub mod generate;
pub mod gpu;
pub mod io;
pub mod kernels;
pub mod loss;
pub mod model;
pub mod nn;
pub mod rng;

pub use error::{Error, GpuError, Result};
