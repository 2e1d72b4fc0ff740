//! Chain tests: full and diff writes, zeroed pages, merges, and refusal of damaged files.
#![allow(clippy::cast_possible_truncation)]

use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::{Chain, ChainError, ChainWriter, FormatError, PageSource, merge_if_deeper};

const PS: usize = 4096;
const PAGES: u64 = 64;

fn page(fill: u8) -> Vec<u8> {
    let mut p = vec![fill; PS];
    p[0] = fill.wrapping_add(1);
    p
}

fn read(chain: &Chain, index: u64) -> Vec<u8> {
    let mut buf = vec![0u8; PS];
    chain.read_page(index, &mut buf).unwrap();
    buf
}

fn full(dir: &Path, pages: &[(u64, u8)]) {
    let mut w = ChainWriter::full(dir, PS as u32, PAGES).unwrap();
    for &(i, fill) in pages {
        w.put_page(i, &page(fill)).unwrap();
    }
    w.finish().unwrap();
}

fn diff(dir: &Path, parent: &Path, pages: &[(u64, Option<u8>)]) -> usize {
    let parent = Chain::open(parent).unwrap();
    let mut w = ChainWriter::diff(dir, &parent).unwrap();
    for &(i, fill) in pages {
        match fill {
            Some(fill) => w.put_page(i, &page(fill)).unwrap(),
            None => w.put_page(i, &[0u8; PS]).unwrap(),
        }
    }
    w.finish().unwrap().depth
}

#[test]
fn full_snapshot_reads_back_and_skips_zero_pages() {
    let dir = tempfile::tempdir().unwrap();
    let mut w = ChainWriter::full(dir.path(), PS as u32, PAGES).unwrap();
    w.put_page(1, &page(7)).unwrap();
    w.put_page(2, &[0u8; PS]).unwrap();
    w.put_pages(10, &[page(8), page(9)].concat()).unwrap();
    let s = w.finish().unwrap();
    assert_eq!((s.pages_written, s.zero_pages, s.depth), (3, 1, 1));
    let chain = Chain::open(dir.path()).unwrap();
    assert_eq!(read(&chain, 1), page(7));
    assert_eq!(read(&chain, 10), page(8));
    assert_eq!(read(&chain, 11), page(9));
    assert_eq!(chain.source(2).unwrap(), PageSource::Zero);
    assert_eq!(read(&chain, 3), vec![0u8; PS]);
    assert!(chain.header().base_holds(1));
    assert!(!chain.header().base_holds(2));
}

#[test]
fn diff_holds_only_changed_pages_and_zeroed_pages_come_back_zero() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    full(&a, &[(1, 1), (2, 2), (3, 3)]);
    let depth = diff(&b, &a, &[(2, Some(20)), (3, None), (5, Some(50))]);
    assert_eq!(depth, 2);
    let chain = Chain::open(&b).unwrap();
    assert_eq!(read(&chain, 1), page(1));
    assert_eq!(read(&chain, 2), page(20));
    assert_eq!(
        read(&chain, 3),
        vec![0u8; PS],
        "zeroed page must come back zero"
    );
    assert!(
        chain.header().base_holds(3),
        "base still holds the old page"
    );
    assert_eq!(read(&chain, 5), page(50));
    assert_eq!(chain.source(1).unwrap(), PageSource::Generation(0));
    assert_eq!(chain.source(5).unwrap(), PageSource::Generation(1));
    // The parent is unchanged, and the child survives the parent's deletion.
    assert_eq!(read(&Chain::open(&a).unwrap(), 2), page(2));
    std::fs::remove_dir_all(&a).unwrap();
    assert_eq!(read(&Chain::open(&b).unwrap(), 1), page(1));
}

