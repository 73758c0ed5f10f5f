//! Pool memory: the anonymous mappings the engine owns (dense host slots, the
//! expert arena, the PROT_NONE guard), the host slots' two kinds (a mapping,
//! or pinned memory of the GPU's backend), and the expert arena's layout.

use std::ffi::c_void;
use std::ptr::NonNull;

use anyhow::{Context as _, Result};
use nix::sys::mman::ProtFlags;

use crate::engine::device::Buffer;
use crate::io::{slot_len_for, slot_offset_for, ALIGN};

/// Anonymous memory owned by the engine (pool, arena or guard), unmapped on drop.
pub(super) struct Mapping {
    ptr: NonNull<c_void>,
    len: usize,
}

impl Mapping {
    /// `len` bytes (rounded up to whole pages, at least one), zeroed.
    /// `noreserve`: address space only, pages are committed when written.
    pub fn new(len: usize, prot: ProtFlags, noreserve: bool) -> Result<Mapping> {
        use nix::sys::mman::{mmap_anonymous, MapFlags};
        let len = len.max(ALIGN).next_multiple_of(ALIGN);
        let mut flags = MapFlags::MAP_PRIVATE;
        if noreserve {
            flags |= MapFlags::MAP_NORESERVE;
        }
        let nz = std::num::NonZeroUsize::new(len).context("empty mapping")?;
        // SAFETY: a fresh anonymous private mapping at an address of the kernel's
        // choosing; it overlaps nothing and nothing else refers to it.
        let ptr = unsafe { mmap_anonymous(None, nz, prot, flags) }
            .with_context(|| format!("cannot map {len} bytes for the streaming pool"))?;
        Ok(Mapping { ptr, len })
    }

    /// Readable and writable memory.
    pub fn read_write(len: usize, noreserve: bool) -> Result<Mapping> {
        Mapping::new(len, ProtFlags::PROT_READ | ProtFlags::PROT_WRITE, noreserve)
    }

    /// Where released dense tensors point: `len` bytes of PROT_NONE address
    /// space, so that a compute that missed its wait faults instead of reading
    /// another layer's weights.
    pub fn guard(len: usize) -> Result<Mapping> {
        Mapping::new(len, ProtFlags::PROT_NONE, true)
    }

    pub fn base(&self) -> *mut u8 {
        self.ptr.as_ptr().cast()
    }

    /// Gives the pages back to the kernel: they read as zeros again and hold
    /// no memory until written. Call it while no read targets the mapping.
    pub fn discard(&self) {
        use nix::sys::mman::{madvise, MmapAdvise};
        // SAFETY: the whole mapping is ours; a private anonymous mapping
        // reads as zeros after MADV_DONTNEED, which is what its users expect
        // of pages they have not filled (nothing else points into it).
        unsafe {
            let _ = madvise(self.ptr, self.len, MmapAdvise::MADV_DONTNEED);
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: the mapping is ours (made in `new`, unmapped only here). No read
        // targets it any more and no tensor computes on it: the engine drops its
        // reader (which waits for reads in flight) and its device pool (which
        // joins the uploader thread and frees buffers wrapping this memory)
        // before its memory, and it puts the model's tensors back on their own
        // buffer first (see `Engine`'s drop in the module root).
        unsafe {
            let _ = nix::sys::mman::munmap(self.ptr, self.len);
        }
    }
}

/// The dense host slots (reads land here): a mapping, or pinned memory of the
/// GPU's backend when staging to a device that has it.
pub(super) enum HostMem {
    Mapped(Mapping),
    Pinned(Buffer),
}

impl HostMem {
    /// Start of the slots (aligned to [`ALIGN`]).
    pub fn base(&self) -> *mut u8 {
        match self {
            HostMem::Mapped(m) => m.base(),
            HostMem::Pinned(b) => b.aligned_base(ALIGN),
        }
    }
}

/// Where each expert tensor goes in the expert arena: memory and file offsets
/// agree mod 4096 (so an aligned read lands in place), and each tensor's aligned
/// read range is followed by a spare page (no two tensors share a page).
/// Returns the start of each tensor's bytes and the arena's length.
pub(super) fn arena_layout(tensors: impl Iterator<Item = (u64, usize)>) -> (Vec<usize>, usize) {
    let mut starts = Vec::new();
    let mut cursor = 0usize;
    for (file_offset, size) in tensors {
        starts.push(cursor + slot_offset_for(file_offset));
        cursor += slot_len_for(file_offset, size) + ALIGN;
    }
    (starts, cursor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mappings_are_whole_zeroed_pages() {
        let m = Mapping::read_write(10, false).unwrap();
        assert_eq!(m.len(), ALIGN);
        assert_eq!(m.base() as usize % ALIGN, 0);
        // SAFETY: the mapping is readable for `len` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(m.base(), m.len()) };
        assert!(bytes.iter().all(|&b| b == 0));
        assert_eq!(Mapping::guard(3 * ALIGN + 1).unwrap().len(), 4 * ALIGN);
    }

    #[test]
    fn arena_places_tensors_like_the_file_without_overlap() {
        let tensors = [(4096 * 3 + 32, 10_000usize), (50_000, 1), (8192, 4096)];
        let (starts, len) = arena_layout(tensors.iter().copied());
        assert_eq!(starts.len(), 3);
        let mut prev_end = 0;
        for (&(off, size), &start) in tensors.iter().zip(&starts) {
            assert_eq!(
                start % ALIGN,
                off as usize % ALIGN,
                "memory ≡ file mod 4096"
            );
            // The aligned read range lies after the previous tensor's, a page apart.
            let read_start = start - slot_offset_for(off);
            assert!(read_start >= prev_end + ALIGN || prev_end == 0);
            prev_end = read_start + slot_len_for(off, size);
        }
        assert_eq!(len, prev_end + ALIGN);
    }
}
