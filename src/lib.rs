//! OpenSandbox `BatchSandbox` and `Pool` controller.
#![forbid(unsafe_code)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod domain;
pub mod runtime;
pub mod webhook;
