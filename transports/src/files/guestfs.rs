//! The few libguestfs calls file-level restore needs, declared from
//! `guestfs.h` (its C ABI is stable across releases). Names and link
//! targets are bytes (a guest's file names need not be UTF-8); every
//! error is libguestfs's message, and libguestfs prints nothing itself.

use std::ffi::{CStr, CString, c_char, c_int, c_void};

use datamover::{Error, Result, TransportKind};

#[repr(C)]
struct GuestfsH {
    _opaque: [u8; 0],
}

#[repr(C)]
struct AddDriveOpts {
    bitmask: u64,
    readonly: c_int,
    format: *const c_char,
    iface: *const c_char,
    name: *const c_char,
    label: *const c_char,
    protocol: *const c_char,
    server: *const *const c_char,
    username: *const c_char,
    secret: *const c_char,
    cachemode: *const c_char,
    discard: *const c_char,
    copyonread: c_int,
    blocksize: c_int,
}

const READONLY: u64 = 1 << 0;
const FORMAT: u64 = 1 << 1;
const PROTOCOL: u64 = 1 << 5;
const SERVER: u64 = 1 << 6;
const CACHEMODE: u64 = 1 << 9;

/// `struct guestfs_statns`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Stat {
    pub dev: i64,
    pub ino: i64,
    pub mode: i64,
    pub nlink: i64,
    pub uid: i64,
    pub gid: i64,
    pub rdev: i64,
    pub size: i64,
    pub blksize: i64,
    pub blocks: i64,
    pub atime_sec: i64,
    pub atime_nsec: i64,
    pub mtime_sec: i64,
    pub mtime_nsec: i64,
    pub ctime_sec: i64,
    pub ctime_nsec: i64,
    spare: [i64; 6],
}

#[repr(C)]
struct StatList {
    len: u32,
    val: *mut Stat,
}

#[repr(C)]
struct XattrC {
    attrname: *mut c_char,
    attrval_len: u32,
    attrval: *mut c_char,
}

#[repr(C)]
struct XattrList {
    len: u32,
    val: *mut XattrC,
}

type ErrorCb = Option<unsafe extern "C" fn(*mut GuestfsH, *mut c_void, *const c_char)>;

#[link(name = "guestfs")]
unsafe extern "C" {
    fn guestfs_create() -> *mut GuestfsH;
    fn guestfs_close(g: *mut GuestfsH);
    fn guestfs_set_error_handler(g: *mut GuestfsH, cb: ErrorCb, opaque: *mut c_void);
    fn guestfs_last_error(g: *mut GuestfsH) -> *const c_char;
    fn guestfs_set_backend(g: *mut GuestfsH, backend: *const c_char) -> c_int;
    fn guestfs_set_backend_settings(g: *mut GuestfsH, settings: *const *const c_char) -> c_int;
    fn guestfs_set_memsize(g: *mut GuestfsH, mb: c_int) -> c_int;
    fn guestfs_add_drive_opts_argv(
        g: *mut GuestfsH,
        filename: *const c_char,
        opts: *const AddDriveOpts,
    ) -> c_int;
    fn guestfs_launch(g: *mut GuestfsH) -> c_int;
    fn guestfs_shutdown(g: *mut GuestfsH) -> c_int;
    fn guestfs_list_filesystems(g: *mut GuestfsH) -> *mut *mut c_char;
    fn guestfs_mkmountpoint(g: *mut GuestfsH, path: *const c_char) -> c_int;
    fn guestfs_mount_ro(g: *mut GuestfsH, dev: *const c_char, at: *const c_char) -> c_int;
    fn guestfs_blockdev_getsize64(g: *mut GuestfsH, dev: *const c_char) -> i64;
    fn guestfs_ls(g: *mut GuestfsH, dir: *const c_char) -> *mut *mut c_char;
    fn guestfs_lstatns(g: *mut GuestfsH, path: *const c_char) -> *mut Stat;
    fn guestfs_free_statns(s: *mut Stat);
    fn guestfs_lstatnslist(
        g: *mut GuestfsH,
        dir: *const c_char,
        names: *const *const c_char,
    ) -> *mut StatList;
    fn guestfs_free_statns_list(l: *mut StatList);
    fn guestfs_readlinklist(
        g: *mut GuestfsH,
        dir: *const c_char,
        names: *const *const c_char,
    ) -> *mut *mut c_char;
    fn guestfs_lgetxattrs(g: *mut GuestfsH, path: *const c_char) -> *mut XattrList;
    fn guestfs_free_xattr_list(l: *mut XattrList);
    fn guestfs_download(g: *mut GuestfsH, remote: *const c_char, local: *const c_char) -> c_int;
}

