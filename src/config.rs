//! The user's settings file: `$XDG_CONFIG_HOME/hypura/config.toml` (or
//! `~/.config/hypura/config.toml`).
//!
//! It holds what `hypura bench --save` learned, per machine and model:
//!
//! ```toml
//! [machines.7627181f94226b3f.models."/models/qwen3-30b-a3b.gguf"]
//! size_bytes = 17456012416
//! lookahead = 2
//! saved_at_unix = 1763762400
//! ```
//!
//! The machine is [`crate::profiler::machine_key`]; the model is its canonical
//! path, and an entry only applies while the file still has the recorded size
//! (a model replaced by another at the same path is a different model). Keys
//! this module does not know are kept when it rewrites the file.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use toml::{Table, Value};

/// `$XDG_CONFIG_HOME/hypura` (absolute paths only, as the XDG spec says), else `~/.config/hypura`.
pub use crate::util::fs::config_dir;

/// The settings file (it may not exist).
pub fn config_file() -> Option<PathBuf> {
    Some(config_dir()?.join("config.toml"))
}

/// The model's identity: canonical path and size.
fn model_identity(model: &Path) -> Result<(String, u64)> {
    let canon = std::fs::canonicalize(model)
        .with_context(|| format!("{}: cannot resolve the path", model.display()))?;
    let size = std::fs::metadata(&canon)
        .with_context(|| format!("{}: cannot read its size", canon.display()))?
        .len();
    Ok((canon.to_string_lossy().into_owned(), size))
}

fn read_table(path: &Path) -> Result<Table> {
    match std::fs::read_to_string(path) {
        Ok(text) => text
            .parse::<Table>()
            .with_context(|| format!("{}: not valid TOML", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Table::new()),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// The lookahead `hypura bench --save` stored for this model on this machine,
/// if any (and if the model file still has the size it had then).
pub fn saved_lookahead(model: &Path) -> Option<usize> {
    let path = config_file()?;
    let table = match read_table(&path) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!("ignoring the settings file: {e:#}");
            return None;
        }
    };
    let (key, size) = model_identity(model).ok()?;
    lookup(&table, &crate::profiler::machine_key(), &key, size)
}

fn lookup(table: &Table, machine: &str, model: &str, size: u64) -> Option<usize> {
    let entry = table
        .get("machines")?
        .get(machine)?
        .get("models")?
        .get(model)?;
    if entry.get("size_bytes")?.as_integer()? != size as i64 {
        return None;
    }
    usize::try_from(entry.get("lookahead")?.as_integer()?).ok()
}

/// Stores `lookahead` for this model on this machine; returns the file written.
pub fn save_lookahead(model: &Path, lookahead: usize) -> Result<PathBuf> {
    let path = config_file().context("no settings directory ($XDG_CONFIG_HOME and $HOME unset)")?;
    let (key, size) = model_identity(model)?;
    let mut table = read_table(&path)?;
    store(
        &mut table,
        &crate::profiler::machine_key(),
        &key,
        size,
        lookahead,
    )?;
    let text = toml::to_string_pretty(&table).context("serialising the settings")?;
    // Write then rename, so a reader never sees half a file.
    crate::util::fs::write_atomic(&path, text)?;
    Ok(path)
}

fn store(table: &mut Table, machine: &str, model: &str, size: u64, lookahead: usize) -> Result<()> {
    fn sub<'a>(t: &'a mut Table, key: &str) -> Result<&'a mut Table> {
        let v = t
            .entry(key.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        match v {
            Value::Table(t) => Ok(t),
            _ => bail!("the settings file has '{key}' that is not a table"),
        }
    }
    let models = sub(sub(sub(table, "machines")?, machine)?, "models")?;
    let mut entry = Table::new();
    entry.insert(
        "size_bytes".into(),
        Value::Integer(i64::try_from(size).context("model too large")?),
    );
    entry.insert(
        "lookahead".into(),
        Value::Integer(i64::try_from(lookahead).context("lookahead too large")?),
    );
    let now = crate::util::unix_secs();
    entry.insert("saved_at_unix".into(), Value::Integer(now as i64));
    models.insert(model.to_string(), Value::Table(entry));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_then_lookup_round_trips_and_keeps_other_keys() {
        let mut t: Table = "[other]\nx = 1\n".parse().unwrap();
        store(&mut t, "m1", "/a/b.gguf", 100, 3).unwrap();
        store(&mut t, "m1", "/a/c.gguf", 7, 0).unwrap();
        let text = toml::to_string_pretty(&t).unwrap();
        let back: Table = text.parse().unwrap();
        assert_eq!(lookup(&back, "m1", "/a/b.gguf", 100), Some(3));
        assert_eq!(lookup(&back, "m1", "/a/c.gguf", 7), Some(0));
        // Another size is another model; another machine has its own settings.
        assert_eq!(lookup(&back, "m1", "/a/b.gguf", 101), None);
        assert_eq!(lookup(&back, "m2", "/a/b.gguf", 100), None);
        assert_eq!(back["other"]["x"].as_integer(), Some(1));
        // Saving again replaces the entry.
        let mut t = back;
        store(&mut t, "m1", "/a/b.gguf", 100, 5).unwrap();
        assert_eq!(lookup(&t, "m1", "/a/b.gguf", 100), Some(5));
    }

    #[test]
    fn a_non_table_where_a_table_belongs_is_an_error() {
        let mut t: Table = "machines = 3\n".parse().unwrap();
        assert!(store(&mut t, "m", "/x", 1, 1).is_err());
    }
}