#[test]
fn a_deep_chain_merges_without_losing_a_page() {
    let root = tempfile::tempdir().unwrap();
    let dirs: Vec<_> = (0..7).map(|i| root.path().join(format!("s{i}"))).collect();
    for d in &dirs {
        std::fs::create_dir_all(d).unwrap();
    }
    full(&dirs[0], &[(0, 100), (1, 101), (63, 163)]);
    // Each generation rewrites page 1, adds page 10+g and zeroes page 0 in generation 3.
    let mut expected: Vec<Option<u8>> = vec![None; PAGES as usize];
    expected[0] = Some(100);
    expected[1] = Some(101);
    expected[63] = Some(163);
    for g in 1..dirs.len() {
        let g8 = u8::try_from(g).unwrap();
        let mut pages = vec![(1, Some(g8)), (10 + g as u64, Some(g8 * 3))];
        expected[1] = Some(g8);
        expected[10 + g] = Some(g8 * 3);
        if g == 3 {
            pages.push((0, None));
            expected[0] = None;
        }
        let depth = diff(&dirs[g], &dirs[g - 1], &pages);
        let merged = merge_if_deeper(&dirs[g], 4).unwrap();
        assert_eq!(merged.is_some(), depth > 4, "generation {g}, depth {depth}");
        let chain = Chain::open(&dirs[g]).unwrap();
        assert!(chain.depth() <= 4);
        for (i, want) in expected.iter().enumerate() {
            let want = want.map(page).unwrap_or_else(|| vec![0u8; PS]);
            assert_eq!(read(&chain, i as u64), want, "generation {g} page {i}");
        }
    }
    // The merged directory holds only the files its header names (plus the header).
    let chain = Chain::open(dirs.last().unwrap()).unwrap();
    let files = std::fs::read_dir(dirs.last().unwrap()).unwrap().count();
    assert_eq!(files, chain.depth() + 1);
}

#[test]
fn a_truncated_data_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    full(dir.path(), &[(1, 1)]);
    let name = Chain::open(dir.path()).unwrap().header().generations[0]
        .name
        .clone();
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join(&name))
        .unwrap();
    f.set_len(PS as u64 * 3).unwrap();
    assert!(matches!(
        Chain::open(dir.path()),
        Err(ChainError::FileSize { .. })
    ));
}

#[test]
fn a_corrupted_page_is_refused_on_read() {
    let dir = tempfile::tempdir().unwrap();
    full(dir.path(), &[(1, 1)]);
    let chain = Chain::open(dir.path()).unwrap();
    let path = chain.generation_path(0).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0xff], PS as u64 + 100).unwrap();
    let mut buf = vec![0u8; PS];
    assert!(matches!(
        chain.read_page(1, &mut buf),
        Err(ChainError::PageChecksum { index: 1, .. })
    ));
}

#[test]
fn truncated_or_corrupted_headers_are_refused_with_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    full(dir.path(), &[(1, 1)]);
    let hdr = dir.path().join(crate::HEADER_FILE);
    let bytes = std::fs::read(&hdr).unwrap();
    std::fs::write(&hdr, &bytes[..bytes.len() - 7]).unwrap();
    let err = Chain::open(dir.path()).unwrap_err();
    assert!(
        matches!(
            err,
            ChainError::Format {
                source: FormatError::Truncated | FormatError::Checksum,
                ..
            }
        ),
        "{err:?}"
    );
    let mut bad = bytes.clone();
    let at = bad.len() - 40;
    bad[at] ^= 1;
    std::fs::write(&hdr, &bad).unwrap();
    assert!(matches!(
        Chain::open(dir.path()),
        Err(ChainError::Format {
            source: FormatError::Checksum,
            ..
        })
    ));
    std::fs::remove_file(&hdr).unwrap();
    assert!(matches!(
        Chain::open(dir.path()),
        Err(ChainError::Io { .. })
    ));
}

#[test]
fn a_missing_generation_file_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let (a, b) = (root.path().join("a"), root.path().join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    full(&a, &[(1, 1)]);
    diff(&b, &a, &[(2, Some(2))]);
    let base = Chain::open(&b).unwrap().generation_path(0).unwrap();
    std::fs::remove_file(base).unwrap();
    assert!(matches!(Chain::open(&b), Err(ChainError::Io { .. })));
}

#[test]
fn a_snapshot_cannot_diff_onto_itself_and_pages_are_bounds_checked() {
    let dir = tempfile::tempdir().unwrap();
    full(dir.path(), &[]);
    let chain = Chain::open(dir.path()).unwrap();
    assert!(matches!(
        ChainWriter::diff(dir.path(), &chain),
        Err(ChainError::SameDirectory(_))
    ));
    let other = tempfile::tempdir().unwrap();
    let mut w = ChainWriter::full(other.path(), PS as u32, PAGES).unwrap();
    assert!(matches!(
        w.put_page(PAGES, &page(1)),
        Err(ChainError::OutOfRange { .. })
    ));
    assert!(matches!(
        w.put_page(0, &[1u8; 100]),
        Err(ChainError::BadBuffer { .. })
    ));
    let mut buf = vec![0u8; PS];
    assert!(matches!(
        chain.read_page(PAGES, &mut buf),
        Err(ChainError::OutOfRange { .. })
    ));
}
