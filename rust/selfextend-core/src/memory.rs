//! A memory budget check, so that an oversized request fails with an error instead of
//! an allocation abort or the OS's OOM killer.

use crate::error::{Error, Result};

/// Bytes the process can still allocate: the smaller of the system's available memory
/// and the cgroup limit's headroom. `None` where neither can be read.
pub fn available_bytes() -> Option<usize> {
    let meminfo = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<usize>().ok())
                .map(|kb| kb.saturating_mul(1024))
        });
    let read = |p: &str| std::fs::read_to_string(p).ok();
    let cgroup = read("/sys/fs/cgroup/memory.max")
        .and_then(|max| max.trim().parse::<usize>().ok())
        .map(|max| {
            let used = read("/sys/fs/cgroup/memory.current")
                .and_then(|u| u.trim().parse::<usize>().ok())
                .unwrap_or(0);
            max.saturating_sub(used)
        });
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Fails with [`Error::OutOfMemory`] when `fixed + per_position * positions` bytes
/// exceed what is available, or the caller's `limit`; the message says how many
/// positions would fit.
pub fn ensure_fits(
    fixed: usize,
    per_position: usize,
    positions: usize,
    limit: Option<usize>,
) -> Result<()> {
    // Leave headroom for the weights' working set, allocator slack and the caller.
    let system = available_bytes().map(|a| a / 10 * 9);
    let Some(budget) = [system, limit].into_iter().flatten().min() else {
        return Ok(());
    };
    let source = if limit == Some(budget) {
        "max_memory allows"
    } else {
        "is available"
    };
    let need = positions.saturating_mul(per_position).saturating_add(fixed);
    if need <= budget {
        return Ok(());
    }
    Err(Error::OutOfMemory {
        msg: format!(
            "this request needs about {} of memory but only {} {source}; \
             about {} tokens would fit (try a shorter prompt, fewer new tokens, or a smaller chunk_size)",
            human(need),
            human(budget),
            budget.saturating_sub(fixed) / per_position.max(1)
        ),
    })
}

fn human(bytes: usize) -> String {
    let gib = bytes as f64 / (1u64 << 30) as f64;
    if gib >= 1.0 {
        format!("{gib:.1} GiB")
    } else {
        format!("{:.1} MiB", bytes as f64 / (1u64 << 20) as f64)
    }
}

/// Hands memory the allocator keeps after frees back to the OS. glibc keeps freed
/// large blocks (KV caches, activations of long chunks) in its arenas once its
/// dynamic mmap threshold has grown, so a server's RSS would stay at its peak after
/// a burst of requests; the engine calls this when it goes idle.
pub(crate) fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `len` zero bytes, on transparent huge pages where Linux leaves that to the program
/// (the `madvise` setting, a common default). Packed weights are streamed every
/// decode step, and on 4 KiB pages every 64 cache lines cost a TLB miss (BENCHMARKS.md
/// has the difference on an AMD EPYC VM).
pub(crate) fn zeroed_on_huge_pages(len: usize) -> Vec<u8> {
    // A large zeroed allocation is fresh pages the kernel has not backed yet (`vec!`
    // of zero bytes asks the allocator for zeroed memory, it does not write), so the
    // advice applies before the first write, when pages are chosen.
    let buf = vec![0u8; len];
    #[cfg(target_os = "linux")]
    {
        const HUGE: usize = 2 << 20;
        let start = buf.as_ptr() as usize;
        let (first, last) = (start.next_multiple_of(HUGE), (start + len) / HUGE * HUGE);
        if first < last {
            // SAFETY: [first, last) lies inside `buf`'s allocation and is page aligned;
            // the advice changes how the pages are backed, never their contents. Where
            // the kernel refuses it, nothing changes.
            unsafe {
                libc::madvise(
                    first as *mut libc::c_void,
                    last - first,
                    libc::MADV_HUGEPAGE,
                );
            }
        }
    }
    buf
}
