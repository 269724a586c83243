//! `memory::trim` gives freed heap pages back (its own test binary: RSS is per process, and
//! tests running beside it in one process would move it).

#[test]
fn trimming_returns_freed_pages() {
    if !fedlink::memory::SUPPORTED {
        return;
    }
    // Many small blocks, then free all but every 64th: holes in the middle of the heap,
    // which glibc keeps without a trim. Pages only count once written.
    let mut blocks: Vec<Vec<u8>> = (0..200_000).map(|i| vec![i as u8; 256]).collect();
    let kept: Vec<Vec<u8>> = blocks.drain(..).step_by(64).collect();
    let before = fedlink::memory::rss_bytes().expect("RSS on Linux");
    assert!(fedlink::memory::trim(), "freed pages in the middle of the heap were released");
    let after = fedlink::memory::rss_bytes().expect("RSS on Linux");
    assert!(before - after > 20 << 20, "RSS {before} -> {after}: less than 20 MiB of ~50 MiB freed was returned");
    assert_eq!(kept.len(), 3_125);
    assert!(kept.iter().enumerate().all(|(i, b)| b.iter().all(|x| *x == (i * 64) as u8)), "kept blocks are intact");
}
