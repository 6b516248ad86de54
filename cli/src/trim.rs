//! Giving back the memory a long-running role no longer uses: start-up code and freed heap.
//!
//! At start a role runs a great deal of code once — bootstrap writes, the decoding of every
//! kind it lists, TLS set-up, certificate generation — and each page of the executable it
//! touches stays mapped: counted in the process's RSS, and given extra time on the kernel's
//! active list before reclaim (vmscan keeps referenced, mapped executable pages so that code
//! stays in memory under pressure), though an idle role never runs that code again.
//! `scripts/bench-memory.sh`, release build: an idle `skiff server` with no node held 27.1
//! MiB of file-backed memory with those pages kept, 8.8 MiB once given back; one serving a
//! node 28.7 and 21.7 (its heartbeats run the API's whole write path every few seconds).
//!
//! So every `INTERVAL`, from `FIRST` after start, a role tells the kernel it does not need
//! the clean pages of its own executable (`madvise(MADV_DONTNEED)` on the executable's
//! read-only mappings that hold no private copy of a page) and asks the allocator to return
//! what it holds freed. The pages stay in the page cache: the code the role runs next is
//! mapped again by a minor fault, without reading the disk. A mapping holding a page the
//! process wrote (the loader's relocated `RELRO` data) is never touched, since `MADV_DONTNEED`
//! would bring back the file's bytes in place of those the loader wrote.

use std::time::Duration;

/// The first pass, once start-up (bootstrap, first listings, certificates) is over.
const FIRST: Duration = Duration::from_secs(20);
/// Later passes: code a burst of work mapped is given back within this long.
const INTERVAL: Duration = Duration::from_secs(60);

/// Starts the passes on a thread of their own for the life of the process; none when
/// `SKIFF_KEEP_PAGES` is set (to measure against, or to rule this out).
pub fn spawn() {
    if std::env::var_os("SKIFF_KEEP_PAGES").is_some() {
        return;
    }
    let started = std::thread::Builder::new()
        .name("trim".into())
        .stack_size(64 * 1024)
        .spawn(|| {
            std::thread::sleep(FIRST);
            loop {
                match trim() {
                    Ok(bytes) => tracing::debug!(bytes, "gave back the executable's clean pages"),
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot give back memory; not trying again");
                        return;
                    }
                }
                std::thread::sleep(INTERVAL);
            }
        });
    if let Err(e) = started {
        tracing::debug!(error = %e, "no thread to give back memory");
    }
}

/// One pass: the executable's clean read-only pages, then the allocator's freed memory.
/// Returns the bytes of the mappings advised.
pub fn trim() -> std::io::Result<u64> {
    let exe = std::fs::read_link("/proc/self/exe")?;
    let smaps = std::fs::read_to_string("/proc/self/smaps")?;
    let mut bytes = 0;
    for m in clean_read_only_mappings(&smaps, &exe.to_string_lossy()) {
        #[allow(unsafe_code)]
        // SAFETY: the range is one whole mapping of this process's executable, from its own
        // smaps; it is not writable and holds no anonymous (privately written) page, so every
        // page of it reads back from the file exactly as it is now. Nothing else changes the
        // mapping: the dynamic loader made its last change (RELRO) before `main`.
        let r = unsafe {
            libc::madvise(
                m.start as *mut libc::c_void,
                m.len as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        bytes += m.len;
    }
    #[cfg(not(feature = "system-alloc"))]
    crate::alloc::collect();
    Ok(bytes)
}

/// A range of the address space.
#[derive(Debug, PartialEq)]
struct Mapping {
    start: u64,
    len: u64,
}

/// The mappings of `exe` in an smaps text that are neither writable nor hold anonymous pages.
fn clean_read_only_mappings(smaps: &str, exe: &str) -> Vec<Mapping> {
    let mut out = Vec::new();
    // The mapping being read: its range, and whether it qualifies so far.
    let mut current: Option<(Mapping, bool)> = None;
    let mut finish = |current: &mut Option<(Mapping, bool)>| {
        if let Some((m, true)) = current.take() {
            out.push(m);
        }
    };
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-').and_then(|(lo, hi)| {
            Some((
                u64::from_str_radix(lo, 16).ok()?,
                u64::from_str_radix(hi, 16).ok()?,
            ))
        }) {
            // A mapping's header: "lo-hi perms offset dev inode [path]".
            finish(&mut current);
            let perms = fields.next().unwrap_or("");
            let path = fields.nth(3).unwrap_or("");
            let ours = path == exe && fields.next().is_none();
            let read_only = perms.starts_with('r') && perms.as_bytes().get(1) == Some(&b'-');
            current = Some((
                Mapping {
                    start: lo,
                    len: hi - lo,
                },
                ours && read_only && hi > lo,
            ));
        } else if first == "Anonymous:" {
            if let Some((_, ok)) = current.as_mut() {
                if fields.next() != Some("0") {
                    *ok = false;
                }
            }
        }
    }
    finish(&mut current);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
00200000-01b84000 r--p 00000000 fd:00 123 /usr/bin/skiff
Size:              25872 kB
Rss:                1234 kB
Anonymous:             0 kB
01b84000-07795000 r-xp 01983000 fd:00 123 /usr/bin/skiff
Size:              94276 kB
Anonymous:             0 kB
07795000-07e3e000 r--p 07593000 fd:00 123 /usr/bin/skiff
Size:               6820 kB
Anonymous:          6044 kB
07e3e000-07e4a000 rw-p 07c3b000 fd:00 123 /usr/bin/skiff
Anonymous:            48 kB
7f0000000000-7f0000100000 r-xp 00000000 fd:00 9 /usr/lib/x86_64-linux-gnu/libc.so.6
Anonymous:             0 kB
7f0000200000-7f0000300000 r--p 00000000 fd:00 123 /usr/bin/skiff (deleted)
Anonymous:             0 kB
";

    #[test]
    fn only_the_executables_clean_read_only_mappings_are_given_back() {
        let got = clean_read_only_mappings(SMAPS, "/usr/bin/skiff");
        assert_eq!(
            got,
            vec![
                Mapping {
                    start: 0x200000,
                    len: 0x01b84000 - 0x200000
                },
                Mapping {
                    start: 0x01b84000,
                    len: 0x07795000 - 0x01b84000
                },
            ]
        );
    }

    fn rss_file_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("RssFile:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A pass on this very process: its file-backed memory shrinks, and it runs on.
    #[test]
    fn a_pass_gives_back_pages_and_the_process_runs_on() {
        let before = rss_file_kib();
        let bytes = trim().expect("trim");
        let after = rss_file_kib();
        assert!(bytes > 0, "no mapping of the test executable was advised");
        assert!(
            after < before,
            "file-backed memory {before} KiB -> {after} KiB"
        );
        // What the pass gave back reads from the file as it was: this test's read-only data
        // (the constant) and code (the parser) give the same answer as before it.
        let got = clean_read_only_mappings(SMAPS, "/usr/bin/skiff");
        assert_eq!(got.len(), 2);
    }
}
