//! Disk image files (qcow2, vmdk, vhdx, vdi, vpc, qed) given as plain file
//! or device sources: read as the disk they hold, through a local
//! read-only qemu-nbd export, never as container bytes.
//!
//! The format is recognised by its magic ([`probe`]); `raw` is anything
//! else. A guest controls the bytes of a raw disk and can make them look
//! like a qcow2 header that names a backing file or an external data file
//! anywhere on the proxy (the classic format-probing hole), so a probed
//! image that refers to other files is refused: name the format
//! explicitly (`--format qcow2`) to read through its backing chain.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

use datamover::format::manifest::SourceInfo;
use datamover::source::BlockSource;
use datamover::{Error, Result};

use crate::nbd::{ConnectOptions, NbdSource};
use crate::qemu::local::LocalExport;

/// Formats read through qemu-nbd (QEMU's driver names).
pub const FORMATS: &[&str] = &["qcow2", "qcow", "vmdk", "vhdx", "vdi", "vpc", "qed"];

/// The format of the image at `path` by its magic: `None` for raw.
pub fn probe(path: &Path) -> Result<Option<&'static str>> {
    let mut f = std::fs::File::open(path).map_err(|e| Error::io("open", path, e))?;
    let mut h = [0u8; 512];
    let mut n = 0;
    while n < h.len() {
        match f.read(&mut h[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(Error::io("read", path, e)),
        }
    }
    let h = &h[..n];
    let at = |o: usize, m: &[u8]| h.get(o..o + m.len()) == Some(m);
    Ok(if at(0, b"QFI\xfb") {
        match h
            .get(4..8)
            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
        {
            Some(1) => Some("qcow"),
            _ => Some("qcow2"),
        }
    } else if at(0, b"KDMV") {
        Some("vmdk")
    } else if at(0, b"vhdxfile") {
        Some("vhdx")
    } else if at(0, b"conectix") {
        Some("vpc")
    } else if at(0, b"QED\0") {
        Some("qed")
    } else if at(0x40, &0xbeda_107f_u32.to_le_bytes()) {
        Some("vdi")
    } else {
        None
    })
}

/// What `qemu-img info` says the image refers to: its backing file and
/// external data file.
fn references(path: &Path, format: &str) -> Result<Vec<String>> {
    let out = crate::qemu::local::run(
        Command::new("qemu-img")
            .args(["info", "--output=json", "-U", "-f", format])
            .arg(path),
        &format!("inspect {}", path.display()),
    )?;
    let v: serde_json::Value =
        serde_json::from_str(&out).map_err(|e| Error::Internal(format!("qemu-img info: {e}")))?;
    let mut refs = Vec::new();
    if let Some(b) = v["full-backing-filename"]
        .as_str()
        .or(v["backing-filename"].as_str())
    {
        refs.push(format!("backing file {b}"));
    }
    if let Some(d) = v["format-specific"]["data"]["data-file"].as_str() {
        refs.push(format!("data file {d}"));
    }
    Ok(refs)
}

/// How to read a path: `format` is `auto` (probe), `raw`, or one of
/// [`FORMATS`].
pub fn open(path: &Path, format: &str, nbd: &ConnectOptions) -> Result<Box<dyn BlockSource>> {
    use std::os::unix::fs::FileTypeExt;
    // What is not an image file or a device gets the core's clear error.
    let readable =
        std::fs::metadata(path).is_ok_and(|m| m.is_file() || m.file_type().is_block_device());
    if !readable {
        return datamover::source::open_local(path);
    }
    let (fmt, probed) = match format {
        "auto" => match probe(path)? {
            None => return datamover::source::open_local(path),
            Some(f) => (f, true),
        },
        "raw" => return datamover::source::open_local(path),
        f => match FORMATS.iter().find(|k| **k == f) {
            Some(k) => (*k, false),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "unknown image format {f:?}: use auto, raw, {}",
                    FORMATS.join(", ")
                )));
            }
        },
    };
    if probed {
        let refs = references(path, fmt)?;
        if !refs.is_empty() {
            return Err(Error::InvalidArgument(format!(
                "{} looks like a {fmt} image that refers to other files ({}): a raw disk written by a guest can look like this, so it is not followed on a guess; give --format {fmt} (Python: format=\"{fmt}\") to read it through them, or --format raw for the bytes",
                path.display(),
                refs.join(", ")
            )));
        }
    }
    let export = LocalExport::start(path, fmt, None)?;
    let inner = NbdSource::connect(export.uri(), nbd)?;
    Ok(Box::new(ImageSource {
        inner,
        _export: export,
        path: path.to_path_buf(),
        format: fmt,
    }))
}

/// An image file read as its disk (through a local qemu-nbd export,
/// stopped on drop).
struct ImageSource {
    inner: NbdSource,
    _export: LocalExport,
    path: PathBuf,
    format: &'static str,
}

impl std::fmt::Debug for ImageSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageSource")
            .field("path", &self.path)
            .field("format", &self.format)
            .finish()
    }
}

impl BlockSource for ImageSource {
    crate::forward_reads!(inner);
    fn info(&self) -> SourceInfo {
        SourceInfo {
            kind: self.format.into(),
            location: self.path.display().to_string(),
        }
    }
    fn transport(&self) -> &'static str {
        "file"
    }
}
