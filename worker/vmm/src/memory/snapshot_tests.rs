//! Save and restore of guest RAM without KVM: the dirty log is given by the test, the VMM's own
//! writes are seen through the pagemap, restores map the chain `MAP_PRIVATE`.
#![allow(clippy::cast_possible_truncation)]

use std::path::Path;

use vm_memory::{Bytes, GuestAddress};

use super::snapshot::{
    MemoryManifest, RestoreChoice, SaveKind, SaveOptions, restore_backend, save_with_dirty_log,
};
use super::{GuestRam, MemoryBackend, MemoryError, PAGE_SIZE, create};

const SIZE: u64 = 8 << 20;
const PAGES: usize = (SIZE as usize) / PAGE_SIZE;

fn fill(ram: &GuestRam, page: u64, byte: u8) {
    ram.memory()
        .write_slice(&[byte; PAGE_SIZE], GuestAddress(page * PAGE_SIZE as u64))
        .unwrap();
}

fn contents(ram: &GuestRam) -> Vec<u8> {
    let mut out = vec![0u8; SIZE as usize];
    ram.memory().read_slice(&mut out, GuestAddress(0)).unwrap();
    out
}

fn restore(dir: &Path, manifest: &MemoryManifest) -> GuestRam {
    create(SIZE, &restore_backend(manifest, dir, &RestoreChoice::Map)).unwrap()
}

/// A dirty bitmap with `pages` set.
fn bitmap(pages: &[u64]) -> Vec<u64> {
    let mut bits = vec![0u64; PAGES.div_ceil(64)];
    for &p in pages {
        bits[(p / 64) as usize] |= 1 << (p % 64);
    }
    bits
}

#[test]
fn full_save_restores_by_mapping_and_skips_untouched_pages() {
    let dir = tempfile::tempdir().unwrap();
    let ram = create(SIZE, &MemoryBackend::Anonymous).unwrap();
    fill(&ram, 1, 0xaa);
    fill(&ram, 100, 0xbb);
    fill(&ram, 7, 0); // touched but zero: stays a hole
    let m = save_with_dirty_log(
        &ram,
        None,
        dir.path(),
        SaveKind::Full,
        &SaveOptions::default(),
    )
    .unwrap();
    assert_eq!((m.depth, m.pages_written, m.size), (1, 2, SIZE));
    let restored = restore(dir.path(), &m);
    assert_eq!(contents(&restored), contents(&ram));
}

#[test]
fn a_foreign_or_resized_memory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let ram = create(SIZE, &MemoryBackend::Anonymous).unwrap();
    let m = save_with_dirty_log(
        &ram,
        None,
        dir.path(),
        SaveKind::Full,
        &SaveOptions::default(),
    )
    .unwrap();
    let wrong_sha = MemoryBackend::MapPrivate {
        dir: dir.path().to_owned(),
        header_sha256: "00".repeat(32),
    };
    assert!(matches!(
        create(SIZE, &wrong_sha),
        Err(MemoryError::Restore {
            source: super::mapped::MappedError::HeaderMismatch { .. },
            ..
        })
    ));
    let backend = restore_backend(&m, dir.path(), &RestoreChoice::Map);
    assert!(matches!(
        create(SIZE * 2, &backend),
        Err(MemoryError::Restore {
            source: super::mapped::MappedError::SizeMismatch { .. },
            ..
        })
    ));
}

