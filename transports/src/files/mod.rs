//! File-level restore: files out of a restore point without restoring
//! the disk.
//!
//! A guest's filesystem is untrusted input, so this process never parses
//! it, and neither does its host's kernel: the point is served over NBD
//! ([`crate::export`], read-only, every chunk checked, only the chunks
//! read are loaded) on a private unix socket, and a **libguestfs
//! appliance** (a small VM libguestfs boots, with KVM when it can run a
//! guest here, else TCG) reads it: partition tables (MBR, GPT), LVM, and
//! every filesystem its kernel knows (ext2/3/4, XFS, Btrfs, vfat, NTFS
//! with ntfs-3g). A hostile filesystem can at worst crash the appliance,
//! which is then an error here. libguestfs is reached through its C API
//! ([`guestfs`]); file names and link targets stay bytes.
//!
//! Every filesystem found is mounted read-only at `/NAME` in the
//! appliance, `NAME` its device without `/dev/` (`sda1`, `vg0-data` for
//! the LV `/dev/vg0/data`), and paths given here are `/NAME/PATH`; with
//! one filesystem, `/PATH` is enough. One that does not mount (damaged,
//! unknown) is listed with the reason and refused by name; the others
//! are read.
//!
//! The fast path: one appliance serves every call made through one
//! [`Browser`] (the CLI's one command, a Python `Files` object, the
//! server's browse session), so only the first call pays its start-up.

mod guestfs;

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use serde::Serialize;

use crate::export::PointDisk;
use crate::nbd::server::{self, ExportOptions, Listener};
use datamover::{Error, PointRef, Repository, Result};
use guestfs::{Guestfs, Stat};

/// How to open a point's files.
#[derive(Debug, Clone)]
pub struct FilesOptions {
    /// Chunk cache bytes (0: the default).
    pub cache_bytes: u64,
    /// The appliance's memory in MiB.
    pub appliance_mib: i32,
}

impl Default for FilesOptions {
    fn default() -> Self {
        FilesOptions {
            cache_bytes: 0,
            appliance_mib: 512,
        }
    }
}

/// A filesystem of the point.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Filesystem {
    /// Its name in paths (`sda1`, `vg0-data`).
    pub name: String,
    /// Its device in the appliance.
    pub device: String,
    /// Its type (ext4, xfs, btrfs, vfat, ntfs, ...).
    pub fstype: String,
    /// The device's size.
    pub size: u64,
    /// Why it cannot be read (it did not mount).
    pub error: Option<String>,
}

/// What a path is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// A filesystem of the point (the top level).
    Filesystem,
    /// A directory.
    Dir,
    /// A regular file.
    File,
    /// A symbolic link.
    Symlink,
    /// A character device.
    Char,
    /// A block device.
    Block,
    /// A named pipe.
    Fifo,
    /// A socket.
    Socket,
}

impl Kind {
    fn of(mode: i64) -> Kind {
        match mode & 0o170_000 {
            0o040_000 => Kind::Dir,
            0o120_000 => Kind::Symlink,
            0o020_000 => Kind::Char,
            0o060_000 => Kind::Block,
            0o010_000 => Kind::Fifo,
            0o140_000 => Kind::Socket,
            _ => Kind::File,
        }
    }

    /// The name in listings.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Filesystem => "filesystem",
            Kind::Dir => "dir",
            Kind::File => "file",
            Kind::Symlink => "symlink",
            Kind::Char => "char",
            Kind::Block => "block",
            Kind::Fifo => "fifo",
            Kind::Socket => "socket",
        }
    }
}

/// One name in a listing (deserialized from a server's answer, it has no
/// bytes to extract).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Entry {
    /// Its name (not valid UTF-8: shown with U+FFFD; `get` keeps the bytes).
    pub name: String,
    /// Its path here (`/NAME/PATH`).
    pub path: String,
    /// What it is.
    pub kind: Kind,
    /// Bytes (files), device bytes (filesystems).
    pub size: u64,
    /// Permission bits (with set-uid, set-gid, sticky).
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modified (seconds since the epoch).
    pub mtime: i64,
    /// Nanoseconds of `mtime`.
    pub mtime_nsec: u32,
    /// A symlink's target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// A filesystem's type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fstype: Option<String>,
    /// A filesystem that cannot be read: why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    raw: Raw,
}

