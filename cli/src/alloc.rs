//! The process allocator: mimalloc, set up for a process that runs for months and is idle most
//! of the time.
//!
//! The proxy's data path and the API server allocate per request; mimalloc's thread-local free
//! lists serve that better than glibc's malloc. By default mimalloc commits its arenas eagerly
//! on Linux, and memory it purges from an eagerly committed arena is only reset, so it stays
//! counted in the process's RSS: an idle `skiff server` held 59 MB (43 MB anonymous) that way,
//! and 19 MB (4 MB anonymous) with lazily committed arenas, whose purged memory is decommitted.

use libmimalloc_sys as ffi;

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// `mi_option_arena_eager_commit` in mimalloc v3's `mimalloc.h` (libmimalloc-sys names only the
/// stable options).
const ARENA_EAGER_COMMIT: ffi::mi_option_t = 4;

/// Runs before mimalloc's own start-up (its constructor has priority 101; lower runs first) and
/// so before the first arena is reserved: setting the option in `main` is too late, the arena
/// the runtime's first allocations took is committed eagerly by then.
#[used]
#[allow(unsafe_code)]
// SAFETY: an `.init_array` entry is a plain `extern "C" fn()` the C runtime calls once at load.
#[unsafe(link_section = ".init_array.00100")]
static CONFIGURE: extern "C" fn() = configure;

/// Arenas are committed lazily by default; `MIMALLOC_ARENA_EAGER_COMMIT` still overrides it
/// (mimalloc reads its environment after this sets the default).
extern "C" fn configure() {
    // SAFETY: sets the default value of one option in mimalloc's option table, before any
    // thread or allocation exists.
    #[allow(unsafe_code)]
    unsafe {
        ffi::mi_option_set_default(ARENA_EAGER_COMMIT, 0);
    };
}

/// Returns the memory the allocator holds freed to the system now, rather than after its
/// purge delay (`mi_collect(force)`).
pub fn collect() {
    // SAFETY: mimalloc's collection of this thread's and the abandoned heaps' free pages; safe
    // to call from any thread at any time.
    #[allow(unsafe_code)]
    unsafe {
        ffi::mi_collect(true)
    };
}

#[cfg(test)]
mod tests {
    /// The constructor ran in this test binary too (it links this module).
    #[test]
    fn arenas_are_committed_lazily() {
        #[allow(unsafe_code)]
        // SAFETY: reads one option's value.
        let v = unsafe { super::ffi::mi_option_get(super::ARENA_EAGER_COMMIT) };
        if std::env::var_os("MIMALLOC_ARENA_EAGER_COMMIT").is_none() {
            assert_eq!(v, 0);
        }
    }
}
