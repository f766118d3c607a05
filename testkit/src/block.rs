//! Loop devices and mounts, detached and unmounted on drop (also when the
//! test panics).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::sh;

/// A loop device, detached on drop (also when the test panics).
#[derive(Debug)]
pub struct LoopDev {
    pub dev: PathBuf,
}
impl LoopDev {
    pub fn attach(image: &Path, read_only: bool) -> LoopDev {
        let mut c = Command::new("losetup");
        c.arg("-f").arg("--show");
        if read_only {
            c.arg("-r");
        }
        c.arg(image);
        LoopDev {
            dev: PathBuf::from(sh(&mut c)),
        }
    }
}
impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

/// A mount, unmounted on drop.
#[derive(Debug)]
pub struct Mount {
    pub dir: PathBuf,
}
impl Mount {
    pub fn new(mut cmd: Command, dir: &Path) -> Mount {
        sh(&mut cmd);
        Mount {
            dir: dir.to_path_buf(),
        }
    }
}
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}
