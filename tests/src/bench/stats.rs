//! The bench's statistics: medians and percentiles, the percentile bootstrap
//! behind every interval, and the seeded generator (SplitMix64) that orders
//! the rounds and drives the bootstrap.

/// A seed from the clock, for runs not given one.
#[must_use]
pub fn clock_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| {
            #[allow(clippy::cast_possible_truncation, reason = "any 64 bits will do")]
            let ns = d.as_nanos() as u64;
            ns
        })
}

/// SplitMix64: a small seeded generator for the round order and the
/// bootstrap (reproducible from the printed seed, no dependency).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    #[must_use]
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0; the modulo bias is below 2^-50 here).
    pub fn below(&mut self, n: usize) -> usize {
        #[allow(clippy::cast_possible_truncation, reason = "the result is below n")]
        let i = (self.next_u64() % n as u64) as usize;
        i
    }

    /// Fisher-Yates.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i + 1);
            v.swap(i, j);
        }
    }
}

/// The median of `values` (NaN when empty).
pub(super) fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        f64::NAN
    } else if sorted.len() % 2 == 1 {
        sorted[sorted.len() / 2]
    } else {
        f64::midpoint(sorted[sorted.len() / 2 - 1], sorted[sorted.len() / 2])
    }
}

pub(super) fn percentile(values: &[f64], p: f64) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss,
        reason = "index into a short list"
    )]
    let i = ((v.len() - 1) as f64 * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// Bootstrap resamples behind every target's interval.
pub const BOOTSTRAP_RESAMPLES: usize = 10_000;
/// The bootstrap's seed: fixed, so the same raw figures always give the same
/// intervals (the report can be recomputed from the JSON).
pub const BOOTSTRAP_SEED: u64 = 0x706f_646e_6574;

/// Percentile bootstrap 95 % confidence interval of the median of `sample`:
/// `resamples` resamples with replacement, the 2.5th and 97.5th percentiles
/// of their medians.
#[must_use]
pub fn bootstrap_median_ci(sample: &[f64], resamples: usize, rng: &mut Rng) -> (f64, f64) {
    if sample.is_empty() || resamples == 0 {
        return (f64::NAN, f64::NAN);
    }
    let mut buf = vec![0.0; sample.len()];
    let mut medians: Vec<f64> = (0..resamples)
        .map(|_| {
            for x in &mut buf {
                *x = sample[rng.below(sample.len())];
            }
            median(&buf)
        })
        .collect();
    medians.sort_by(f64::total_cmp);
    (percentile(&medians, 0.025), percentile(&medians, 0.975))
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::*;

    #[test]
    fn a_seed_replays_the_same_orders_each_a_permutation_and_they_vary() {
        let orders = |seed| {
            let mut rng = Rng::new(seed);
            (0..10)
                .map(|_| {
                    let mut o: Vec<usize> = (0..5).collect();
                    rng.shuffle(&mut o);
                    o
                })
                .collect::<Vec<_>>()
        };
        let a = orders(42);
        assert_eq!(a, orders(42), "replayable");
        for o in &a {
            let mut sorted = o.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, vec![0, 1, 2, 3, 4], "{o:?} is a permutation");
        }
        let firsts: BTreeSet<usize> = a.iter().map(|o| o[0]).collect();
        assert!(firsts.len() > 1, "not always the same one first: {a:?}");
        assert_ne!(a, orders(43));
    }

    #[test]
    fn the_bootstrap_interval_of_a_known_sample() {
        // No spread: the interval is the point.
        let mut rng = Rng::new(1);
        assert_eq!(bootstrap_median_ci(&[1.2; 10], 1_000, &mut rng), (1.2, 1.2));
        // 1..=10 (median 5.5): resampled medians of 10 draws stay well
        // inside the extremes and around the median; seeded, so replayable.
        let sample: Vec<f64> = (1..=10).map(f64::from).collect();
        let (lo, hi) = bootstrap_median_ci(&sample, 10_000, &mut Rng::new(7));
        assert!((2.5..=4.5).contains(&lo), "lo {lo}");
        assert!((6.5..=8.5).contains(&hi), "hi {hi}");
        assert_eq!(
            (lo, hi),
            bootstrap_median_ci(&sample, 10_000, &mut Rng::new(7))
        );
        assert!(bootstrap_median_ci(&[], 10, &mut rng).0.is_nan());
    }

    #[test]
    #[allow(
        clippy::float_cmp,
        reason = "exact: elements of the list, or the midpoint of two small integers"
    )]
    fn median_and_percentile_of_short_lists() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5, "even: the midpoint");
        assert!(median(&[]).is_nan());
        let v = [5.0, 1.0, 4.0, 2.0, 3.0];
        assert_eq!(percentile(&v, 0.0), 1.0);
        assert_eq!(percentile(&v, 0.5), 3.0);
        assert_eq!(percentile(&v, 1.0), 5.0);
        assert_eq!(percentile(&v, 0.99), 5.0, "nearest rank");
        assert!(percentile(&[], 0.5).is_nan());
    }
}
