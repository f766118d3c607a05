//! `dm files … --server-repo NAME`: a point's files through a server (the
//! proxy holding the repository reads them; an archive is downloaded from
//! the server).

use super::*;
use datamover_control::api::{FilesOp, FilesRequest};

/// List `path` of `point` in server repository `repo`: the entries (the
/// same JSON as `dm files ls --json`).
pub fn files_ls(
    s: &ServerArgs,
    repo: &str,
    point: &str,
    path: &str,
) -> Result<serde_json::Value, Failure> {
    let cl = s.client()?;
    let j = cl.files(
        &FilesRequest {
            repository: repo.into(),
            point: point.into(),
            op: FilesOp::Ls,
            paths: vec![path.into()],
        },
        || Ok::<(), Failure>(()),
    )?;
    Ok(j.entries.unwrap_or_default())
}

/// A tar archive of `paths` of `point` in server repository `repo`,
/// written to `out`: its size.
pub fn files_tar(
    s: &ServerArgs,
    repo: &str,
    point: &str,
    paths: &[String],
    out: &mut dyn std::io::Write,
) -> Result<u64, Failure> {
    let cl = s.client()?;
    let j = cl.files(
        &FilesRequest {
            repository: repo.into(),
            point: point.into(),
            op: FilesOp::Tar,
            paths: paths.to_vec(),
        },
        || Ok::<(), Failure>(()),
    )?;
    let (n, _) = cl.download(
        &datamover_control::api::paths::files_content(j.id),
        out,
        j.size.unwrap_or(0),
    )?;
    Ok(n)
}
