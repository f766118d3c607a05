//! Compression levels offered to users, mapped to zstd levels.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;

/// How hard to compress chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Store chunks as they are.
    None,
    /// zstd level 1.
    Fast,
    /// zstd level 3: the default, the best ratio per CPU second.
    #[default]
    Optimal,
    /// zstd level 9.
    High,
    /// zstd level 19: slow; for archives.
    Extreme,
}

impl Compression {
    /// The zstd level, or `None` for no compression.
    pub fn zstd_level(self) -> Option<i32> {
        match self {
            Compression::None => None,
            Compression::Fast => Some(1),
            Compression::Optimal => Some(3),
            Compression::High => Some(9),
            Compression::Extreme => Some(19),
        }
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Fast => "fast",
            Compression::Optimal => "optimal",
            Compression::High => "high",
            Compression::Extreme => "extreme",
        })
    }
}

impl FromStr for Compression {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Ok(match s {
            "none" => Compression::None,
            "fast" => Compression::Fast,
            "optimal" => Compression::Optimal,
            "high" => Compression::High,
            "extreme" => Compression::Extreme,
            _ => {
                return Err(Error::InvalidArgument(format!(
                    "unknown compression {s:?}: use none, fast, optimal, high or extreme"
                )));
            }
        })
    }
}
