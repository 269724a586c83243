//! The allocator, and giving freed heap memory back to the system (`memory.trim_secs`).
//!
//! fedlink allocates with jemalloc, not the C library's malloc. A profile under load
//! (50-PDU transactions, glibc's allocator) put about a quarter of fedlink's CPU in glibc's
//! `malloc` and `free` (`_int_malloc`, `malloc_consolidate`, `_int_free`, ...): a
//! transaction parses, copies and drops thousands of small JSON values and sled rewrites
//! pages. With jemalloc the same load took 10-15% less CPU per PDU in two pairs of runs,
//! 27% in a third (see README, Performance).
//!
//! The allocator is set here, in the library, so that every binary and test built from
//! this crate runs on the allocator fedlink runs on (`tests/memory.rs` checks jemalloc's
//! purge, which would find nothing to purge under another allocator).
//!
//! jemalloc returns freed pages to the system gradually (its decay), and only as it
//! allocates; [`worker`] also purges every arena every `memory.trim_secs`, so memory a
//! burst freed goes back even when fedlink is idle afterwards. (With glibc's allocator a
//! trim was needed to return pages freed in the middle of its heaps: at 10,000 rooms and
//! 1,000 linked persons `malloc_trim` took RSS from 259 to 205 MiB.)
//!
//! The only module with `unsafe` code: calls into the C library and into jemalloc, and
//! [`zeroed_atomics`].

#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `n` zeroed atomic words, allocated zeroed: the allocator hands out large blocks as
/// fresh pages the system zeroes when first touched, so allocating a large array costs
/// nothing up front (writing the zeros one by one touches every page at once: about a
/// millisecond per 4 MiB, on whatever path allocates).
pub fn zeroed_atomics(n: usize) -> Box<[std::sync::atomic::AtomicU64]> {
    use std::sync::atomic::AtomicU64;
    if n == 0 {
        return Box::new([]);
    }
    let layout = std::alloc::Layout::array::<AtomicU64>(n).expect("an array of atomic words within the address space");
    // SAFETY: the layout is non-zero-sized (n > 0). An all-zero `AtomicU64` is a valid
    // value (it has the same in-memory representation as `u64`), the pointer comes from
    // the global allocator with this exact layout (`Layout::array` of the element type, so
    // its alignment), and the box takes ownership of the `n` elements and frees them with
    // the same layout.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<AtomicU64>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(std::ptr::slice_from_raw_parts_mut(ptr, n))
    }
}

/// Resident set size of this process in bytes, if the platform tells.
pub fn rss_bytes() -> Option<u64> {
    rss_of("self").map(|(rss, _)| rss)
}

/// Resident set size and its peak, in bytes, of the process `pid` (`"self"` for this
/// one), from `/proc/{pid}/status` (Linux).
pub fn rss_of(pid: &str) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let kib: u64 = status.lines().find(|l| l.starts_with(name))?.split_whitespace().nth(1)?.parse().ok()?;
        Some(kib * 1024)
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// The system's memory page size in bytes.
#[cfg(target_os = "linux")]
pub fn page_size() -> u64 {
    // SAFETY: sysconf has no preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as u64
    } else {
        4096
    }
}

/// The system's memory page size in bytes (assumed).
#[cfg(not(target_os = "linux"))]
pub fn page_size() -> u64 {
    4096
}

/// Whether the trim worker runs on this platform: Linux, where fedlink allocates with
/// jemalloc and RSS is read from `/proc` (the trim itself works wherever jemalloc does).
pub const SUPPORTED: bool = cfg!(all(target_os = "linux", not(target_env = "msvc")));

/// Return the allocator's free pages to the system: jemalloc purges the unused dirty pages
/// of every arena. Blocks for a few milliseconds (each arena's lock is held while it is
/// purged): call it off the async threads. Returns whether jemalloc accepted the request.
pub fn trim() -> bool {
    #[cfg(not(target_env = "msvc"))]
    {
        // "arena.<MALLCTL_ARENAS_ALL>.purge": every arena (jemalloc's MALLCTL_ARENAS_ALL is 4096).
        const PURGE_ALL: &[u8] = b"arena.4096.purge\0";
        // SAFETY: the name is NUL-terminated; the purge command reads and writes no values
        // (all pointers null, lengths zero).
        unsafe { tikv_jemalloc_sys::mallctl(PURGE_ALL.as_ptr().cast(), std::ptr::null_mut(), std::ptr::null_mut(), std::ptr::null_mut(), 0) == 0 }
    }
    #[cfg(target_env = "msvc")]
    {
        false
    }
}

/// Trims every `memory.trim_secs` (not at all when 0 or unsupported), on a blocking thread.
pub async fn worker(app: std::sync::Arc<crate::node::Fedlink>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let every = std::time::Duration::from_secs(app.cfg.memory.trim_secs);
    if every.is_zero() || !SUPPORTED {
        tracing::info!(memory.trim_secs = every.as_secs(), supported = SUPPORTED, "freed heap pages are not given back periodically");
        return;
    }
    let start = tokio::time::Instant::now().checked_add(every).unwrap_or_else(tokio::time::Instant::now);
    let mut ticks = tokio::time::interval_at(start, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let (before, took, after) = match tokio::task::spawn_blocking(|| {
            let before = rss_bytes();
            let started = std::time::Instant::now();
            trim();
            let took = started.elapsed();
            (before, took, rss_bytes())
        })
        .await
        {
            Ok(r) => r,
            Err(e) if *stop.borrow() => {
                tracing::debug!(error = %e, "trim not run: shutting down");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "a trim failed; trying again at the next interval");
                continue;
            }
        };
        app.metrics.memory_trim_seconds.observe(took.as_secs_f64());
        app.metrics.memory_trims.inc();
        let freed = before.zip(after).map(|(b, a)| b.saturating_sub(a)).unwrap_or(0);
        app.metrics.memory_trimmed_bytes.inc_by(freed);
        tracing::debug!(rss_before = ?before, rss_after = ?after, freed, took_ms = took.as_secs_f64() * 1e3, "gave freed heap pages back to the system");
    }
}
