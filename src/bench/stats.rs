//! Medians and spreads over repeated runs.

use serde::Serialize;

/// Median, smallest and largest of a set of measurements.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct Spread {
    pub median: f64,
    pub min: f64,
    pub max: f64,
    /// How many values.
    pub n: usize,
}

impl Spread {
    /// `None` for no (finite) values.
    pub fn of(values: &[f64]) -> Option<Spread> {
        let mut v: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        Some(Spread {
            median: crate::util::median_sorted(&v),
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }

    /// Largest relative distance of min or max from the median (0 for one value).
    pub fn rel_spread(&self) -> f64 {
        if self.median == 0.0 {
            return 0.0;
        }
        ((self.max - self.median).max(self.median - self.min) / self.median).abs()
    }
}

/// The median of finite values, `None` when there are none.
pub fn median(values: &[f64]) -> Option<f64> {
    Spread::of(values).map(|s| s.median)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = Spread::of(&[3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.median, s.min, s.max, s.n), (2.0, 1.0, 3.0, 3));
        let s = Spread::of(&[4.0, 1.0, 2.0, 3.0]).unwrap();
        assert_eq!(s.median, 2.5);
        assert_eq!(Spread::of(&[]), None);
        assert_eq!(Spread::of(&[f64::NAN]), None);
        assert_eq!(median(&[5.0, f64::INFINITY, 1.0]), Some(3.0));
        assert!((Spread::of(&[9.0, 10.0, 12.0]).unwrap().rel_spread() - 0.2).abs() < 1e-12);
    }
}