#[test]
fn diffs_keep_guest_and_vmm_writes_and_zeroed_pages_across_merges() {
    let root = tempfile::tempdir().unwrap();
    let options = SaveOptions { max_depth: 2 };
    let ram = create(SIZE, &MemoryBackend::Anonymous).unwrap();
    for p in 0..16 {
        fill(&ram, p, p as u8 + 1);
    }
    let mut dir = root.path().join("s0");
    std::fs::create_dir(&dir).unwrap();
    let mut manifest = save_with_dirty_log(&ram, None, &dir, SaveKind::Full, &options).unwrap();
    let mut expected = contents(&ram);
    for cycle in 1..=6u8 {
        // Restore (as a resume does), then the "guest" writes page 20+cycle and zeroes page
        // `cycle`, both in KVM's log; the "VMM" writes page 200+cycle, not in the log.
        let ram = restore(&dir, &manifest);
        assert_eq!(contents(&ram), expected, "cycle {cycle}: restore");
        let guest_page = 20 + u64::from(cycle);
        let vmm_page = 200 + u64::from(cycle);
        fill(&ram, guest_page, 0x40 + cycle);
        fill(&ram, u64::from(cycle), 0);
        fill(&ram, vmm_page, 0x80 + cycle);
        expected = contents(&ram);
        let dirty = bitmap(&[guest_page, u64::from(cycle)]);
        let next = root.path().join(format!("s{cycle}"));
        std::fs::create_dir(&next).unwrap();
        manifest = save_with_dirty_log(
            &ram,
            Some(&dirty),
            &next,
            SaveKind::Diff { parent: &dir },
            &options,
        )
        .unwrap();
        assert!(
            manifest.depth <= 2,
            "cycle {cycle}: depth {}",
            manifest.depth
        );
        if manifest.depth == 2 {
            // A diff: only the three changed pages (the zeroed one as a hole).
            assert_eq!(manifest.pages_written, 2, "cycle {cycle}");
        }
        dir = next;
    }
    assert_eq!(contents(&restore(&dir, &manifest)), expected);
}

#[test]
fn a_diff_without_dirty_logging_is_refused() {
    let root = tempfile::tempdir().unwrap();
    let ram = create(SIZE, &MemoryBackend::Anonymous).unwrap();
    let full = root.path().join("full");
    let diff = root.path().join("diff");
    std::fs::create_dir(&full).unwrap();
    std::fs::create_dir(&diff).unwrap();
    save_with_dirty_log(&ram, None, &full, SaveKind::Full, &SaveOptions::default()).unwrap();
    let err = save_with_dirty_log(
        &ram,
        None,
        &diff,
        SaveKind::Diff { parent: &full },
        &SaveOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, super::snapshot::SaveError::NoDirtyLog));
}

#[test]
fn a_page_server_restores_the_same_memory_and_a_diff_of_it_keeps_every_page() {
    let root = tempfile::tempdir().unwrap();
    let full = root.path().join("full");
    std::fs::create_dir(&full).unwrap();
    let ram = create(SIZE, &MemoryBackend::Anonymous).unwrap();
    fill(&ram, 3, 0x33);
    fill(&ram, 1000, 0x44);
    let m =
        save_with_dirty_log(&ram, None, &full, SaveKind::Full, &SaveOptions::default()).unwrap();
    let socket = root.path().join("pager.sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
    let chain_dir = full.clone();
    let server = std::thread::spawn(move || {
        let chain = roost_pager::Chain::open(&chain_dir).unwrap();
        let (stream, _) = listener.accept().unwrap();
        roost_pager::server::serve(&chain, stream, &Default::default()).unwrap()
    });
    let choice = RestoreChoice::Uffd {
        socket: socket.clone(),
    };
    let served = create(SIZE, &restore_backend(&m, &full, &choice)).unwrap();
    assert_eq!(served.backing(), super::Backing::Uffd);
    fill(&served, 5, 0x55);
    let expected = contents(&served);
    assert_eq!(expected, {
        fill(&ram, 5, 0x55);
        contents(&ram)
    });
    // A diff of page-server memory with an empty KVM log still holds the VMM's write.
    let diff = root.path().join("diff");
    std::fs::create_dir(&diff).unwrap();
    let dm = save_with_dirty_log(
        &served,
        Some(&bitmap(&[])),
        &diff,
        SaveKind::Diff { parent: &full },
        &SaveOptions::default(),
    )
    .unwrap();
    drop(served);
    let summary = server.join().unwrap();
    assert!(summary.faults > 0);
    assert_eq!(contents(&restore(&diff, &dm)), expected);
}
