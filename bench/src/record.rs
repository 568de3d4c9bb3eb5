//! The result of one measurement.
//!
//! `wsbench` prints each [`Record`] as one JSON line on stdout (for the runner
//! and any other script) and one human-readable line on stderr. Metric names
//! carry their unit as a suffix (`_per_s`, `_us`, `_kib`), and every metric is
//! a plain number so the runner can take medians without knowing the mode.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// How many error messages a record keeps verbatim; the rest are only counted.
const MAX_ERROR_SAMPLES: usize = 5;

/// One measurement: the workload, its parameters, the figures and what went
/// wrong.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Record {
    /// Workload mode: `echo`, `connect`, `handshake` or `fanout`.
    pub mode: String,
    /// Free-form peer name given with `--label`, for the runner's tables.
    pub label: Option<String>,
    /// The WebSocket URL that was loaded.
    pub url: String,
    /// The server process whose CPU and memory were read, if one was given.
    pub server_pid: Option<u32>,
    /// Workload parameters as given on the command line.
    pub params: BTreeMap<String, Value>,
    /// Measured figures; see each workload's docs for the names.
    pub metrics: BTreeMap<String, f64>,
    /// Connection, protocol and timeout failures.
    pub errors: u64,
    /// Echoes (or broadcasts) whose bytes, type or order differed from what
    /// was sent. Any mismatch makes the record fail.
    pub mismatches: u64,
    /// The first few error messages, for the log.
    pub error_samples: Vec<String>,
}

impl Record {
    /// Starts a record for `mode` against `url`.
    pub fn new(mode: &str, url: &str) -> Record {
        Record {
            mode: mode.to_owned(),
            url: url.to_owned(),
            ..Record::default()
        }
    }

    /// Adds a parameter.
    pub fn param(&mut self, name: &str, value: impl Into<Value>) -> &mut Record {
        self.params.insert(name.to_owned(), value.into());
        self
    }

    /// Adds a metric.
    pub fn metric(&mut self, name: &str, value: f64) -> &mut Record {
        self.metrics.insert(name.to_owned(), value);
        self
    }

    /// Counts an error and keeps its message if there is room.
    pub fn error(&mut self, message: impl fmt::Display) {
        self.errors += 1;
        if self.error_samples.len() < MAX_ERROR_SAMPLES {
            self.error_samples.push(message.to_string());
        }
    }

    /// Merges counts and samples from a per-connection [`Failures`].
    pub fn absorb(&mut self, failures: Failures) {
        self.mismatches += failures.mismatches;
        self.errors += failures.errors;
        for sample in failures.samples {
            if self.error_samples.len() < MAX_ERROR_SAMPLES {
                self.error_samples.push(sample);
            }
        }
    }

    /// True when nothing went wrong.
    pub fn is_ok(&self) -> bool {
        self.errors == 0 && self.mismatches == 0
    }

    /// The JSON line.
    pub fn to_json_line(&self) -> String {
        serde_json::to_string(self).expect("a record always serializes")
    }

    /// Reads a metric, if present.
    pub fn get(&self, name: &str) -> Option<f64> {
        self.metrics.get(name).copied()
    }
}

impl fmt::Display for Record {
    /// The human line: mode, label, parameters, then metrics, then failures.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.mode)?;
        if let Some(label) = &self.label {
            write!(f, " [{label}]")?;
        }
        for (name, value) in &self.params {
            write!(f, " {name}={value}")?;
        }
        f.write_str(":")?;
        for (name, value) in &self.metrics {
            write!(f, " {name}={}", human_number(*value))?;
        }
        write!(
            f,
            " | mismatches={} errors={}",
            self.mismatches, self.errors
        )?;
        if let Some(first) = self.error_samples.first() {
            write!(f, " (first: {first})")?;
        }
        Ok(())
    }
}

/// Formats with three significant digits, without scientific notation.
pub fn human_number(value: f64) -> String {
    let magnitude = value.abs();
    if magnitude >= 100.0 || value == value.trunc() && magnitude < 1e15 {
        format!("{value:.0}")
    } else if magnitude >= 10.0 {
        format!("{value:.1}")
    } else if magnitude >= 1.0 {
        format!("{value:.2}")
    } else {
        format!("{value:.3}")
    }
}

/// Failures seen by one connection task, merged into the [`Record`] at the end.
#[derive(Debug, Default)]
pub struct Failures {
    /// See [`Record::mismatches`].
    pub mismatches: u64,
    /// See [`Record::errors`].
    pub errors: u64,
    /// The first few messages.
    pub samples: Vec<String>,
}

impl Failures {
    /// Counts an error.
    pub fn error(&mut self, message: impl fmt::Display) {
        self.errors += 1;
        self.keep(message);
    }

    /// Counts a mismatch.
    pub fn mismatch(&mut self, message: impl fmt::Display) {
        self.mismatches += 1;
        self.keep(message);
    }

    /// Adds another task's failures to these.
    pub fn merge(&mut self, other: Failures) {
        self.mismatches += other.mismatches;
        self.errors += other.errors;
        for sample in other.samples {
            if self.samples.len() < MAX_ERROR_SAMPLES {
                self.samples.push(sample);
            }
        }
    }

    fn keep(&mut self, message: impl fmt::Display) {
        if self.samples.len() < MAX_ERROR_SAMPLES {
            self.samples.push(message.to_string());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_line_round_trips() {
        let mut record = Record::new("echo", "ws://127.0.0.1:1/echo");
        record
            .param("connections", 100)
            .metric("msgs_per_s", 1234.5);
        record.error("boom");
        let line = record.to_json_line();
        assert!(!line.contains('\n'));
        let back: Record = serde_json::from_str(&line).unwrap();
        assert_eq!(back.get("msgs_per_s"), Some(1234.5));
        assert_eq!(back.errors, 1);
        assert!(!back.is_ok());
    }

    #[test]
    fn human_numbers_keep_three_digits() {
        assert_eq!(human_number(12345.678), "12346");
        assert_eq!(human_number(12.345), "12.3");
        assert_eq!(human_number(1.2345), "1.23");
        assert_eq!(human_number(0.12345), "0.123");
        assert_eq!(human_number(7.0), "7");
    }
}
