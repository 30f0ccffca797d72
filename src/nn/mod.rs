//! Generators: architectures as layer lists ([`arch`]), their GPU instantiation with recorded
//! forward and backward programs ([`network`]), and a CPU reference forward ([`cpu`]).

pub mod arch;
pub mod cpu;
pub mod network;

pub use arch::{Architecture, Layer, Shape, PRESETS};
pub use network::{Backward, BuildOptions, MaskedLayer, Network, Program, Tap, WeightMode};
