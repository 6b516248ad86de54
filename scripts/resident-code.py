#!/usr/bin/env python3
"""Which parts of a running skiff binary are resident: its file-backed memory by crate.

Usage: scripts/resident-code.py PID [TOP]   (root: reads /proc/PID/pagemap)

For every page of the process's mappings of its own executable, /proc/PID/pagemap says whether
it is present. Each present page of code or read-only data is given to the crate that owns most
of its bytes, by the executable's symbol table (`nm`; a build with symbols, e.g. the debug
build or `cargo build --profile profiling`). Prints resident KiB per mapping and, for code and
read-only data, the TOP crates (default 25). The kernel maps pages around each fault
(`fault_around_bytes`, 64 KiB), so a page can be resident without being used.
"""

import bisect
import collections
import os
import re
import struct
import subprocess
import sys

PAGE = os.sysconf("SC_PAGE_SIZE")


def load_segments(exe):
    """PT_LOAD segments as (file offset, vaddr, file size)."""
    out = subprocess.run(["readelf", "-lW", exe], capture_output=True, text=True, check=True).stdout
    segs = []
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0] == "LOAD":
            segs.append((int(parts[1], 16), int(parts[2], 16), int(parts[4], 16)))
    return segs


def crate_of(name):
    name = name.lstrip("<&*")
    name = re.sub(r"^(dyn |mut |const )+", "", name)
    head = re.split(r"::|<| as |\[|\(| ", name, maxsplit=1)[0]
    return head or "?"


def load_symbols(exe):
    out = subprocess.run(["nm", "-C", "--defined-only", "-S", "-n", exe],
                         capture_output=True, text=True, check=True).stdout
    syms = []
    for line in out.splitlines():
        parts = line.split(" ", 3)
        if len(parts) < 4:
            continue
        addr, size, kind, name = parts
        try:
            addr, size = int(addr, 16), int(size, 16)
        except ValueError:
            continue
        if size and kind.lower() in "trdb":
            syms.append((addr, size, crate_of(name)))
    syms.sort()
    return syms


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    pid = int(sys.argv[1])
    top = int(sys.argv[2]) if len(sys.argv) > 2 else 25
    exe = os.readlink(f"/proc/{pid}/exe")
    segs = load_segments(exe)
    syms = load_symbols(exe)
    starts = [s[0] for s in syms]
    if not syms:
        print(f"{exe} has no symbols: per-crate figures need a build with them", file=sys.stderr)

    by_perm = collections.Counter()
    by_crate = {"r-x": collections.Counter(), "r--": collections.Counter()}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/pagemap", "rb") as pagemap:
        for line in maps:
            parts = line.split()
            if len(parts) < 6 or parts[5] != exe:
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            perm, off = parts[1][:3], int(parts[2], 16)
            pagemap.seek(lo // PAGE * 8)
            entries = pagemap.read((hi - lo) // PAGE * 8)
            for i in range(0, len(entries), 8):
                (entry,) = struct.unpack_from("<Q", entries, i)
                if not entry >> 63 & 1:
                    continue
                by_perm[perm] += PAGE
                if perm not in by_crate:
                    continue
                fileoff = off + i // 8 * PAGE
                seg = next((s for s in segs if s[0] <= fileoff < s[0] + s[2]), None)
                if seg is None:
                    continue
                vaddr = seg[1] + fileoff - seg[0]
                owners = collections.Counter()
                j = max(bisect.bisect_right(starts, vaddr) - 1, 0)
                while j < len(syms) and syms[j][0] < vaddr + PAGE:
                    a, size, crate = syms[j]
                    overlap = min(a + size, vaddr + PAGE) - max(a, vaddr)
                    if overlap > 0:
                        owners[crate] += overlap
                    j += 1
                owner = owners.most_common(1)[0][0] if owners else "(no symbol)"
                by_crate[perm][owner] += PAGE

    print(f"{exe} (pid {pid}), resident pages of the executable:")
    for perm, n in sorted(by_perm.items()):
        print(f"  {perm}  {n // 1024:>8} KiB")
    for perm, label in (("r-x", "code"), ("r--", "read-only data")):
        total = sum(by_crate[perm].values())
        if not total:
            continue
        print(f"\n{label}: {total // 1024} KiB resident, by crate (top {top}):")
        for crate, n in by_crate[perm].most_common(top):
            print(f"  {n // 1024:>8} KiB  {100 * n / total:5.1f}%  {crate}")


if __name__ == "__main__":
    main()
