//! Generators: architectures as layer lists ([`arch`]), one module per layer kind (`layers`),
//! their GPU instantiation with recorded forward and backward programs ([`network`], walked by
//! `record`), and a CPU reference of both passes ([`cpu`]).

pub mod arch;
pub mod cpu;
mod layers;
pub mod network;
mod record;

pub use arch::{Architecture, Layer, Shape, PRESETS};
pub use network::{
    Backward, BuildOptions, MaskedLayer, Network, Normalisation, Program, Tap, WeightMode, Wiring,
};
