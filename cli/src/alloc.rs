//! The process allocator: mimalloc, set up for a process that runs for months and is idle most
//! of the time.
//!
//! The proxy's data path and the API server allocate per request; mimalloc's thread-local free
//! lists serve that better than glibc's malloc. By default mimalloc commits its arenas eagerly
//! on Linux, and memory it purges from an eagerly committed arena is only reset (`MADV_FREE`),
//! so it stays counted in the process's RSS until the kernel is short of memory: an idle
//! `skiff server` showed 57 MB RSS that way, against 17.6 MB with lazily committed arenas,
//! whose purged memory is decommitted and leaves the RSS at once.

use libmimalloc_sys as ffi;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc v3's `mimalloc.h` (libmimalloc-sys names only the
/// stable options).
const ARENA_EAGER_COMMIT: ffi::mi_option_t = 4;

/// Commits arenas lazily, unless `MIMALLOC_ARENA_EAGER_COMMIT` says otherwise. Called first
/// thing in `main`, before any other thread exists (mimalloc's option calls are not thread
/// safe) and before the allocations of the process's working set.
pub fn configure() {
    if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_some() {
        return;
    }
    // SAFETY: sets one option's value in mimalloc's option table; no other thread runs yet.
    #[allow(unsafe_code)]
    unsafe {
        ffi::mi_option_set(ARENA_EAGER_COMMIT, 0);
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn arenas_are_committed_lazily() {
        super::configure();
        #[allow(unsafe_code)]
        // SAFETY: reads one option's value.
        let v = unsafe { super::ffi::mi_option_get(super::ARENA_EAGER_COMMIT) };
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            assert_eq!(v, 0);
        }
    }
}
