//! OpenSandbox `BatchSandbox` and `Pool` controller.
#![forbid(unsafe_code)]

pub mod cli;
pub mod controller;
pub mod runtime;
pub mod webhook;
