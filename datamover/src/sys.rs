//! The few Linux calls std does not wrap: SEEK_DATA/SEEK_HOLE, block device
//! size and zero-out ioctls, flock, fadvise. Each wrapper is safe: it takes a
//! borrowed file and checks the return value.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

/// `lseek(SEEK_DATA)`: the first data offset at or after `off`, or `None`
/// past the last data.
pub fn seek_data(f: &File, off: u64) -> io::Result<Option<u64>> {
    seek(f, off, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`: the first hole at or after `off` (the end of file
/// counts as a hole), or `None` if `off` is past the end.
pub fn seek_hole(f: &File, off: u64) -> io::Result<Option<u64>> {
    seek(f, off, libc::SEEK_HOLE)
}

fn seek(f: &File, off: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let off =
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on a valid fd has no memory effects.
    let r = unsafe { libc::lseek(f.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(Some(r as u64))
}

// _IOR(0x12, 114, size_t) and _IO(0x12, 127) from <linux/fs.h>.
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKZEROOUT: libc::c_ulong = 0x127f;

/// Size in bytes of a block device.
pub fn block_device_size(f: &File) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 through the pointer, which is valid.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKGETSIZE64 as _, &mut size as *mut u64) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(size)
}

/// Zero a byte range of a block device (`BLKZEROOUT`); range must be
/// 512-byte aligned.
pub fn block_zero_out(f: &File, off: u64, len: u64) -> io::Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 through the pointer, which is valid.
    let r = unsafe { libc::ioctl(f.as_raw_fd(), BLKZEROOUT as _, range.as_ptr()) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Deallocate a byte range of a file, keeping its size: it reads as zeros.
pub fn punch_hole(f: &File, off: u64, len: u64) -> io::Result<()> {
    let (o, l) = (
        libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
        libc::off_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?,
    );
    // SAFETY: fallocate takes a file descriptor and integers only.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            o,
            l,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Read `a.len() + b.len()` bytes at `off` into `a` then `b`, in one
/// `preadv` when it reads them all (a short read is finished by plain
/// reads); end of file before that is `UnexpectedEof`.
pub fn read_exact_at2(f: &File, off: u64, a: &mut [u8], b: &mut [u8]) -> io::Result<()> {
    use std::os::unix::fs::FileExt;
    let o = libc::off_t::try_from(off).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let iov = [
        libc::iovec {
            iov_base: a.as_mut_ptr().cast(),
            iov_len: a.len(),
        },
        libc::iovec {
            iov_base: b.as_mut_ptr().cast(),
            iov_len: b.len(),
        },
    ];
    let n = loop {
        // SAFETY: both iovecs describe live, exclusively borrowed buffers
        // of their lengths, which outlive the call.
        let r = unsafe { libc::preadv(f.as_raw_fd(), iov.as_ptr(), 2, o) };
        if r >= 0 {
            break r as usize;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    };
    if n < a.len() {
        f.read_exact_at(&mut a[n..], off + n as u64)?;
        f.read_exact_at(b, off + a.len() as u64)
    } else {
        let m = n - a.len();
        f.read_exact_at(&mut b[m..], off + n as u64)
    }
}

/// Advise the kernel of sequential access (a hint; errors are ignored).
pub fn advise_sequential(f: &File) {
    // SAFETY: posix_fadvise has no memory effects.
    unsafe {
        libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_SEQUENTIAL);
    }
}

/// Lock modes for [`flock`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LockMode {
    /// Many holders.
    Shared,
    /// One holder.
    Exclusive,
}

/// `flock`; with `wait == false` returns `Ok(false)` when the lock is held
/// elsewhere. The lock is released when the file is closed, also on kill -9.
pub fn flock(f: &File, mode: LockMode, wait: bool) -> io::Result<bool> {
    let mut op = match mode {
        LockMode::Shared => libc::LOCK_SH,
        LockMode::Exclusive => libc::LOCK_EX,
    };
    if !wait {
        op |= libc::LOCK_NB;
    }
    loop {
        // SAFETY: flock on a valid fd has no memory effects.
        let r = unsafe { libc::flock(f.as_raw_fd(), op) };
        if r == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EWOULDBLOCK) if !wait => return Ok(false),
            _ => return Err(e),
        }
    }
}

fn c_path(p: &std::path::Path) -> io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Set extended attribute `name` of `path` (of a symlink itself, not its
/// target).
pub fn lsetxattr(path: &std::path::Path, name: &[u8], value: &[u8]) -> io::Result<()> {
    let p = c_path(path)?;
    let n =
        std::ffi::CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: valid C strings and a buffer of `value.len()` bytes.
    let r = unsafe {
        libc::lsetxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Set the access and modification times (seconds, nanoseconds) of
/// `path`, of a symlink itself.
pub fn set_times_nofollow(
    path: &std::path::Path,
    atime: (i64, i64),
    mtime: (i64, i64),
) -> io::Result<()> {
    let p = c_path(path)?;
    let ts = |(s, n): (i64, i64)| libc::timespec {
        tv_sec: s as libc::time_t,
        tv_nsec: n.clamp(0, 999_999_999) as libc::c_long,
    };
    let times = [ts(atime), ts(mtime)];
    // SAFETY: a valid C string and an array of two timespecs.
    let r = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            p.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
