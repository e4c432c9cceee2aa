//! The server's own cost, read from `/proc/PID/status` (resident memory) and
//! `/proc/PID/stat` (CPU time), so a run can report RSS and CPU per delivery.

use std::io;

/// Linux reports CPU time in clock ticks of 1/100 s (`USER_HZ`) on every
/// mainstream architecture.
const TICKS_PER_SECOND: u64 = 100;

/// One reading of a process.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Sample {
    /// Resident set size, KiB.
    pub rss_kib: u64,
    /// User plus system CPU time, milliseconds.
    pub cpu_ms: u64,
    /// Of it, user-space time (the rest is the kernel's, mostly `send`).
    pub user_ms: u64,
}

impl Sample {
    /// Reads process `pid`.
    pub fn read(pid: u32) -> io::Result<Sample> {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
        parse(&status, &stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc format"))
    }

    /// Reads every process in `pids` and adds them up (a cluster's instances).
    pub fn read_all(pids: &[u32]) -> io::Result<Sample> {
        let mut total = Sample::default();
        for &pid in pids {
            let s = Sample::read(pid)?;
            total.rss_kib += s.rss_kib;
            total.cpu_ms += s.cpu_ms;
            total.user_ms += s.user_ms;
        }
        Ok(total)
    }
}

fn parse(status: &str, stat: &str) -> Option<Sample> {
    let rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    // The command name (field 2) may contain spaces; fields after its `)` are plain.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line, 11 and 12 after `)`.
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(Sample {
        rss_kib,
        cpu_ms: (utime + stime) * 1000 / TICKS_PER_SECOND,
        user_ms: utime * 1000 / TICKS_PER_SECOND,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_rss_and_cpu_even_with_spaces_in_the_name() {
        let status = "Name:\tbaby-discord\nVmRSS:\t   12345 kB\nThreads:\t3\n";
        let stat = "42 (baby discord) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0";
        assert_eq!(
            parse(status, stat),
            Some(Sample {
                rss_kib: 12345,
                cpu_ms: 3000,
                user_ms: 2500,
            })
        );
    }

    #[test]
    fn reads_this_process() {
        let me = Sample::read(std::process::id()).expect("own /proc entry");
        assert!(me.rss_kib > 0);
    }
}
