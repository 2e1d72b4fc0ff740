//! Merging a chain into a single generation, so restores never walk a long chain.
//!
//! A merge reads every non-zero page through the checksummed reader (so a corrupted generation
//! fails the merge instead of being copied) and writes a full generation; the new header
//! replaces the old one atomically, and only then are the superseded generation files of that
//! directory unlinked (other snapshots that hard-linked them keep their own links). A crash in
//! between leaves the old, still valid chain, or the new one plus stray files.

use std::path::Path;

use crate::chain::{Chain, ChainError};
use crate::format::PageSource;
use crate::writer::{ChainWriter, WriteSummary};

/// Chains longer than this are merged after a diff snapshot unless configured otherwise.
pub const DEFAULT_MAX_DEPTH: usize = 4;

/// Writes `chain`'s contents as a single full generation into `dir` (which may be the chain's
/// own directory) and unlinks the generation files there that the new header no longer names.
pub fn merge_into(chain: &Chain, dir: &Path) -> Result<WriteSummary, ChainError> {
    let page_size = chain.header().page_size;
    let mut writer = ChainWriter::full(dir, page_size, chain.pages())?;
    let mut page = vec![0u8; chain.page_size()];
    for index in 0..chain.pages() {
        if let PageSource::Generation(_) = chain.source(index)? {
            chain.read_page(index, &mut page)?;
            writer.put_page(index, &page)?;
        }
    }
    let summary = writer.finish()?;
    let kept = Chain::open(dir)?;
    let kept: Vec<&str> = kept
        .header()
        .generations
        .iter()
        .map(|g| g.name.as_str())
        .collect();
    for g in &chain.header().generations {
        if !kept.contains(&g.name.as_str()) {
            let path = dir.join(&g.name);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(ChainError::Io { path, source }),
            }
        }
    }
    Ok(summary)
}

/// Merges the chain in `dir` in place when it is deeper than `max_depth` generations.
/// Returns the merge's summary, or `None` when the chain was short enough.
pub fn merge_if_deeper(dir: &Path, max_depth: usize) -> Result<Option<WriteSummary>, ChainError> {
    let chain = Chain::open(dir)?;
    if chain.depth() <= max_depth.max(1) {
        return Ok(None);
    }
    let summary = merge_into(&chain, dir)?;
    tracing::debug!(
        dir = %dir.display(),
        from_depth = chain.depth(),
        pages = summary.pages_written,
        "memory chain merged"
    );
    Ok(Some(summary))
}
