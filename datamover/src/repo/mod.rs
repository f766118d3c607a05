//! A local repository: a directory of packs, index files and point
//! manifests (layout and formats in [`crate::format`]).
//!
//! Concurrency: any number of backups, restores and verifies run at once,
//! each holding a shared `flock` on `REPO/lock`; garbage collection (prune)
//! takes it exclusively, so it never deletes a chunk a running backup has
//! decided to reuse. Locks die with their process, so kill -9 leaves none.
//!
//! Crash safety: every file is written under `tmp/`, fsynced, renamed into
//! place, and its directory fsynced. A backup publishes its packs and their
//! index files first and its manifest last, so a killed backup leaves no
//! visible point, and the chunks it had sealed are reused by the next one.

mod index;
mod packer;
pub(crate) mod points;
mod reader;

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use index::{BadIndexFile, Index, Location};
pub use packer::PackWriter;
pub use points::{PointExtents, PointFile, PointSummary};
pub use reader::PackReader;

use crate::error::{Error, IoContext, Result};
use crate::format::config::{CONFIG_FORMAT, REPO_VERSION, RepoConfig};
use crate::ids::{PackId, hex, random_bytes};
use crate::sys::{self, LockMode};

/// An open repository.
#[derive(Debug, Clone)]
pub struct Repository {
    root: PathBuf,
    config: RepoConfig,
}

/// A held repository lock; released on drop.
#[derive(Debug)]
pub struct RepoLock {
    _file: File,
}

impl Repository {
    /// Create a new repository at `path` (a new or empty directory).
    pub fn init(path: &Path) -> Result<Repository> {
        match fs::read_dir(path) {
            Ok(mut d) => {
                if d.next().is_some() {
                    return Err(Error::AlreadyExists {
                        path: path.to_path_buf(),
                    });
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                fs::create_dir_all(path).ctx("create repository directory", path)?;
            }
            Err(e) => return Err(Error::io("open", path, e)),
        }
        for d in ["packs", "index", "points", "tmp"] {
            fs::create_dir(path.join(d)).ctx("create", &path.join(d))?;
        }
        let config = RepoConfig {
            format: CONFIG_FORMAT.into(),
            version: REPO_VERSION,
            id: hex(&random_bytes::<16>()?),
            created: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        };
        let repo = Repository {
            root: path.to_path_buf(),
            config,
        };
        let mut json =
            serde_json::to_vec_pretty(&repo.config).map_err(|e| Error::Internal(e.to_string()))?;
        json.push(b'\n');
        File::create(repo.root.join("lock")).ctx("create", &repo.root.join("lock"))?;
        // The config goes last: a directory without it is not a repository.
        repo.write_atomic(&repo.root, "config", &json)?;
        Ok(repo)
    }

    /// Open the repository at `path`, checking its config and version.
    pub fn open(path: &Path) -> Result<Repository> {
        let cfg_path = path.join("config");
        let bytes = match fs::read(&cfg_path) {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
                ) =>
            {
                return Err(Error::NotARepository {
                    path: path.to_path_buf(),
                });
            }
            Err(e) => return Err(Error::io("read", &cfg_path, e)),
        };
        let v: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::corrupt("config", &cfg_path, format!("not valid JSON: {e}")))?;
        if v.get("format").and_then(|f| f.as_str()) != Some(CONFIG_FORMAT) {
            return Err(Error::NotARepository {
                path: path.to_path_buf(),
            });
        }
        match v.get("version").and_then(|x| x.as_u64()) {
            Some(x) if x == u64::from(REPO_VERSION) => {}
            Some(x) => {
                return Err(Error::UnsupportedVersion {
                    path: cfg_path,
                    found: u32::try_from(x).unwrap_or(u32::MAX),
                    supported: REPO_VERSION,
                });
            }
            None => return Err(Error::corrupt("config", &cfg_path, "no version")),
        }
        let config: RepoConfig = serde_json::from_value(v)
            .map_err(|e| Error::corrupt("config", &cfg_path, e.to_string()))?;
        for d in ["packs", "index", "points", "tmp"] {
            if !path.join(d).is_dir() {
                return Err(Error::corrupt(
                    "repository",
                    path,
                    format!("directory {d}/ is missing"),
                ));
            }
        }
        Ok(Repository {
            root: path.to_path_buf(),
            config,
        })
    }

    /// The repository's directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Its config.
    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    /// Take the repository lock; `wait == false` returns `None` when it is
    /// held in a conflicting mode.
    pub fn lock(&self, mode: LockMode, wait: bool) -> Result<Option<RepoLock>> {
        let p = self.root.join("lock");
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .ctx("open", &p)?;
        Ok(sys::flock(&f, mode, wait)
            .ctx("lock", &p)?
            .then_some(RepoLock { _file: f }))
    }

    pub(crate) fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Path of a pack file.
    pub fn pack_path(&self, id: &PackId) -> PathBuf {
        let h = id.to_hex();
        self.root
            .join("packs")
            .join(&h[..2])
            .join(format!("{h}.pack"))
    }

    /// A new temp file under `tmp/`.
    pub(crate) fn temp_file(&self, what: &str) -> Result<(File, PathBuf)> {
        let p = self
            .root
            .join("tmp")
            .join(format!("{what}-{}", hex(&random_bytes::<12>()?)));
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&p)
            .ctx("create", &p)?;
        Ok((f, p))
    }

    /// Move a finished, fsynced temp file to `dir/name` and fsync `dir`.
    pub(crate) fn publish(&self, tmp: &Path, dir: &Path, name: &str) -> Result<PathBuf> {
        fs::create_dir_all(dir).ctx("create", dir)?;
        let dst = dir.join(name);
        fs::rename(tmp, &dst).ctx("rename into place", &dst)?;
        sync_dir(dir)?;
        Ok(dst)
    }

    /// Write `bytes` to `dir/name` atomically (temp, fsync, rename, fsync dir).
    pub(crate) fn write_atomic(&self, dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf> {
        let (mut f, tmp) = self.temp_file(name)?;
        let r = f.write_all(bytes).and_then(|_| f.sync_all());
        if let Err(e) = r {
            let _ = fs::remove_file(&tmp);
            return Err(Error::io("write", &tmp, e));
        }
        self.publish(&tmp, dir, name).inspect_err(|_| {
            let _ = fs::remove_file(&tmp);
        })
    }

    /// Load the chunk index; any damaged index file is an error here.
    pub fn load_index(&self) -> Result<Index> {
        let (idx, mut bad) = Index::load(&self.path("index"))?;
        match bad.pop() {
            Some(b) => Err(b.error),
            None => Ok(idx),
        }
    }
}

/// fsync a directory so that renames in it are durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx("sync directory", dir)
}