/// An entry's bytes and times as the guest has them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Raw {
    name: Vec<u8>,
    target: Vec<u8>,
    atime: (i64, i64),
}

/// What an extraction did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Extracted {
    /// Regular files written.
    pub files: u64,
    /// Directories made.
    pub dirs: u64,
    /// Symlinks made.
    pub symlinks: u64,
    /// Bytes of file content.
    pub bytes: u64,
    /// Paths left out: devices, pipes and sockets.
    pub skipped: Vec<String>,
    /// Extended attributes that could not be set (name: why).
    pub xattr_errors: Vec<String>,
    /// Bytes read from the repository so far (chunk loads).
    pub bytes_loaded: u64,
}

/// The deepest directory nesting followed.
const MAX_DEPTH: usize = 1024;

/// Refuse to follow `e` past [`MAX_DEPTH`] directories down.
fn too_deep(e: &Entry, depth: usize) -> Result<()> {
    if depth > MAX_DEPTH {
        return Err(Error::InvalidArgument(format!(
            "{}: nested deeper than {MAX_DEPTH} directories",
            e.path
        )));
    }
    Ok(())
}

/// Names asked about per libguestfs call.
const BATCH: usize = 512;

/// A point's filesystems, read through a libguestfs appliance.
pub struct Browser<'d> {
    g: Guestfs,
    fs: Vec<Filesystem>,
    disk: &'d PointDisk<'d>,
    work: &'d Path,
}

impl std::fmt::Debug for Browser<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Browser").field("fs", &self.fs).finish()
    }
}

/// Open `point`'s filesystems and run `f` on them; the appliance and the
/// export end with it.
pub fn browse<T>(
    repo: &dyn datamover::reader::PointSource,
    point: &PointRef,
    opts: &FilesOptions,
    f: impl FnOnce(&Browser<'_>) -> Result<T>,
) -> Result<T> {
    let cache = if opts.cache_bytes == 0 {
        datamover::reader::DEFAULT_CACHE
    } else {
        opts.cache_bytes
    };
    let disk = PointDisk::open(repo, point, None, cache)?;
    let work = tempfile::Builder::new()
        .prefix("dm-files-")
        .tempdir()
        .map_err(|e| Error::io("make a work directory in", std::env::temp_dir(), e))?;
    let sock = work.path().join("disk.sock");
    let listener = Listener::bind(&format!("unix:{}", sock.display()))?;
    let name = point.disk.to_string();
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        // The export ends with the scope's work, even when `f` panics.
        let _ends = StopOnDrop(&stop);
        s.spawn(|| disk.reader().prefetcher(&stop));
        s.spawn(|| {
            let opts = ExportOptions {
                name: name.clone(),
                tls: None,
            };
            if let Err(e) = server::serve(&listener, &disk, &opts, &stop) {
                tracing::error!("serving {name} to the appliance: {e}");
            }
        });
        (|| {
            let g = Guestfs::new()?;
            g.configure(!crate::qemu::kvm_usable(), opts.appliance_mib)?;
            g.add_nbd(&name, &sock.display().to_string())?;
            g.launch()?;
            let fs = mount_all(&g)?;
            let b = Browser {
                g,
                fs,
                disk: &disk,
                work: work.path(),
            };
            let out = f(&b);
            if let Err(e) = b.g.shutdown() {
                tracing::warn!("{e}");
            }
            out
        })()
    })
}

