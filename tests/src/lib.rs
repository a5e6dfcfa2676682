//! Shared helpers for the end-to-end tests.
pub mod etcd;
pub mod harness;
pub mod consul;
