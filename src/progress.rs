//! Progress on stderr for long stages (calibration batches, validation batches, per-layer
//! blame runs) and the command line's verbosity.
//!
//! A process-wide switch, off by default: the library stays silent unless the command line
//! turns it on. Even when on, nothing is drawn when stderr is not a terminal (pipes, CI logs,
//! tests), so output that is parsed never contains bar debris. One bar per stage; it is
//! cleared when the stage ends (drop), so the summary printed afterwards stays clean.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);
static VERBOSE: AtomicBool = AtomicBool::new(false);

/// Turn progress bars on or off for the whole process (the CLI: on unless `--quiet`).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Per-pass detail in the summary (`-v`).
pub fn set_verbose(on: bool) {
    VERBOSE.store(on, Ordering::Relaxed);
}

pub fn verbose() -> bool {
    VERBOSE.load(Ordering::Relaxed)
}

/// Whether a bar would be drawn now.
pub fn active() -> bool {
    ENABLED.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

/// One stage's bar, or nothing (every method is then a no-op).
pub struct Progress(Option<ProgressBar>);

impl Progress {
    /// A bar counting `total` steps of the stage `label`.
    pub fn bar(label: &str, total: u64) -> Progress {
        if !active() {
            return Progress(None);
        }
        let pb = ProgressBar::new(total);
        if let Ok(style) =
            ProgressStyle::with_template("{msg:>12} [{bar:30}] {pos}/{len} {elapsed_precise}")
        {
            pb.set_style(style.progress_chars("=> "));
        }
        pb.set_message(label.to_string());
        Progress(Some(pb))
    }

    /// A spinner for a stage of unknown length.
    pub fn spinner(label: &str) -> Progress {
        if !active() {
            return Progress(None);
        }
        let pb = ProgressBar::new_spinner();
        pb.set_message(label.to_string());
        pb.enable_steady_tick(std::time::Duration::from_millis(120));
        Progress(Some(pb))
    }

    pub fn inc(&self, n: u64) {
        if let Some(pb) = &self.0 {
            pb.inc(n);
        }
    }

    pub fn set_message(&self, msg: &str) {
        if let Some(pb) = &self.0 {
            pb.set_message(msg.to_string());
        }
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Some(pb) = &self.0 {
            pb.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disabled_progress_draws_nothing() {
        set_enabled(false);
        assert!(!active());
        let p = Progress::bar("x", 3);
        assert!(p.0.is_none());
        p.inc(1);
    }
}
