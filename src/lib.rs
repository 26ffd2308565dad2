//! offline-bench: how fast a large language model runs offline, in one process.
//!
//! Data flows one way: a [`workload`] of tokenized requests goes into the [`engine`] (a
//! [`engine::scheduler`] over a [`engine::block`] pool; a [`engine::runner`] driving the
//! [`model`] and its paged [`attention`]), whose per-request events become the [`report`].

pub mod attention;
pub mod cli;
pub mod commands;
pub mod device;
pub mod engine;
pub mod fastmath;
pub mod gemm;
#[cfg(feature = "cuda")]
pub mod gpu;
pub mod heap;
pub mod launch;
pub mod model;
pub mod profile;
pub mod progress;
pub mod report;
pub mod shapes;
#[cfg(feature = "simt")]
pub mod simt;
pub mod tokenizer;
pub mod util;
pub mod workers;
pub mod workload;