struct StopOnDrop<'a>(&'a AtomicBool);
impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Mount every filesystem read-only at `/NAME`; one that does not mount
/// keeps its error.
fn mount_all(g: &Guestfs) -> Result<Vec<Filesystem>> {
    let mut found: Vec<(Vec<u8>, Vec<u8>)> = g
        .filesystems()?
        .into_iter()
        .filter(|(dev, t)| {
            !dev.starts_with(b"btrfsvol:") && !matches!(t.as_slice(), b"swap" | b"unknown" | b"")
        })
        .collect();
    found.sort();
    let mut out: Vec<Filesystem> = found
        .iter()
        .map(|(dev, t)| {
            let d = String::from_utf8_lossy(dev).into_owned();
            Filesystem {
                name: d.trim_start_matches("/dev/").replace('/', "-"),
                device: d,
                fstype: String::from_utf8_lossy(t).into_owned(),
                size: g.device_size(dev).unwrap_or(0),
                error: None,
            }
        })
        .collect();
    for f in &out {
        g.mkmountpoint(format!("/{}", f.name).as_bytes())?;
    }
    for f in &mut out {
        if let Err(e) = g.mount_ro(f.device.as_bytes(), format!("/{}", f.name).as_bytes()) {
            f.error = Some(e.to_string());
        }
    }
    Ok(out)
}

