//! The figures of one run (backup or restore), in one struct, and how the
//! bottleneck is named from per-stage busy time.

use serde::Serialize;

/// Busy seconds of each pipeline stage.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct StageBusy {
    /// Reading the source (and asking it for extents).
    pub read: f64,
    /// Cutting chunks (one thread).
    pub chunk: f64,
    /// Hashing, dedupe look-ups and compression, summed over workers.
    pub hash_compress: f64,
    /// Writing packs / the target.
    pub write: f64,
}

/// What limited a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Bottleneck {
    /// The source could not be read faster.
    #[serde(rename = "source read")]
    SourceRead,
    /// Chunking, hashing or compression saturated the CPUs.
    #[serde(rename = "CPU")]
    Cpu,
    /// The repository or target could not be written faster.
    #[serde(rename = "target write")]
    TargetWrite,
}

impl std::fmt::Display for Bottleneck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Bottleneck::SourceRead => "source read",
            Bottleneck::Cpu => "CPU",
            Bottleneck::TargetWrite => "target write",
        })
    }
}

/// Figures of one run.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct RunStats {
    /// Logical disk size.
    pub bytes_total: u64,
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Bytes recorded as zero runs (holes and zero blocks; never stored).
    pub bytes_zero: u64,
    /// Bytes of chunks not already in the repository.
    pub bytes_new: u64,
    /// Bytes written to the repository for them (frames, after compression).
    pub bytes_stored: u64,
    /// Chunks referenced.
    pub chunks: u64,
    /// Chunks newly stored.
    pub chunks_new: u64,
    /// Wall-clock seconds.
    pub seconds: f64,
    /// Worker threads used for CPU stages.
    pub threads: usize,
    /// Busy time per stage.
    pub busy: StageBusy,
}

impl RunStats {
    /// The figures a point keeps in its manifest: the one conversion from
    /// a run's stats to a point's.
    pub fn point_stats(&self) -> crate::format::manifest::PointStats {
        crate::format::manifest::PointStats {
            bytes_read: self.bytes_read,
            bytes_zero: self.bytes_zero,
            bytes_new: self.bytes_new,
            bytes_stored: self.bytes_stored,
            chunks: self.chunks,
            chunks_new: self.chunks_new,
            seconds: self.seconds,
            bottleneck: self.bottleneck().to_string(),
        }
    }

    /// Bytes held in chunks (disk size less zero runs).
    pub fn bytes_data(&self) -> u64 {
        self.bytes_total.saturating_sub(self.bytes_zero)
    }
    /// Chunk bytes referenced per byte newly stored (before compression).
    pub fn dedupe_ratio(&self) -> f64 {
        ratio(self.bytes_data(), self.bytes_new)
    }
    /// New bytes per byte stored.
    pub fn compression_ratio(&self) -> f64 {
        ratio(self.bytes_new, self.bytes_stored)
    }
    /// Logical throughput in MB/s (10^6 bytes).
    pub fn mb_per_s(&self) -> f64 {
        if self.seconds > 0.0 {
            self.bytes_total as f64 / self.seconds / 1e6
        } else {
            0.0
        }
    }
    /// The stage with the highest utilisation.
    pub fn bottleneck(&self) -> Bottleneck {
        let wall = self.seconds.max(1e-9);
        let read = self.busy.read / wall;
        let cpu = (self.busy.chunk / wall)
            .max(self.busy.hash_compress / (wall * self.threads.max(1) as f64));
        let write = self.busy.write / wall;
        if read >= cpu && read >= write {
            Bottleneck::SourceRead
        } else if cpu >= write {
            Bottleneck::Cpu
        } else {
            Bottleneck::TargetWrite
        }
    }
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 {
        if a == 0 { 1.0 } else { f64::INFINITY }
    } else {
        a as f64 / b as f64
    }
}
