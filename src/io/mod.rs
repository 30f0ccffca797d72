//! Files: sample grids.

pub mod grid;
