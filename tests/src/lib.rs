//! Shared helpers for the end-to-end tests.
pub mod admin;
pub mod config;
pub mod consul;
pub mod ctrl;
pub mod embedded;
pub mod etcd;
pub mod eventually;
pub mod fleet;
pub mod harness;
pub mod metrics;
pub mod redis;
pub mod tls;
pub mod watch;
