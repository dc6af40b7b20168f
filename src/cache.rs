//! Every kernel-cache decision of layerfs, in one place.
//!
//! Lower layers never change while mounted and every change to the upper
//! goes through layerfs, which answers each request with fresh attributes
//! and lets the kernel's own invalidation (it drops a directory's cached
//! listing and attributes after any entry operation through FUSE, and a file's
//! size/mtime after writes) keep the rest right. So entries, attributes and
//! listings can be cached for long. A change that layerfs makes on its own
//! (rollback of the whole overlay) must invalidate through the `Notifier`.
//!
//! Directory listings are always cached by the kernel: layerfs answers no
//! OPENDIR (see `fs.rs` and `dirmerge::Listings`).
//!
//! Changing the upper directly while mounted is not supported (as with
//! kernel overlayfs); such changes show after the TTL or a remount.

use std::time::Duration;

#[derive(Debug, Clone, Copy)]
pub struct CachePolicy {
    /// How long the kernel may keep a name -> inode mapping.
    pub entry_ttl: Duration,
    /// How long the kernel may keep an inode's attributes.
    pub attr_ttl: Duration,
    /// Keep file data in the page cache across opens (non-passthrough files).
    pub keep_file_cache: bool,
}

impl Default for CachePolicy {
    fn default() -> Self {
        CachePolicy {
            entry_ttl: Duration::from_secs(3600),
            attr_ttl: Duration::from_secs(3600),
            keep_file_cache: true,
        }
    }
}
