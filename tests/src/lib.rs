//! Shared helpers for the end-to-end tests.
pub mod consul;
pub mod etcd;
pub mod harness;
