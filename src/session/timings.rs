//! Where a run's wall time and memory go, phase by phase (load, preflight, data, the passes,
//! save, validation, gate), for the report's `timings` table and `--timings`.
//!
//! Each [`Phases::mark`] closes the phase that ran since the previous mark: its wall seconds
//! and the process's peak resident memory when it ended (Linux `VmHWM`, the high-water mark,
//! so a phase's figure is the peak of everything up to it; the phase that raised it is the
//! first whose figure jumps).

use serde::Serialize;
use std::time::Instant;

/// One closed phase.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    pub name: String,
    pub seconds: f64,
    /// Peak resident bytes of the process so far (absent where the OS does not say).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peak_rss_bytes: Option<u64>,
}

/// A stopwatch over consecutive phases.
#[derive(Debug)]
pub struct Phases {
    last: Instant,
    pub done: Vec<Phase>,
}

impl Phases {
    pub fn start() -> Self {
        Phases {
            last: Instant::now(),
            done: Vec::new(),
        }
    }

    /// Close the phase running since the last mark under `name`.
    pub fn mark(&mut self, name: &str) {
        let now = Instant::now();
        self.done.push(Phase {
            name: name.to_string(),
            seconds: (now - self.last).as_secs_f64(),
            peak_rss_bytes: peak_rss_bytes(),
        });
        self.last = now;
    }
}

/// The process's peak resident set size (`VmHWM` of /proc/self/status), Linux only.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}
