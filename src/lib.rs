//! OpenSandbox `BatchSandbox` and `Pool` controller.
#![forbid(unsafe_code)]

pub mod api;
pub mod controller;
pub mod domain;
pub mod executor;
pub mod health;
pub mod leader;
pub mod policy;
pub mod webhook;
