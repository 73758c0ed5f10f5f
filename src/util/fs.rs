//! Where Hypura keeps its files (the XDG base directories) and how it
//! replaces them (write a temporary file, then rename it over the old one,
//! so a reader never sees half a file).

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};

/// `$<var>/hypura` when `var` (e.g. `XDG_CACHE_HOME`) holds an absolute path
/// (relative ones are ignored, as the XDG spec says), else
/// `$HOME/<home_default>/hypura` (e.g. `.cache`); `None` without either.
pub fn xdg_dir(var: &str, home_default: &str) -> Option<PathBuf> {
    let base = match std::env::var_os(var) {
        Some(d) if Path::new(&d).is_absolute() => PathBuf::from(d),
        _ => PathBuf::from(std::env::var_os("HOME").filter(|h| !h.is_empty())?).join(home_default),
    };
    Some(base.join("hypura"))
}

/// `$XDG_CACHE_HOME/hypura`, else `~/.cache/hypura`.
pub fn cache_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CACHE_HOME", ".cache")
}

/// `$XDG_CONFIG_HOME/hypura`, else `~/.config/hypura`.
pub fn config_dir() -> Option<PathBuf> {
    xdg_dir("XDG_CONFIG_HOME", ".config")
}

/// Writes `contents` to `path` atomically: the directory is created if need
/// be, the bytes go to `.<name>.<pid>.tmp` beside it, which is then renamed
/// over `path` (and removed if that fails).
pub fn write_atomic(path: &Path, contents: impl AsRef<[u8]>) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .with_context(|| format!("{}: not a file name", path.display()))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        name.to_string_lossy(),
        std::process::id()
    ));
    std::fs::write(&tmp, contents).with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write {}", path.display())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/f.toml");
        write_atomic(&path, "one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "two");
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["f.toml"]);
        // A directory in the way: the rename fails and the temporary goes.
        let blocked = dir.path().join("d");
        std::fs::create_dir_all(blocked.join("x")).unwrap();
        assert!(write_atomic(&blocked, "x").is_err());
        assert!(!dir
            .path()
            .join(format!(".d.{}.tmp", std::process::id()))
            .exists());
    }
}
