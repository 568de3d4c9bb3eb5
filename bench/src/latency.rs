//! Latency histogram in microseconds.
//!
//! A thin wrapper over `hdrhistogram` with three significant digits and a
//! range from 1 µs to one minute, so per-connection histograms can be merged
//! without resizing.

use std::time::Duration;

use hdrhistogram::Histogram;

/// Highest latency recorded exactly; longer ones are clamped to it.
const MAX_MICROS: u64 = 60_000_000;

/// A latency histogram, one per connection task, merged at the end.
#[derive(Debug, Clone)]
pub struct Latency {
    histogram: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Latency {
            histogram: Histogram::new_with_bounds(1, MAX_MICROS, 3)
                .expect("static histogram bounds are valid"),
        }
    }
}

impl Latency {
    /// Records one latency.
    pub fn record(&mut self, latency: Duration) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(MAX_MICROS);
        self.histogram
            .saturating_record(micros.clamp(1, MAX_MICROS));
    }

    /// Adds another histogram's samples to this one.
    pub fn merge(&mut self, other: &Latency) {
        self.histogram
            .add(&other.histogram)
            .expect("histograms share bounds");
    }

    /// Number of samples.
    pub fn len(&self) -> u64 {
        self.histogram.len()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.histogram.is_empty()
    }

    /// The value at `quantile` (0.0..=1.0), in µs.
    pub fn quantile_us(&self, quantile: f64) -> f64 {
        self.histogram.value_at_quantile(quantile) as f64
    }

    /// The largest value, in µs.
    pub fn max_us(&self) -> f64 {
        self.histogram.max() as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_quantiles_cover_both_sides() {
        let mut a = Latency::default();
        let mut b = Latency::default();
        for micros in 1..=99 {
            a.record(Duration::from_micros(micros));
        }
        b.record(Duration::from_millis(10));
        a.merge(&b);
        assert_eq!(a.len(), 100);
        assert!((a.quantile_us(0.5) - 50.0).abs() <= 1.0);
        assert!((a.max_us() - 10_000.0).abs() <= 10.0);
    }
}