fn lossy(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A path split into its filesystem and the path inside it.
enum Resolved<'a> {
    Top,
    In(&'a Filesystem, Vec<u8>),
}

fn entry(dir_path: &[u8], name: &[u8], st: &Stat, target: Vec<u8>) -> Entry {
    let kind = Kind::of(st.mode);
    let mut path = dir_path.to_vec();
    if !path.ends_with(b"/") {
        path.push(b'/');
    }
    path.extend_from_slice(name);
    Entry {
        name: lossy(name),
        path: lossy(&path),
        kind,
        size: u64::try_from(st.size).unwrap_or(0),
        mode: (st.mode & 0o7777) as u32,
        uid: u32::try_from(st.uid).unwrap_or(u32::MAX),
        gid: u32::try_from(st.gid).unwrap_or(u32::MAX),
        mtime: st.mtime_sec,
        mtime_nsec: u32::try_from(st.mtime_nsec).unwrap_or(0),
        target: (kind == Kind::Symlink).then(|| lossy(&target)),
        fstype: None,
        error: None,
        raw: Raw {
            name: name.to_vec(),
            target,
            atime: (st.atime_sec, st.atime_nsec),
        },
    }
}

impl Browser<'_> {
    /// The point's filesystems.
    pub fn filesystems(&self) -> &[Filesystem] {
        &self.fs
    }

    /// Bytes read from the repository so far.
    pub fn bytes_loaded(&self) -> u64 {
        self.disk.reader().stats().bytes_loaded
    }

    /// Resolve `path` (`/NAME/PATH`, or `/PATH` with one filesystem):
    /// `.` and `..` are taken lexically and never leave the filesystem.
    fn resolve(&self, path: &[u8]) -> Result<Resolved<'_>> {
        let comps: Vec<&[u8]> = path
            .split(|b| *b == b'/')
            .filter(|p| !matches!(*p, b"" | b"." | b".."))
            .collect();
        let Some(first) = comps.first() else {
            return Ok(Resolved::Top);
        };
        // The filesystem first; then `..` pops within it only.
        let (fs, skip) = match self.fs.iter().find(|f| f.name.as_bytes() == *first) {
            Some(f) => (f, 1),
            None if self.fs.len() == 1 => (&self.fs[0], 0),
            None => {
                return Err(Error::InvalidArgument(format!(
                    "{}: no filesystem {} in this point (its filesystems: {}); paths are /FILESYSTEM/PATH",
                    lossy(path),
                    lossy(first),
                    self.fs
                        .iter()
                        .map(|f| f.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
        };
        if let Some(e) = &fs.error {
            return Err(Error::InvalidArgument(format!(
                "filesystem {} ({}) cannot be read: {e}",
                fs.name, fs.fstype
            )));
        }
        let mut rest: Vec<&[u8]> = Vec::new();
        let mut seen_fs = skip == 0;
        for p in path.split(|b| *b == b'/') {
            match p {
                b"" | b"." => {}
                _ if !seen_fs && p != b".." => seen_fs = true,
                b".." => {
                    rest.pop();
                }
                p => rest.push(p),
            }
        }
        let mut inner = format!("/{}", fs.name).into_bytes();
        for p in rest {
            inner.push(b'/');
            inner.extend_from_slice(p);
        }
        Ok(Resolved::In(fs, inner))
    }

    fn top(&self) -> Vec<Entry> {
        self.fs
            .iter()
            .map(|f| Entry {
                name: f.name.clone(),
                path: format!("/{}", f.name),
                kind: Kind::Filesystem,
                size: f.size,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime: 0,
                mtime_nsec: 0,
                target: None,
                fstype: Some(f.fstype.clone()),
                error: f.error.clone(),
                raw: Raw {
                    name: f.name.clone().into_bytes(),
                    ..Raw::default()
                },
            })
            .collect()
    }

    /// The entries of directory `dir` (an appliance path), sorted by name.
    fn entries(&self, dir: &[u8]) -> Result<Vec<Entry>> {
        let mut names = self.g.ls(dir)?;
        names.sort();
        let mut out = Vec::with_capacity(names.len());
        for batch in names.chunks(BATCH) {
            let stats = self.g.lstats(dir, batch)?;
            let links: Vec<usize> = stats
                .iter()
                .enumerate()
                .filter(|(_, s)| Kind::of(s.mode) == Kind::Symlink)
                .map(|(i, _)| i)
                .collect();
            let targets = if links.is_empty() {
                Vec::new()
            } else {
                let ln: Vec<Vec<u8>> = links.iter().map(|i| batch[*i].clone()).collect();
                self.g.readlinks(dir, &ln)?
            };
            for (i, (n, st)) in batch.iter().zip(&stats).enumerate() {
                let target = links
                    .iter()
                    .position(|j| *j == i)
                    .and_then(|k| targets.get(k).cloned())
                    .unwrap_or_default();
                out.push(entry(dir, n, st, target));
            }
        }
        Ok(out)
    }

    /// The entries of directory `inner`, each with its appliance path.
    fn children(&self, inner: &[u8]) -> Result<Vec<(Entry, Vec<u8>)>> {
        Ok(self
            .entries(inner)?
            .into_iter()
            .map(|c| {
                let mut ci = inner.to_vec();
                ci.push(b'/');
                ci.extend_from_slice(&c.raw.name);
                (c, ci)
            })
            .collect())
    }

    /// The entry `path` names (a file, link or directory itself).
    fn stat(&self, path: &[u8]) -> Result<Entry> {
        match self.resolve(path)? {
            Resolved::Top => Err(Error::InvalidArgument(
                "name a filesystem or a path in one".into(),
            )),
            Resolved::In(fs, inner) => {
                let st = self.g.lstat(&inner).map_err(|e| {
                    if e.to_string().ends_with("No such file or directory") {
                        Error::InvalidArgument(format!(
                            "{}: no such file or directory in this point",
                            lossy(path)
                        ))
                    } else {
                        e
                    }
                })?;
                let (dir, name) = match inner.iter().rposition(|b| *b == b'/') {
                    Some(i) if i > 0 => (inner[..i].to_vec(), inner[i + 1..].to_vec()),
                    _ => (Vec::new(), fs.name.clone().into_bytes()),
                };
                let target = if Kind::of(st.mode) == Kind::Symlink {
                    self.g
                        .readlinks(&dir, std::slice::from_ref(&name))?
                        .pop()
                        .unwrap_or_default()
                } else {
                    Vec::new()
                };
                let mut e = entry(&dir, &name, &st, target);
                e.path = lossy(&inner);
                Ok(e)
            }
        }
    }

    /// List `path`: the filesystems at `/`, a directory's entries, or a
    /// file itself.
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        match self.resolve(path.as_bytes())? {
            Resolved::Top => Ok(self.top()),
            Resolved::In(_, inner) => {
                let e = self.stat(path.as_bytes())?;
                if e.kind == Kind::Dir {
                    self.entries(&inner)
                } else {
                    Ok(vec![e])
                }
            }
        }
    }

    /// Copy `paths` (files, links, whole directories) into directory `to`
    /// with their mode, owner, times and extended attributes; an existing
    /// name in `to` is never overwritten.
    pub fn get(&self, paths: &[String], to: &Path) -> Result<Extracted> {
        let meta = std::fs::symlink_metadata(to).map_err(|e| Error::io("open", to, e))?;
        if !meta.is_dir() {
            return Err(Error::InvalidArgument(format!(
                "{} is not a directory",
                to.display()
            )));
        }
        let mut x = Extracted::default();
        for p in paths {
            let (e, inner) = self.entry_of(p)?;
            self.extract(&e, &inner, to, &mut x, 0)?;
        }
        x.bytes_loaded = self.bytes_loaded();
        Ok(x)
    }

    /// The entry of a path given by the caller (a filesystem's top as a
    /// directory named after it).
    /// With its appliance path, resolved once.
    fn entry_of(&self, p: &str) -> Result<(Entry, Vec<u8>)> {
        let mut e = self.stat(p.as_bytes())?;
        let Resolved::In(fs, inner) = self.resolve(p.as_bytes())? else {
            return Err(Error::InvalidArgument(
                "name a filesystem or a path in one".into(),
            ));
        };
        if inner == format!("/{}", fs.name).into_bytes() {
            e.raw.name = fs.name.clone().into_bytes();
            e.name = fs.name.clone();
        }
        Ok((e, inner))
    }

    fn extract(
        &self,
        e: &Entry,
        inner: &[u8],
        to: &Path,
        x: &mut Extracted,
        depth: usize,
    ) -> Result<()> {
        too_deep(e, depth)?;
        let dest = to.join(OsStr::from_bytes(&e.raw.name));
        if std::fs::symlink_metadata(&dest).is_ok() {
            return Err(Error::InvalidArgument(format!(
                "{} exists: extract into an empty directory",
                dest.display()
            )));
        }
        match e.kind {
            Kind::Dir | Kind::Filesystem => {
                std::fs::create_dir(&dest).map_err(|err| Error::io("create", &dest, err))?;
                x.dirs += 1;
                for (c, ci) in self.children(inner)? {
                    self.extract(&c, &ci, &dest, x, depth + 1)?;
                }
            }
            Kind::File => {
                let part = self.partial(to)?;
                if let Err(err) = self.g.download(inner, &part) {
                    let _ = std::fs::remove_file(&part);
                    return Err(err);
                }
                std::fs::rename(&part, &dest).map_err(|err| Error::io("rename", &dest, err))?;
                x.files += 1;
                x.bytes += e.size;
            }
            Kind::Symlink => {
                std::os::unix::fs::symlink(OsStr::from_bytes(&e.raw.target), &dest)
                    .map_err(|err| Error::io("make symlink", &dest, err))?;
                x.symlinks += 1;
            }
            _ => {
                x.skipped.push(format!("{} ({})", e.path, e.kind.name()));
                return Ok(());
            }
        }
        self.set_meta(e, inner, &dest, x)
    }

    /// A new empty file in `dir` for a download to go to.
    fn partial(&self, dir: &Path) -> Result<PathBuf> {
        for i in 0..1000u32 {
            let p = dir.join(format!(".dm-partial-{}-{i}", std::process::id()));
            match std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&p)
            {
                Ok(_) => return Ok(p),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(Error::io("create", &p, e)),
            }
        }
        Err(Error::Internal(format!(
            "no free partial-file name in {}",
            dir.display()
        )))
    }

    /// Owner, mode, extended attributes and times of `dest` as `e` has
    /// them (the link itself for a symlink).
    fn set_meta(&self, e: &Entry, inner: &[u8], dest: &Path, x: &mut Extracted) -> Result<()> {
        let link = e.kind == Kind::Symlink;
        if let Err(err) = std::os::unix::fs::lchown(dest, Some(e.uid), Some(e.gid))
            && err.kind() != std::io::ErrorKind::PermissionDenied
        {
            return Err(Error::io("set the owner of", dest, err));
        }
        if !link {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(dest, std::fs::Permissions::from_mode(e.mode))
                .map_err(|err| Error::io("set the mode of", dest, err))?;
        }
        if e.kind != Kind::Filesystem {
            for (name, value) in self.g.xattrs(inner)? {
                if let Err(err) = datamover::sys::lsetxattr(dest, &name, &value) {
                    x.xattr_errors
                        .push(format!("{} {}: {err}", dest.display(), lossy(&name)));
                }
            }
        }
        datamover::sys::set_times_nofollow(dest, e.raw.atime, (e.mtime, i64::from(e.mtime_nsec)))
            .map_err(|err| Error::io("set the times of", dest, err))
    }

    /// Write `paths` as a tar archive to `w` (PAX headers for extended
    /// attributes and exact times, numeric owners).
    pub fn tar(&self, paths: &[String], w: impl std::io::Write) -> Result<Extracted> {
        let mut b = tar::Builder::new(w);
        let mut x = Extracted::default();
        for p in paths {
            let (e, inner) = self.entry_of(p)?;
            self.tar_one(
                &mut b,
                &e,
                &inner,
                Path::new(OsStr::from_bytes(&e.raw.name)),
                &mut x,
                0,
            )?;
        }
        b.finish()
            .map_err(|e| Error::io("write the archive", Path::new("-"), e))?;
        x.bytes_loaded = self.bytes_loaded();
        Ok(x)
    }

    fn tar_one<W: std::io::Write>(
        &self,
        b: &mut tar::Builder<W>,
        e: &Entry,
        inner: &[u8],
        name: &Path,
        x: &mut Extracted,
        depth: usize,
    ) -> Result<()> {
        too_deep(e, depth)?;
        let io = |err: std::io::Error| Error::io("write the archive", Path::new("-"), err);
        let mut pax: Vec<(String, Vec<u8>)> = vec![
            (
                "mtime".into(),
                format!("{}.{:09}", e.mtime, e.mtime_nsec).into_bytes(),
            ),
            (
                "atime".into(),
                format!(
                    "{}.{:09}",
                    e.raw.atime.0,
                    e.raw.atime.1.clamp(0, 999_999_999)
                )
                .into_bytes(),
            ),
        ];
        if e.kind != Kind::Filesystem {
            for (k, v) in self.g.xattrs(inner)? {
                pax.push((format!("SCHILY.xattr.{}", lossy(&k)), v));
            }
        }
        let mut h = tar::Header::new_gnu();
        h.set_mode(e.mode);
        h.set_uid(u64::from(e.uid));
        h.set_gid(u64::from(e.gid));
        h.set_mtime(u64::try_from(e.mtime).unwrap_or(0));
        let kind = match e.kind {
            Kind::Dir | Kind::Filesystem => tar::EntryType::Directory,
            Kind::File => tar::EntryType::Regular,
            Kind::Symlink => tar::EntryType::Symlink,
            _ => {
                x.skipped.push(format!("{} ({})", e.path, e.kind.name()));
                return Ok(());
            }
        };
        h.set_entry_type(kind);
        b.append_pax_extensions(pax.iter().map(|(k, v)| (k.as_str(), v.as_slice())))
            .map_err(io)?;
        match e.kind {
            Kind::Dir | Kind::Filesystem => {
                h.set_size(0);
                b.append_data(&mut h, name, std::io::empty()).map_err(io)?;
                x.dirs += 1;
                for (c, ci) in self.children(inner)? {
                    let cn = name.join(OsStr::from_bytes(&c.raw.name));
                    self.tar_one(b, &c, &ci, &cn, x, depth + 1)?;
                }
            }
            Kind::File => {
                let part = self.partial(self.work)?;
                let r = self.g.download(inner, &part).and_then(|()| {
                    let f =
                        std::fs::File::open(&part).map_err(|err| Error::io("open", &part, err))?;
                    let len = f
                        .metadata()
                        .map_err(|err| Error::io("stat", &part, err))?
                        .len();
                    h.set_size(len);
                    b.append_data(&mut h, name, f).map_err(io)?;
                    Ok(len)
                });
                let _ = std::fs::remove_file(&part);
                x.bytes += r?;
                x.files += 1;
            }
            _ => {
                h.set_size(0);
                b.append_link(&mut h, name, Path::new(OsStr::from_bytes(&e.raw.target)))
                    .map_err(io)?;
                x.symlinks += 1;
            }
        }
        Ok(())
    }
}

/// A request to a [`Session`]'s appliance thread.
enum Req {
    Filesystems(std::sync::mpsc::Sender<Vec<Filesystem>>),
    List(String, std::sync::mpsc::Sender<Result<Vec<Entry>>>),
    Get(
        Vec<String>,
        PathBuf,
        std::sync::mpsc::Sender<Result<Extracted>>,
    ),
    Tar(
        Vec<String>,
        PathBuf,
        std::sync::mpsc::Sender<Result<Extracted>>,
    ),
}

/// A [`Browser`] kept on a thread of its own, for callers that make many
/// calls over time (Python, the proxy): one appliance serves them all
/// until [`Session::close`] (or drop).
#[derive(Debug)]
pub struct Session {
    tx: Option<std::sync::mpsc::Sender<Req>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Session {
    /// Open `point` of the repository at `root`; returns once its
    /// filesystems are mounted (or with why not).
    pub fn open(root: PathBuf, point: PointRef, opts: FilesOptions) -> Result<Session> {
        let (tx, rx) = std::sync::mpsc::channel::<Req>();
        let (up_tx, up_rx) = std::sync::mpsc::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("dm-files".into())
            .spawn(move || {
                let repo = Repository::open(&root)?;
                browse(&repo, &point, &opts, |b| {
                    let _ = up_tx.send(());
                    for r in rx {
                        match r {
                            Req::Filesystems(reply) => {
                                let _ = reply.send(b.filesystems().to_vec());
                            }
                            Req::List(p, reply) => {
                                let _ = reply.send(b.list(&p));
                            }
                            Req::Get(paths, to, reply) => {
                                let _ = reply.send(b.get(&paths, &to));
                            }
                            Req::Tar(paths, file, reply) => {
                                let r = std::fs::OpenOptions::new()
                                    .write(true)
                                    .create_new(true)
                                    .open(&file)
                                    .map_err(|e| Error::io("create", &file, e))
                                    .and_then(|f| b.tar(&paths, std::io::BufWriter::new(f)));
                                let _ = reply.send(r);
                            }
                        }
                    }
                    Ok(())
                })
            })
            .map_err(|e| Error::Internal(format!("cannot start a thread: {e}")))?;
        let mut s = Session {
            tx: Some(tx),
            thread: Some(thread),
        };
        if up_rx.recv().is_err() {
            // The thread ended before the appliance was up: its error.
            return Err(s
                .end()
                .err()
                .unwrap_or_else(|| Error::Internal("the appliance thread ended early".into())));
        }
        Ok(s)
    }

    fn ask<T>(&self, make: impl FnOnce(std::sync::mpsc::Sender<T>) -> Req) -> Result<T> {
        let (tx, rx) = std::sync::mpsc::channel();
        let gone = || Error::Internal("the appliance session has ended".into());
        self.tx
            .as_ref()
            .ok_or_else(gone)?
            .send(make(tx))
            .map_err(|_| gone())?;
        rx.recv().map_err(|_| gone())
    }

    /// The point's filesystems.
    pub fn filesystems(&self) -> Result<Vec<Filesystem>> {
        self.ask(Req::Filesystems)
    }

    /// [`Browser::list`].
    pub fn list(&self, path: &str) -> Result<Vec<Entry>> {
        self.ask(|r| Req::List(path.to_string(), r))?
    }

    /// [`Browser::get`].
    pub fn get(&self, paths: &[String], to: &Path) -> Result<Extracted> {
        self.ask(|r| Req::Get(paths.to_vec(), to.to_path_buf(), r))?
    }

    /// [`Browser::tar`] into a new file `file`.
    pub fn tar_to(&self, paths: &[String], file: &Path) -> Result<Extracted> {
        self.ask(|r| Req::Tar(paths.to_vec(), file.to_path_buf(), r))?
    }

    fn end(&mut self) -> Result<()> {
        self.tx = None;
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| Error::Internal("the appliance thread panicked".into()))?,
            None => Ok(()),
        }
    }

    /// Stop the appliance and the export.
    pub fn close(mut self) -> Result<()> {
        self.end()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.end();
    }
}
