//! Opening files for direct (page-cache-bypassing) I/O, with the buffered fallback.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use super::{warn_once, IoError, Simulate, DIRECT_WARNED};

/// A file of a reader.
#[derive(Debug)]
pub(crate) struct OpenedFile {
    pub path: PathBuf,
    pub file: File,
    /// Page cache bypassed (O_DIRECT / F_NOCACHE). When false on Linux, reads are followed by
    /// `posix_fadvise(DONTNEED)`.
    pub direct: bool,
    pub len: u64,
}

impl OpenedFile {
    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

/// Opens `path` read-only, with O_DIRECT (Linux) / F_NOCACHE (macOS) when `direct`.
/// O_DIRECT refused (EINVAL at open or on a first aligned read) falls back to buffered reads
/// with a warning.
pub(crate) fn open_read(
    path: &Path,
    direct: bool,
    simulate: &Simulate,
    fallbacks: &mut Vec<String>,
) -> Result<OpenedFile, IoError> {
    let open_err = |source| IoError::Open {
        file: path.to_path_buf(),
        source,
    };
    let buffered = || OpenOptions::new().read(true).open(path);

    let (file, is_direct) = if !direct {
        (buffered().map_err(open_err)?, false)
    } else {
        match open_direct(path, simulate) {
            Ok(f) => (f, true),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                warn_once(
                    &DIRECT_WARNED,
                    fallbacks,
                    format!(
                        "O_DIRECT refused on {} ({e}); using buffered reads + fadvise(DONTNEED)",
                        path.display()
                    ),
                );
                (buffered().map_err(open_err)?, false)
            }
            Err(e) => return Err(open_err(e)),
        }
    };
    let len = file.metadata().map_err(open_err)?.len();
    Ok(OpenedFile {
        path: path.to_path_buf(),
        file,
        direct: is_direct,
        len,
    })
}

#[cfg(target_os = "linux")]
fn open_direct(path: &Path, simulate: &Simulate) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    if simulate.direct_refused {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)?;
    // Some filesystems accept O_DIRECT at open and refuse the reads; find out now.
    if f.metadata()?.len() > 0 {
        let mut probe = super::AlignedBuf::new(super::ALIGN)?;
        loop {
            // SAFETY: `probe` is an owned, 4096-aligned buffer of ALIGN bytes.
            let n =
                unsafe { libc::pread(f.as_raw_fd(), probe.as_mut_ptr().cast(), super::ALIGN, 0) };
            if n >= 0 {
                break;
            }
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::EINTR) {
                return Err(e);
            }
        }
    }
    Ok(f)
}

#[cfg(not(target_os = "linux"))]
fn open_direct(path: &Path, simulate: &Simulate) -> std::io::Result<File> {
    if simulate.direct_refused {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let f = OpenOptions::new().read(true).open(path)?;
    set_nocache(&f)?;
    Ok(f)
}

#[cfg(target_os = "macos")]
fn set_nocache(f: &File) -> std::io::Result<()> {
    // SAFETY: fcntl on an fd we own, with an integer argument.
    let r = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_NOCACHE, 1) };
    if r == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(not(any(target_os = "linux", target_os = "macos")))]
fn set_nocache(_f: &File) -> std::io::Result<()> {
    Err(std::io::Error::from_raw_os_error(libc::EINVAL))
}

/// Drops `[offset, offset + len)` of `file` from the page cache (`posix_fadvise(DONTNEED)`).
/// A no-op where the call does not exist (macOS uses F_NOCACHE instead).
pub fn drop_cache(file: &File, offset: u64, len: u64) {
    drop_cache_fd(file.as_raw_fd(), offset, len);
}

pub(crate) fn drop_cache_fd(fd: RawFd, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use nix::fcntl::{posix_fadvise, PosixFadviseAdvice};
        let _ = posix_fadvise(
            fd,
            offset as libc::off_t,
            len as libc::off_t,
            PosixFadviseAdvice::POSIX_FADV_DONTNEED,
        );
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (fd, offset, len);
    }
}

/// Creates (truncating) `path` for writing that bypasses the page cache where the filesystem
/// allows it (O_DIRECT / F_NOCACHE). Returns the file and whether the bypass is in effect;
/// with O_DIRECT, writes must be 4096-aligned in offset, length and memory.
pub fn open_for_write_nocache(path: &Path) -> std::io::Result<(File, bool)> {
    let mut oo = OpenOptions::new();
    oo.write(true).create(true).truncate(true);
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut direct = oo.clone();
        direct.custom_flags(libc::O_DIRECT);
        match direct.open(path) {
            Ok(f) => return Ok((f, true)),
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {}
            Err(e) => return Err(e),
        }
        Ok((oo.open(path)?, false))
    }
    #[cfg(not(target_os = "linux"))]
    {
        let f = oo.open(path)?;
        let ok = set_nocache(&f).is_ok();
        Ok((f, ok))
    }
}
