//! Transport modes: the ways a proxy reads a VM disk ([`BlockSource`]) and
//! writes one back ([`BlockTarget`]).
//!
//! Today this crate offers the local backends of the core, which serve as
//! *Direct storage access* when the proxy sees the image file or LUN:
//! [`FileSource`] (raw image, holes via SEEK_DATA/SEEK_HOLE),
//! [`BlockDeviceSource`] (LUN, LV, loop device), and their targets.
//!
//! Not here yet, and tracked by their own issues: the NBD client (network
//! mode, with structured replies, block status and TLS — issue #3), and the
//! QMP platform with HotAdd, SAN and storage-snapshot modes and automatic
//! mode selection (issue #4). Each will be a module of this crate
//! implementing the same two traits.

pub use datamover::source::{
    BlockDeviceSource, BlockSource, Capabilities, ExtentKind, FileSource, SourceExtent,
    open_local as open_local_source,
};
pub use datamover::target::{
    BlockDeviceTarget, BlockTarget, FileTarget, open_local as open_local_target,
};
