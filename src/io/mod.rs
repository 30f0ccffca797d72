//! Files: sample grids, single images, raw float images (.npy).

pub mod grid;
