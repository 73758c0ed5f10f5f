//! Page recycling in the expert arena: an evicted expert's pages become the
//! next missing expert's pages, moved by the page tables instead of being
//! given back and faulted in again.
//!
//! Sketch (the 12 GiB MoE of docs/performance.md in a 4 GiB cgroup): a token
//! misses about 880 MiB of experts, 225k pages of 4 KiB. Given back with
//! `MADV_DONTNEED` and faulted in fresh at the new expert's address, each page
//! is zeroed and charged to the memory cgroup, on the I/O thread as O_DIRECT
//! pins the destination (`perf`: a quarter of the CPU samples, with two
//! cores shared by compute and I/O). An evicted expert's pages hold nothing
//! anyone needs, and the read overwrites every byte of the new expert's, so
//! `mremap(MREMAP_DONTUNMAP)` moves them there instead: no zeroing, no charge,
//! no fault, one call per piece (typically one per expert tensor: experts of
//! one model have the same shapes). The source keeps its mapping, empty, as
//! after `MADV_DONTNEED`.
//!
//! Each moved piece is its own VMA (its page offset no longer matches its
//! neighbours'), and so is what a move leaves of a bigger donor: on that
//! model the arena settles at 3–4 VMAs per expert tensor range (22k for its
//! 7,296 ranges). Recycling starts only when 4 per range fit in half of
//! `vm.max_map_count` (65,530 by default: about 8,000 ranges), and stops for
//! good (back to `MADV_DONTNEED`) if the process's count ever reaches three
//! quarters of it, checked every [`CHECK_EVERY`] moves.

use std::ffi::c_void;
use std::io::Read as _;

use crate::io::ALIGN;

use super::memory::Mapping;

/// Pieces smaller than this are given back rather than moved (a move costs
/// a system call and a TLB flush: worth it for many pages, not for one).
const MIN_PIECE: usize = 16 * ALIGN;
/// At most this many pieces fill one destination range (bounds the VMAs).
const MAX_PIECES: usize = 4;
/// Moves between two counts of the process's VMAs.
const CHECK_EVERY: u32 = 2048;

/// The committed pages of evicted experts, waiting to become a missing
/// expert's (page-aligned ranges inside the arena).
pub(super) struct Recycler {
    donors: Vec<(usize, usize)>,
    /// Scratch: the donor parts inside a destination (already in place).
    inside: Vec<(usize, usize)>,
    enabled: bool,
    moves_since_check: u32,
    max_map_count: usize,
    /// Bytes moved instead of faulted in (totals).
    pub moved: u64,
}

impl Recycler {
    /// No recycling: evicted pages are given back at once.
    pub fn off() -> Recycler {
        Recycler {
            donors: Vec::new(),
            inside: Vec::new(),
            enabled: false,
            moves_since_check: 0,
            max_map_count: 0,
            moved: 0,
        }
    }

    /// Recycling for an arena of `ranges` expert tensor ranges, if this
    /// kernel moves anonymous pages with `MREMAP_DONTUNMAP` (Linux 5.7) and
    /// the VMAs it may make fit well under `vm.max_map_count`.
    /// `HYPURA_NO_RECYCLE=1` turns it off (A/B runs).
    pub fn new(ranges: usize, max_in_flight: usize) -> Recycler {
        let mut r = Recycler::off();
        if std::env::var_os("HYPURA_NO_RECYCLE").is_some_and(|v| v == "1") {
            return r;
        }
        let Some(max) = read_usize("/proc/sys/vm/max_map_count") else {
            return r;
        };
        let now = count_vmas().unwrap_or(usize::MAX);
        // A range is mostly one moved piece, the boundary page after it and
        // a page or two a bigger donor left (measured: 3 to 4 per range).
        let expected = ranges.saturating_mul(4);
        if now.saturating_add(expected) > max / 2 || !dontunmap_works() {
            return r;
        }
        r.enabled = true;
        r.max_map_count = max;
        r.donors = Vec::with_capacity(max_in_flight);
        r.inside = Vec::with_capacity(max_in_flight);
        r
    }

    #[cfg(test)]
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Takes the pages wholly inside `[a, b)` (page-aligned) of an evicted
    /// expert: kept for [`fill`](Self::fill) if recycling, given back
    /// otherwise.
    ///
    /// # Safety
    /// `[a, b)` lies inside the arena, holds no data anyone will read (the
    /// expert is evicted: reloaded before a later selection uses it), and no
    /// read in flight targets it; no other donated range overlaps it.
    pub unsafe fn donate(&mut self, a: usize, b: usize) {
        debug_assert!(a.is_multiple_of(ALIGN) && b.is_multiple_of(ALIGN) && b > a);
        if self.enabled && b - a >= MIN_PIECE && self.donors.len() < self.donors.capacity() {
            self.donors.push((a, b));
        } else {
            // SAFETY: the caller's contract: nothing needs these pages.
            unsafe { dontneed(a, b) };
        }
    }

