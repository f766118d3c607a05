//! Transport modes: the ways a proxy reads a VM disk ([`BlockSource`]) and
//! writes one back ([`BlockTarget`]).
//!
//! * Local backends of the core, which serve as *Direct storage access*
//!   when the proxy sees the image file or LUN: [`FileSource`] (raw image,
//!   holes via SEEK_DATA/SEEK_HOLE), [`BlockDeviceSource`], and targets.
//! * [`nbd`]: *Network mode*, an NBD client as a source.
//!
//! Not here yet, tracked by their issues: NBD TLS and writes (#3); the
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

/// How to open a source.
#[derive(Debug, Clone, Default)]
pub struct SourceOptions {
    /// Changed-block tracking: the QEMU dirty bitmap to read changes from
    /// (NBD sources only; the export must carry it, e.g. `qemu-nbd -B NAME`).
    pub bitmap: Option<String>,
    /// Network timeout per request and for the handshake (NBD); default 60 s.
    pub timeout: Option<std::time::Duration>,
}

/// Open a source by address: `nbd://`, `nbds://`, `nbd+unix://`,
/// `nbds+unix://` through the NBD client; paths and `file://` through the
/// core (which refuses the schemes whose transports are not built yet).
pub fn open_source(spec: &str) -> datamover::Result<Box<dyn BlockSource>> {
    open_source_with(spec, &SourceOptions::default())
}

/// [`open_source`] with options.
pub fn open_source_with(
    spec: &str,
    opts: &SourceOptions,
) -> datamover::Result<Box<dyn BlockSource>> {
    if ["nbd://", "nbds://", "nbd+unix://", "nbds+unix://"]
        .iter()
        .any(|s| spec.starts_with(s))
    {
        let mut c = nbd::ConnectOptions {
            bitmap: opts.bitmap.clone(),
            ..nbd::ConnectOptions::default()
        };
        if let Some(t) = opts.timeout {
            c.timeout = t;
        }
        Ok(Box::new(nbd::NbdSource::connect(spec, &c)?))
    } else if let Some(b) = &opts.bitmap {
        Err(datamover::Error::InvalidArgument(format!(
            "dirty bitmap {b:?} asked for {spec}: changed-block tracking needs an NBD source (nbd://, nbd+unix://) exporting the bitmap"
        )))
    } else {
        datamover::source::open(spec)
    }
}
