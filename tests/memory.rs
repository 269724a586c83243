//! `memory::trim` gives freed heap pages back (its own test binary: RSS is per process, and
//! tests running beside it in one process would move it).

#[test]
fn trimming_returns_freed_pages() {
    if !fedlink::memory::SUPPORTED {
        eprintln!("the trim worker and RSS readings are Linux-only; nothing to check");
        return;
    }
    // Many small blocks, then free all but one every few pages: pages freed in the middle
    // of the heap, which the allocator keeps for a while without a trim. Pages only count
    // once written.
    let block = 256usize;
    let every = (2 * fedlink::memory::page_size() as usize).div_ceil(block) + 1;
    let n = (64 << 20) / block;
    let mut blocks: Vec<Vec<u8>> = (0..n).map(|i| vec![i as u8; block]).collect();
    let kept: Vec<Vec<u8>> = blocks.drain(..).step_by(every).collect();
    let before = fedlink::memory::rss_bytes().expect("RSS on Linux");
    assert!(fedlink::memory::trim(), "jemalloc accepted the purge");
    let after = fedlink::memory::rss_bytes().expect("RSS on Linux");
    // jemalloc keeps 256-byte blocks in one-page slabs: about half of them hold a kept block,
    // so about 30 MiB of pages are free to return.
    assert!(after + (20 << 20) < before, "RSS {before} -> {after}: less than 20 MiB of the ~30 MiB of free pages was returned");
    assert_eq!(kept.len(), n.div_ceil(every));
    assert!(kept.iter().enumerate().all(|(i, b)| b.iter().all(|x| *x == (i * every) as u8)), "kept blocks are intact");
}