    /// Before a read into `[a, b)` (the page-aligned pages wholly inside a
    /// missing expert run's bytes): donated pages already there stay, the
    /// rest is filled with donated pages moved there, up to
    /// [`MAX_PIECES`] pieces; what is left faults in as before.
    ///
    /// # Safety
    /// `[a, b)` lies inside the arena; nothing reads or computes on it and no
    /// read targets it until the caller's read is submitted; every donated
    /// range still satisfies [`donate`](Self::donate)'s contract.
    pub unsafe fn fill(&mut self, a: usize, b: usize) {
        if !self.enabled || b <= a {
            return;
        }
        debug_assert!(a.is_multiple_of(ALIGN) && b.is_multiple_of(ALIGN));
        // Donated pages inside [a, b) are in place: take them off the list
        // (the parts outside stay donated).
        self.inside.clear();
        let mut i = 0;
        while i < self.donors.len() {
            let (d0, d1) = self.donors[i];
            if d1 <= a || d0 >= b {
                i += 1;
                continue;
            }
            self.inside.push((d0.max(a), d1.min(b)));
            self.donors.swap_remove(i);
            for part in [(d0, a), (b, d1)] {
                if part.1 > part.0 {
                    if part.1 - part.0 >= MIN_PIECE && self.donors.len() < self.donors.capacity() {
                        self.donors.push(part);
                    } else {
                        // SAFETY: a donated range (the caller's contract).
                        unsafe { dontneed(part.0, part.1) };
                    }
                }
            }
        }
        self.inside.sort_unstable();
        // Fill the gaps between them from the other donors (best fit).
        let mut cursor = a;
        let mut pieces = 0;
        for k in 0..=self.inside.len() {
            let gap_end = self.inside.get(k).map_or(b, |r| r.0);
            while cursor < gap_end && pieces < MAX_PIECES {
                let Some(pick) = best_fit(&self.donors, gap_end - cursor) else {
                    break;
                };
                let (d0, d1) = self.donors[pick];
                let take = (d1 - d0).min(gap_end - cursor);
                // SAFETY: the source is the tail of a donated range, the
                // destination part of [a, b), disjoint (donors overlapping
                // [a, b) were taken off above); both inside the arena, a
                // private anonymous mapping, so MREMAP_DONTUNMAP leaves the
                // source mapped and empty. Nothing uses either range (the
                // contracts of `donate` and this function).
                let ok = unsafe { move_pages(d1 - take, cursor, take) };
                if !ok {
                    // Never expected (probed at start): stop recycling,
                    // give everything back.
                    self.enabled = false;
                    self.discard();
                    return;
                }
                self.moved += take as u64;
                pieces += 1;
                if take == d1 - d0 {
                    self.donors.swap_remove(pick);
                } else if d1 - take - d0 < MIN_PIECE {
                    self.donors.swap_remove(pick);
                    // SAFETY: the rest of a donated range.
                    unsafe { dontneed(d0, d1 - take) };
                } else {
                    self.donors[pick].1 = d1 - take;
                }
                cursor += take;
                self.moves_since_check += 1;
            }
            if let Some(r) = self.inside.get(k) {
                cursor = cursor.max(r.1);
            }
        }
        if self.moves_since_check >= CHECK_EVERY {
            self.moves_since_check = 0;
            if count_vmas().is_none_or(|n| n >= self.max_map_count / 4 * 3) {
                tracing::warn!(
                    "expert arena: many memory maps; evicted pages are given back from now on"
                );
                self.enabled = false;
                self.discard();
            }
        }
    }

    /// Gives every donated page back (after a load step: the memory budget
    /// counts only loaded experts).
    pub fn discard(&mut self) {
        for (a, b) in self.donors.drain(..) {
            // SAFETY: a donated range (`donate`'s contract holds until it is
            // moved or given back).
            unsafe { dontneed(a, b) };
        }
    }
}

/// The donor to fill a gap of `len` bytes from: one of exactly that size,
/// else the smallest larger one (its tail moves), else the largest. Experts
/// of one model mostly share their tensors' sizes, so a gap is mostly one
/// piece, one VMA.
fn best_fit(donors: &[(usize, usize)], len: usize) -> Option<usize> {
    let size = |i: usize| donors[i].1 - donors[i].0;
    let bigger = (0..donors.len())
        .filter(|&i| size(i) >= len)
        .min_by_key(|&i| size(i));
    bigger.or_else(|| (0..donors.len()).max_by_key(|&i| size(i)))
}

/// # Safety
/// `[a, b)` is private anonymous memory whose contents nobody needs.
unsafe fn dontneed(a: usize, b: usize) {
    // SAFETY: the caller's contract; the range reads as zeros afterwards.
    unsafe {
        libc::madvise(a as *mut c_void, b - a, libc::MADV_DONTNEED);
    }
}

/// Moves `len` bytes of pages from `src` to `dst` (page-aligned, disjoint),
/// leaving `src` mapped and empty. False if the kernel refused.
///
/// # Safety
/// Both ranges are private anonymous memory nobody uses during the call;
/// whatever `dst` held is dropped.
unsafe fn move_pages(src: usize, dst: usize, len: usize) -> bool {
    // SAFETY: the caller's contract.
    let r = unsafe {
        libc::mremap(
            src as *mut c_void,
            len,
            len,
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED | libc::MREMAP_DONTUNMAP,
            dst as *mut c_void,
        )
    };
    r == dst as *mut c_void
}

