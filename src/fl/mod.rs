//! Federated learning: the client trainer, upload messages, the server and its strategies,
//! and the in-process simulation of a run.

pub mod checkpoint;
pub mod client;
pub mod config;
pub mod dp;
pub mod message;
mod records;
mod run;
pub mod server;
pub mod simulation;

pub use client::{ClientState, LocalRun, Trainer};
pub use config::{DpConfig, FeatureSpace, LossChoice, TrainConfig};
pub use server::{AggregateReport, Failure, FailureReason, Prism, ServerModel, Strategy};
