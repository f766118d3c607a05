//! Repository config file (`REPO/config`), JSON:
//!
//! ```json
//! {"format":"datamover-repository","version":1,"id":"<32 hex>","created":"<RFC 3339>"}
//! ```
//!
//! `format` is the magic; `version` is the repository format version, which
//! names the versions of every file kind in [`super`]. Unknown fields are
//! ignored so that settings can be added without a version bump.

use serde::{Deserialize, Serialize};

/// The `format` value that marks a datamover repository.
pub const CONFIG_FORMAT: &str = "datamover-repository";
/// Repository format version written and read by this build.
pub const REPO_VERSION: u32 = 1;

/// Contents of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RepoConfig {
    /// Always [`CONFIG_FORMAT`].
    pub format: String,
    /// Repository format version.
    pub version: u32,
    /// Random repository id (32 hex digits).
    pub id: String,
    /// Creation time, RFC 3339.
    pub created: String,
}
