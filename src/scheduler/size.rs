//! Byte sizes with K/M/G/T suffixes (binary: `96M` = 96 MiB).

use anyhow::{bail, Result};

/// Parses `4G`, `96M`, `512K`, `1.5G`, `123` (bytes), `2GiB`, `2GB` (all binary).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let lower = t.to_ascii_lowercase();
    let body = lower.trim_end_matches("ib").trim_end_matches('b');
    let (num, mult) = match body.chars().last() {
        Some('k') => (&body[..body.len() - 1], 1u64 << 10),
        Some('m') => (&body[..body.len() - 1], 1u64 << 20),
        Some('g') => (&body[..body.len() - 1], 1u64 << 30),
        Some('t') => (&body[..body.len() - 1], 1u64 << 40),
        _ => (body, 1),
    };
    let v: f64 = match num.trim().parse() {
        Ok(v) => v,
        Err(_) => bail!("'{s}' is not a size (examples: 96M, 4G, 1.5G, 123456)"),
    };
    if !v.is_finite() || v < 0.0 {
        bail!("'{s}' is not a size (it must be a positive number)");
    }
    let bytes = v * mult as f64;
    if bytes > u64::MAX as f64 / 2.0 {
        bail!("'{s}' is too large");
    }
    Ok(bytes as u64)
}

/// [`parse_size`] as a clap `value_parser`.
pub fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("96M").unwrap(), 96 << 20);
        assert_eq!(parse_size("4G").unwrap(), 4 << 30);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1.5k").unwrap(), 1536);
        assert_eq!(parse_size("123").unwrap(), 123);
        assert!(parse_size("-1G").is_err());
        assert!(parse_size("lots").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(format_bytes(1536), "1.5 KiB");
    }
}
