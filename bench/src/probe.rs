//! Reading a server's CPU time and memory from `/proc`.
//!
//! CPU time is `utime + stime` (fields 14 and 15 of `/proc/PID/stat`), which
//! the kernel keeps for the whole process, including threads that have already
//! exited; that matters for thread-per-connection peers. The fields are in
//! clock ticks; the tick rate comes from `sysconf(_SC_CLK_TCK)` (100 on Linux).
//! Memory is `VmRSS` from `/proc/PID/status`.

use std::fs;
use std::io;
use std::time::Duration;

/// A handle on the server process being measured.
#[derive(Debug, Clone, Copy)]
pub struct Probe {
    /// Process id of the server.
    pub pid: u32,
    /// Clock ticks per second for the `stat` CPU fields.
    ticks_per_second: u64,
}

/// One reading of a server's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sample {
    /// User plus system CPU time, in clock ticks.
    pub cpu_ticks: u64,
    /// Resident set size, in KiB.
    pub rss_kib: u64,
}

impl Probe {
    /// Creates a probe for `pid`, failing when the process cannot be read.
    pub fn new(pid: u32) -> io::Result<Probe> {
        let probe = Probe {
            pid,
            ticks_per_second: rustix::param::clock_ticks_per_second().max(1),
        };
        probe.sample()?;
        Ok(probe)
    }

    /// Reads the current CPU time and RSS.
    pub fn sample(&self) -> io::Result<Sample> {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.pid))?;
        let status = fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        Ok(Sample {
            cpu_ticks: parse_cpu_ticks(&stat).ok_or_else(|| bad_data("stat"))?,
            rss_kib: parse_rss_kib(&status).ok_or_else(|| bad_data("status"))?,
        })
    }

    /// CPU time spent between two samples.
    pub fn cpu_between(&self, before: Sample, after: Sample) -> Duration {
        let ticks = after.cpu_ticks.saturating_sub(before.cpu_ticks);
        Duration::from_secs_f64(ticks as f64 / self.ticks_per_second as f64)
    }
}

fn bad_data(file: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("unexpected /proc {file} format"),
    )
}

/// Parses `utime + stime` out of a `/proc/PID/stat` line. The command name
/// (field 2) may contain spaces and parentheses, so fields are counted from
/// the last `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace();
    // After the name come field 3 (state) onwards; utime is field 14.
    let utime: u64 = fields.nth(14 - 3)?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_ticks_skip_a_command_name_with_spaces_and_parens() {
        let stat = "42 (a (b) c) S 1 42 42 0 -1 4194560 100 0 0 0 7 5 0 0 20 0 3 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(12));
    }

    #[test]
    fn rss_is_read_in_kib() {
        let status = "Name:\tx\nVmPeak:\t 10 kB\nVmRSS:\t    2048 kB\nThreads:\t1\n";
        assert_eq!(parse_rss_kib(status), Some(2048));
    }

    #[test]
    fn own_process_can_be_probed() {
        let probe = Probe::new(std::process::id()).unwrap();
        assert!(probe.sample().unwrap().rss_kib > 0);
    }
}