/// Whether `MREMAP_DONTUNMAP` moves a written page of a private anonymous
/// mapping (Linux 5.7 and later), tried on a mapping of our own.
fn dontunmap_works() -> bool {
    let Ok(m) = Mapping::read_write(2 * ALIGN, false) else {
        return false;
    };
    let a = m.base() as usize;
    // SAFETY: both pages are the mapping's, writable, and nothing else
    // refers to them (it is unmapped, both pages, when `m` drops).
    unsafe {
        *(a as *mut u8) = 0x5a;
        move_pages(a, a + ALIGN, ALIGN)
            && *((a + ALIGN) as *const u8) == 0x5a
            && *(a as *const u8) == 0
    }
}

fn read_usize(path: &str) -> Option<usize> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// The process's VMA count (lines of /proc/self/maps), read through a fixed
/// buffer.
fn count_vmas() -> Option<usize> {
    let mut f = std::fs::File::open("/proc/self/maps").ok()?;
    let mut buf = [0u8; 16 * 1024];
    let mut n = 0;
    loop {
        let k = f.read(&mut buf).ok()?;
        if k == 0 {
            return Some(n);
        }
        n += buf[..k].iter().filter(|&&c| c == b'\n').count();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(m: &Mapping, i: usize) -> usize {
        m.base() as usize + i * ALIGN
    }

    fn write(a: usize, len: usize, v: u8) {
        // SAFETY: the test's own mapping, writable.
        unsafe { std::ptr::write_bytes(a as *mut u8, v, len) };
    }

    fn read(a: usize) -> u8 {
        // SAFETY: the test's own mapping, readable.
        unsafe { *(a as *const u8) }
    }

    #[test]
    fn this_kernel_moves_pages() {
        assert!(dontunmap_works(), "MREMAP_DONTUNMAP (Linux 5.7+)");
        assert!(count_vmas().is_some_and(|n| n > 3));
    }

    #[test]
    fn donated_pages_move_to_the_next_missing_range_and_stay_in_place_for_their_own() {
        let m = Mapping::read_write(200 * ALIGN, true).unwrap();
        let mut r = Recycler::new(100, 16);
        assert!(r.enabled());
        // An evicted expert's 32 pages, written (committed).
        write(page(&m, 0), 32 * ALIGN, 7);
        // SAFETY: the test's arena; nothing else uses it.
        unsafe {
            r.donate(page(&m, 0), page(&m, 32));
            // A missing expert of 40 pages: 32 arrive moved, 8 fault in.
            r.fill(page(&m, 100), page(&m, 140));
        }
        assert_eq!(r.moved, 32 * ALIGN as u64);
        assert_eq!(
            read(page(&m, 100)),
            7,
            "the moved pages (contents unspecified, here the old)"
        );
        assert_eq!(read(page(&m, 131)), 7);
        assert_eq!(read(page(&m, 132)), 0);
        assert_eq!(read(page(&m, 0)), 0, "the source is mapped and empty");
        write(page(&m, 0), ALIGN, 1);

        // Donated, then missing again itself: its pages stay where they are.
        write(page(&m, 100), 40 * ALIGN, 9);
        // SAFETY: as above.
        unsafe {
            r.donate(page(&m, 100), page(&m, 140));
            r.fill(page(&m, 100), page(&m, 140));
        }
        assert_eq!(r.moved, 32 * ALIGN as u64, "nothing moved");
        assert_eq!(read(page(&m, 139)), 9);

        // A destination overlapping part of a donor: the rest stays donated
        // and fills another range; leftovers are given back by `discard`.
        // SAFETY: as above.
        unsafe {
            r.donate(page(&m, 100), page(&m, 140));
            r.fill(page(&m, 120), page(&m, 140));
            r.fill(page(&m, 150), page(&m, 160));
        }
        assert_eq!(r.moved, 42 * ALIGN as u64);
        assert_eq!(read(page(&m, 150)), 9);
        assert_eq!(read(page(&m, 125)), 9, "in place");
        r.discard();
        assert!(r.donors.is_empty());
        assert_eq!(read(page(&m, 100)), 0, "given back");
    }

    #[test]
    fn small_ranges_and_recycling_off_give_pages_back() {
        let m = Mapping::read_write(64 * ALIGN, true).unwrap();
        let mut r = Recycler::new(100, 16);
        write(page(&m, 0), 4 * ALIGN, 3);
        let mut off = Recycler::off();
        write(page(&m, 10), 32 * ALIGN, 3);
        // SAFETY: the test's arena; nothing else uses it.
        unsafe {
            r.donate(page(&m, 0), page(&m, 4));
            off.donate(page(&m, 10), page(&m, 42));
            r.fill(page(&m, 50), page(&m, 54));
        }
        assert_eq!(r.moved, 0);
        assert_eq!(read(page(&m, 0)), 0);
        assert_eq!(read(page(&m, 10)), 0);
        assert_eq!(read(page(&m, 41)), 0);
    }
}
