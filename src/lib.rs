//! layerfs: a FUSE union of read-only repository layers under a per-server
//! writable overlay. See docs/ARCHITECTURE.md for the map of modules.

pub mod attrs;
pub mod cache;
pub mod checkpoint;
pub mod cli;
pub mod control;
pub mod copyup;
pub mod dirmerge;
pub mod files;
pub mod fs;
pub mod fuse_dev;
pub mod fuse_ring;
pub mod fuse_wire;
pub mod inode;
pub mod iomode;
pub mod journal;
pub mod layers;
pub mod mount;
pub mod namespace;
pub mod options;
pub mod prefetch;
pub mod store;
pub mod sys;
pub mod union;
pub mod whiteout;
