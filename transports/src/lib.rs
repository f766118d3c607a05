//! Transport modes: the ways a proxy reads a VM disk ([`BlockSource`]) and
//! writes one back ([`BlockTarget`]).
//!
//! * Local backends of the core, which serve as *Direct storage access*
//!   when the proxy sees the image file or LUN: [`FileSource`] (raw image,
//!   holes via SEEK_DATA/SEEK_HOLE), [`BlockDeviceSource`], and targets.
//! * [`nbd`]: *Network mode*, an NBD client as a source.
//!
//! Not here yet, tracked by their issues: NBD TLS, writes and CBT (#3); the
//! QMP platform with HotAdd, SAN and storage-snapshot modes and automatic
//! mode selection (#4).
//!
//! [`open_source`] is the address parser every front door uses.

pub mod nbd;

pub use datamover::source::{
    BlockDeviceSource, BlockSource, Capabilities, ExtentKind, FileSource, SourceExtent,
    open_local as open_local_source,
};
pub use datamover::target::{
    BlockDeviceTarget, BlockTarget, FileTarget, open_local as open_local_target,
};

/// Open a source by address: `nbd://`, `nbds://`, `nbd+unix://`,
/// `nbds+unix://` through the NBD client; paths and `file://` through the
/// core (which refuses the schemes whose transports are not built yet).
pub fn open_source(spec: &str) -> datamover::Result<Box<dyn BlockSource>> {
    if ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|s| spec.starts_with(s))
    {
        Ok(Box::new(nbd::NbdSource::connect(
            spec,
            &nbd::ConnectOptions::default(),
        )?))
    } else {
        datamover::source::open(spec)
    }
}
