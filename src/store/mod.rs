//! The checkpoint store: content-addressed objects (blake3) on the overlay
//! partition, tree objects describing the upper layer, incremental capture,
//! diff, and applying a stored tree back onto the upper.

pub mod apply;
pub mod capture;
pub mod diff;
pub mod objects;
pub mod tree;

pub use tree::{Entry, Hash, Payload, Tree};