/// A libguestfs handle: one appliance.
pub struct Guestfs {
    g: *mut GuestfsH,
}

impl std::fmt::Debug for Guestfs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Guestfs")
    }
}

fn c(s: &[u8]) -> Result<CString> {
    CString::new(s).map_err(|_| {
        Error::InvalidArgument(format!("{:?} holds a NUL byte", String::from_utf8_lossy(s)))
    })
}

/// Take a NULL-terminated array of strings libguestfs allocated.
///
/// # Safety
/// `p` is null or such an array, owned by the caller from now on.
unsafe fn strings(p: *mut *mut c_char) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    if p.is_null() {
        return out;
    }
    let mut i = 0;
    loop {
        // SAFETY: within the array, up to and including its NULL end.
        let s = unsafe { *p.add(i) };
        if s.is_null() {
            break;
        }
        // SAFETY: a NUL-terminated string libguestfs made; freed once.
        unsafe {
            out.push(CStr::from_ptr(s).to_bytes().to_vec());
            libc::free(s.cast());
        }
        i += 1;
    }
    // SAFETY: the array itself, malloc'd by libguestfs.
    unsafe { libc::free(p.cast()) };
    out
}

/// A NULL-terminated array of pointers into `v` (which must outlive it).
fn ptrs(v: &[CString]) -> Vec<*const c_char> {
    v.iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

impl Guestfs {
    /// A new handle that prints nothing (errors come back as values).
    pub fn new() -> Result<Guestfs> {
        // SAFETY: no arguments; null on failure.
        let g = unsafe { guestfs_create() };
        if g.is_null() {
            return Err(Error::transport(
                "libguestfs",
                TransportKind::Tool,
                "cannot create a libguestfs handle",
            ));
        }
        // SAFETY: a valid handle; a null callback silences the default.
        unsafe { guestfs_set_error_handler(g, None, std::ptr::null_mut()) };
        Ok(Guestfs { g })
    }

    fn err(&self, what: &str) -> Error {
        // SAFETY: a valid handle; the message belongs to it (copied here).
        let m = unsafe { guestfs_last_error(self.g) };
        let msg = if m.is_null() {
            "failed".to_string()
        } else {
            // SAFETY: a NUL-terminated string owned by the handle.
            unsafe { CStr::from_ptr(m) }.to_string_lossy().into_owned()
        };
        Error::transport("libguestfs", TransportKind::Tool, format!("{what}: {msg}"))
    }

    fn check(&self, r: c_int, what: &str) -> Result<()> {
        if r == -1 { Err(self.err(what)) } else { Ok(()) }
    }

    /// The `direct` backend (QEMU run by libguestfs itself), with TCG
    /// when KVM cannot run a guest here; `mb` of appliance memory.
    pub fn configure(&self, tcg: bool, mb: i32) -> Result<()> {
        let direct = c(b"direct")?;
        // SAFETY: valid handle and C string.
        self.check(
            unsafe { guestfs_set_backend(self.g, direct.as_ptr()) },
            "choosing the backend",
        )?;
        if tcg {
            let s = [c(b"force_tcg")?];
            let p = ptrs(&s);
            // SAFETY: a NULL-terminated array of valid C strings.
            self.check(
                unsafe { guestfs_set_backend_settings(self.g, p.as_ptr()) },
                "backend settings",
            )?;
        }
        // SAFETY: valid handle.
        self.check(
            unsafe { guestfs_set_memsize(self.g, mb) },
            "appliance memory",
        )
    }

    /// Add the raw NBD export `export` on unix socket `socket`, read-only.
    pub fn add_nbd(&self, export: &str, socket: &str) -> Result<()> {
        let (name, fmt, proto) = (c(export.as_bytes())?, c(b"raw")?, c(b"nbd")?);
        let cache = c(b"unsafe")?;
        let server = [c(format!("unix:{socket}").as_bytes())?];
        let sp = ptrs(&server);
        let o = AddDriveOpts {
            bitmask: READONLY | FORMAT | PROTOCOL | SERVER | CACHEMODE,
            readonly: 1,
            format: fmt.as_ptr(),
            iface: std::ptr::null(),
            name: std::ptr::null(),
            label: std::ptr::null(),
            protocol: proto.as_ptr(),
            server: sp.as_ptr(),
            username: std::ptr::null(),
            secret: std::ptr::null(),
            cachemode: cache.as_ptr(),
            discard: std::ptr::null(),
            copyonread: 0,
            blocksize: 0,
        };
        // SAFETY: valid handle; every pointer lives until the call returns.
        self.check(
            unsafe { guestfs_add_drive_opts_argv(self.g, name.as_ptr(), &o) },
            "adding the disk",
        )
    }

    /// Start the appliance.
    pub fn launch(&self) -> Result<()> {
        // SAFETY: valid handle.
        self.check(unsafe { guestfs_launch(self.g) }, "starting the appliance")
    }

    /// Stop the appliance (errors are the appliance's last words).
    pub fn shutdown(&self) -> Result<()> {
        // SAFETY: valid handle.
        self.check(
            unsafe { guestfs_shutdown(self.g) },
            "stopping the appliance",
        )
    }

    /// (device, type) of every filesystem found (partitions, LVs, ...).
    pub fn filesystems(&self) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        // SAFETY: valid handle; the array is ours.
        let p = unsafe { guestfs_list_filesystems(self.g) };
        if p.is_null() {
            return Err(self.err("listing filesystems"));
        }
        // SAFETY: as above.
        let flat = unsafe { strings(p) };
        Ok(flat
            .chunks(2)
            .filter_map(|kv| match kv {
                [k, v] => Some((k.clone(), v.clone())),
                _ => None,
            })
            .collect())
    }

    /// Make a mount point (before anything is mounted).
    pub fn mkmountpoint(&self, path: &[u8]) -> Result<()> {
        let p = c(path)?;
        // SAFETY: valid handle and C string.
        self.check(
            unsafe { guestfs_mkmountpoint(self.g, p.as_ptr()) },
            "making a mount point",
        )
    }

    /// Mount `dev` read-only at `at`.
    pub fn mount_ro(&self, dev: &[u8], at: &[u8]) -> Result<()> {
        let (d, a) = (c(dev)?, c(at)?);
        // SAFETY: valid handle and C strings.
        self.check(
            unsafe { guestfs_mount_ro(self.g, d.as_ptr(), a.as_ptr()) },
            &format!("mounting {}", String::from_utf8_lossy(dev)),
        )
    }

    /// A block device's size.
    pub fn device_size(&self, dev: &[u8]) -> Result<u64> {
        let d = c(dev)?;
        // SAFETY: valid handle and C string.
        let n = unsafe { guestfs_blockdev_getsize64(self.g, d.as_ptr()) };
        u64::try_from(n).map_err(|_| self.err("device size"))
    }

    /// The names in directory `dir`.
    pub fn ls(&self, dir: &[u8]) -> Result<Vec<Vec<u8>>> {
        let d = c(dir)?;
        // SAFETY: valid handle and C string; the array is ours.
        let p = unsafe { guestfs_ls(self.g, d.as_ptr()) };
        if p.is_null() {
            return Err(self.err(&format!("listing {}", String::from_utf8_lossy(dir))));
        }
        // SAFETY: as above.
        Ok(unsafe { strings(p) })
    }

    /// `lstat` of `path`.
    pub fn lstat(&self, path: &[u8]) -> Result<Stat> {
        let p = c(path)?;
        // SAFETY: valid handle and C string; the struct is ours.
        let s = unsafe { guestfs_lstatns(self.g, p.as_ptr()) };
        if s.is_null() {
            return Err(self.err(&format!("{}", String::from_utf8_lossy(path))));
        }
        // SAFETY: a valid struct, copied, then freed once.
        let out = unsafe { *s };
        unsafe { guestfs_free_statns(s) };
        Ok(out)
    }

    /// `lstat` of each of `names` in `dir`.
    pub fn lstats(&self, dir: &[u8], names: &[Vec<u8>]) -> Result<Vec<Stat>> {
        let d = c(dir)?;
        let cs = names.iter().map(|n| c(n)).collect::<Result<Vec<_>>>()?;
        let p = ptrs(&cs);
        // SAFETY: valid handle, C string and NULL-terminated array.
        let l = unsafe { guestfs_lstatnslist(self.g, d.as_ptr(), p.as_ptr()) };
        if l.is_null() {
            return Err(self.err(&format!("stat in {}", String::from_utf8_lossy(dir))));
        }
        // SAFETY: a list of `len` structs, copied, then freed once.
        let out = unsafe {
            let len = (*l).len as usize;
            let v = if len == 0 || (*l).val.is_null() {
                Vec::new()
            } else {
                std::slice::from_raw_parts((*l).val, len).to_vec()
            };
            guestfs_free_statns_list(l);
            v
        };
        if out.len() != names.len() {
            return Err(Error::Internal(format!(
                "libguestfs gave {} stats for {} names",
                out.len(),
                names.len()
            )));
        }
        Ok(out)
    }

    /// The targets of the symlinks `names` in `dir` (empty for others).
    pub fn readlinks(&self, dir: &[u8], names: &[Vec<u8>]) -> Result<Vec<Vec<u8>>> {
        let d = c(dir)?;
        let cs = names.iter().map(|n| c(n)).collect::<Result<Vec<_>>>()?;
        let p = ptrs(&cs);
        // SAFETY: valid handle, C string and NULL-terminated array.
        let l = unsafe { guestfs_readlinklist(self.g, d.as_ptr(), p.as_ptr()) };
        if l.is_null() {
            return Err(self.err("reading links"));
        }
        // SAFETY: the array is ours.
        let out = unsafe { strings(l) };
        if out.len() != names.len() {
            return Err(Error::Internal("libguestfs gave a short link list".into()));
        }
        Ok(out)
    }

    /// The extended attributes of `path` (not following a symlink).
    pub fn xattrs(&self, path: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let p = c(path)?;
        // SAFETY: valid handle and C string; the list is ours.
        let l = unsafe { guestfs_lgetxattrs(self.g, p.as_ptr()) };
        if l.is_null() {
            return Err(self.err(&format!(
                "extended attributes of {}",
                String::from_utf8_lossy(path)
            )));
        }
        // SAFETY: `len` entries, each a C string name and `attrval_len`
        // bytes; copied, then the list freed once.
        let out = unsafe {
            let len = (*l).len as usize;
            let mut v = Vec::with_capacity(len);
            if len > 0 && !(*l).val.is_null() {
                for x in std::slice::from_raw_parts((*l).val, len) {
                    let name = CStr::from_ptr(x.attrname).to_bytes().to_vec();
                    let val = if x.attrval.is_null() {
                        Vec::new()
                    } else {
                        std::slice::from_raw_parts(x.attrval.cast::<u8>(), x.attrval_len as usize)
                            .to_vec()
                    };
                    v.push((name, val));
                }
            }
            guestfs_free_xattr_list(l);
            v
        };
        Ok(out)
    }

    /// Copy file `remote` out of the appliance to local file `local`.
    pub fn download(&self, remote: &[u8], local: &std::path::Path) -> Result<()> {
        use std::os::unix::ffi::OsStrExt;
        let (r, l) = (c(remote)?, c(local.as_os_str().as_bytes())?);
        // SAFETY: valid handle and C strings.
        self.check(
            unsafe { guestfs_download(self.g, r.as_ptr(), l.as_ptr()) },
            &format!("reading {}", String::from_utf8_lossy(remote)),
        )
    }
}

impl Drop for Guestfs {
    fn drop(&mut self) {
        // SAFETY: the handle is ours and closed once.
        unsafe { guestfs_close(self.g) };
    }
}
