//! Small helpers shared across layers. The bottom layer: nothing here
//! imports from the rest of the crate.
//!
//! - [`rng`]: the crate's PRNG (splitmix64 seeding xoshiro256**).
//! - [`fs`]: the XDG cache and config directories, atomic file writes.
//! - [`median_sorted`], [`unix_secs`].

pub mod fs;
pub mod rng;

/// The median of values sorted in ascending order; 0 for none.
pub fn median_sorted(v: &[f64]) -> f64 {
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median_sorted(&[]), 0.0);
        assert_eq!(median_sorted(&[1.0, 2.0, 3.0]), 2.0);
        assert_eq!(median_sorted(&[1.0, 2.0, 3.0, 4.0]), 2.5);
    }
}
