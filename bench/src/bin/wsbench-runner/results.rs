//! Results of a run: every record, grouped by workload and peer, and the
//! median/spread summaries the report and the chart are made of.

use std::collections::BTreeMap;

use bench::Record;

use crate::peers::PeerKind;

/// Median and range of one metric over the rounds that succeeded.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stat {
    /// Median over rounds.
    pub median: f64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Number of rounds that contributed.
    pub rounds: usize,
}

impl Stat {
    /// Summarizes values; `None` when there are none.
    pub fn of(mut values: Vec<f64>) -> Option<Stat> {
        values.retain(|v| v.is_finite());
        if values.is_empty() {
            return None;
        }
        values.sort_by(f64::total_cmp);
        let n = values.len();
        let median = if n % 2 == 1 {
            values[n / 2]
        } else {
            (values[n / 2 - 1] + values[n / 2]) / 2.0
        };
        Some(Stat {
            median,
            min: values[0],
            max: values[n - 1],
            rounds: n,
        })
    }

    /// (max − min) ÷ median, as a fraction.
    pub fn spread(&self) -> f64 {
        if self.median == 0.0 {
            0.0
        } else {
            (self.max - self.min) / self.median.abs()
        }
    }
}

/// Every record of a run.
#[derive(Debug, Default)]
pub struct Results {
    cells: BTreeMap<(String, &'static str), Vec<Record>>,
}

impl Results {
    /// Adds one round's record.
    pub fn push(&mut self, workload: &str, peer: PeerKind, record: Record) {
        self.cells
            .entry((workload.to_owned(), peer.key()))
            .or_default()
            .push(record);
    }

    /// All records for a workload and peer, in round order.
    pub fn records(&self, workload: &str, peer: PeerKind) -> &[Record] {
        self.cells
            .get(&(workload.to_owned(), peer.key()))
            .map_or(&[], Vec::as_slice)
    }

    /// The metric over the rounds that succeeded.
    pub fn stat(&self, workload: &str, peer: PeerKind, metric: &str) -> Option<Stat> {
        Stat::of(
            self.records(workload, peer)
                .iter()
                .filter(|r| r.is_ok())
                .filter_map(|r| r.get(metric))
                .collect(),
        )
    }

    /// Median of the metric, if any round succeeded.
    pub fn median(&self, workload: &str, peer: PeerKind, metric: &str) -> Option<f64> {
        self.stat(workload, peer, metric).map(|s| s.median)
    }

    /// (failed rounds, all rounds) for a workload and peer.
    pub fn failures(&self, workload: &str, peer: PeerKind) -> (usize, usize) {
        let records = self.records(workload, peer);
        (records.iter().filter(|r| !r.is_ok()).count(), records.len())
    }

    /// Every record that failed, for the summary and the exit code.
    pub fn failed(&self) -> impl Iterator<Item = (&str, &str, &Record)> {
        self.cells.iter().flat_map(|((workload, peer), records)| {
            records
                .iter()
                .filter(|r| !r.is_ok())
                .map(move |r| (workload.as_str(), *peer, r))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_spread() {
        let stat = Stat::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!(stat.median, 2.0);
        assert_eq!(stat.spread(), 1.0);
        assert_eq!(Stat::of(vec![1.0, 4.0]).unwrap().median, 2.5);
        assert_eq!(Stat::of(vec![]), None);
    }

    #[test]
    fn failed_rounds_do_not_count_toward_medians() {
        let mut results = Results::default();
        let mut good = Record::new("echo", "ws://127.0.0.1:1/echo");
        good.metric("cpu_us_per_msg", 10.0);
        let mut bad = good.clone();
        bad.metric("cpu_us_per_msg", 1000.0).mismatches = 1;
        results.push("echo-32-c1", PeerKind::Raw, good);
        results.push("echo-32-c1", PeerKind::Raw, bad);
        assert_eq!(
            results.median("echo-32-c1", PeerKind::Raw, "cpu_us_per_msg"),
            Some(10.0)
        );
        assert_eq!(results.failures("echo-32-c1", PeerKind::Raw), (1, 2));
        assert_eq!(results.failed().count(), 1);
    }
}
