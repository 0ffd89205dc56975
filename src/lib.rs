//! encimg: disk images, disks and snapshots encrypted at rest with envelope encryption
//! (a data key per resource, wrapped by a customer master key), exposed through FUSE.
//!
//! Layers, bottom up: `crypto` (sector ciphers, key wrap), `format` (the on-disk header),
//! `kms` (the key store), `store` (resources and their operations), `cache` (plaintext
//! sectors), `control` (control-file requests and jobs), `fs` (the fuser-free filesystem
//! core), `fuse` (the thin kernel adapter), `mount` (the daemon), `cli`. `region` turns a
//! region name into its location and key service (a `store::Store`).
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod account;
pub mod cache;
pub mod cli;
pub mod control;
pub mod crypto;
pub mod error;
pub mod format;
pub mod fs;
pub mod fuse;
pub mod kms;
pub mod mount;
pub mod objstore;
pub mod region;
pub mod serve;
pub mod store;
pub mod sys;

pub use error::{Error, ErrorKind, Result};
