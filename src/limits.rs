//! Resource limits: the memory budget every buffer sized from the model is checked against
//! *before* it is allocated, and the one place element counts are computed.
//!
//! A model declares its own sizes (input dims, value shapes) and a hostile or broken one can
//! declare dims of 2^31 or 2^40. Allocating first and failing later aborts the process
//! (`memory allocation of 274877906944 bytes failed`, no error line, no cleanup) or grinds for
//! minutes filling the buffer; so every such buffer asks [`MemoryBudget::check`] first.
//!
//! - Element counts: [`element_count`] multiplies dims with checked arithmetic; a product that
//!   overflows `usize`/`i64` is an invalid model, never a wrap-around.
//! - The budget: by default half of physical memory (`MemTotal` of `/proc/meminfo`; 4 GiB
//!   when that cannot be read), or what `--max-memory` says ([`parse_size`]: `8G`, `512M`,
//!   plain bytes).
//! - Over budget: one line naming the buffer, its size, the budget and the fixes.
//!
//! Invariant: a check never allocates; refusing a 2^40-element input takes microseconds.

use anyhow::{bail, Context, Result};
use std::sync::OnceLock;

/// The budget when physical memory cannot be read.
const FALLBACK_BYTES: u64 = 4 << 30;

/// What the user can do about a buffer over budget (appended to every refusal).
pub const FIXES: &str = "fix the input's dims with --input-shape NAME:DIMS, use fewer samples (--calib-samples / --samples), or raise --max-memory";

/// Most values one set of synthetic inputs may hold (2^27, 512 MiB of f32). Generating and
/// running synthetic data is O(values): on the 2-core reference machine about 6 M values/s go
/// through generation, observation and validation, so this keeps a run without data to
/// seconds of work, where the memory budget alone would admit minutes (half of 16 GiB is 2^31
/// values). A 1024x1024 RGB input is 50 M values for 16 samples; a bigger input needs real data.
pub const SYNTHETIC_MAX_VALUES: u64 = 1 << 27;

/// Refuse synthetic data of `values` values for `what` above [`SYNTHETIC_MAX_VALUES`].
pub fn check_synthetic(what: &str, values: u64) -> Result<()> {
    if values <= SYNTHETIC_MAX_VALUES {
        return Ok(());
    }
    bail!(
        "{what} is {values} values, above the {SYNTHETIC_MAX_VALUES} generated without data (seconds of work, not minutes): pass real data (--calib, --eval), fix the input's dims with --input-shape NAME:DIMS, or use fewer samples"
    )
}

/// Where a budget's figure comes from (said in every refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetOrigin {
    /// Half of physical memory.
    HalfOfRam,
    /// Physical memory could not be read.
    Fallback,
    /// `--max-memory`.
    User,
}

/// Most bytes one buffer (or one group of buffers allocated together) may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryBudget {
    pub bytes: u64,
    pub origin: BudgetOrigin,
}

impl Default for MemoryBudget {
    /// Half of physical memory, read once per process.
    fn default() -> Self {
        static DEFAULT: OnceLock<MemoryBudget> = OnceLock::new();
        *DEFAULT.get_or_init(|| match physical_memory() {
            Some(total) => MemoryBudget {
                bytes: total / 2,
                origin: BudgetOrigin::HalfOfRam,
            },
            None => MemoryBudget {
                bytes: FALLBACK_BYTES,
                origin: BudgetOrigin::Fallback,
            },
        })
    }
}

impl MemoryBudget {
    /// A budget the user gave (`--max-memory`).
    pub fn user(bytes: u64) -> Self {
        MemoryBudget {
            bytes,
            origin: BudgetOrigin::User,
        }
    }

    /// Refuse `bytes` for `what` when over budget: `"{what} needs 128 GiB, above the memory
    /// budget of 7.8 GiB (half of physical memory): {FIXES}"`.
    pub fn check(&self, what: &str, bytes: u64) -> Result<()> {
        if bytes <= self.bytes {
            return Ok(());
        }
        let origin = match self.origin {
            BudgetOrigin::HalfOfRam => "half of physical memory",
            BudgetOrigin::Fallback => "physical memory unknown",
            BudgetOrigin::User => "--max-memory",
        };
        bail!(
            "{what} needs {}, above the memory budget of {} ({origin}): {FIXES}",
            human_bytes(bytes),
            human_bytes(self.bytes)
        )
    }

    /// [`Self::check`] for `count` elements of `elem_bytes` each; an overflowing product is
    /// over any budget.
    pub fn check_elements(&self, what: &str, count: u64, elem_bytes: u64) -> Result<()> {
        self.check(what, count.saturating_mul(elem_bytes))
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn physical_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// The product of `dims`, or an error naming `what` when it overflows `usize` or `i64` (no
/// runtime could hold such a tensor: the model is invalid).
pub fn element_count(what: &str, dims: &[usize]) -> Result<usize> {
    dims.iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .filter(|&n| i64::try_from(n).is_ok())
        .with_context(|| {
            let shown: Vec<String> = dims.iter().map(usize::to_string).collect();
            format!(
                "{what} has shape [{}], whose element count overflows 64 bits: invalid model",
                shown.join(", ")
            )
        })
}

/// A size like `8G`, `512M`, `64k`, `1.5GiB` or plain bytes (binary units: K = 1024).
pub fn parse_size(text: &str) -> Result<u64> {
    let t = text.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        _ => bail!("size '{text}': unknown unit '{unit}' (use bytes or K, M, G, T)"),
    };
    let value: f64 = number
        .parse()
        .ok()
        .filter(|v: &f64| v.is_finite())
        .with_context(|| format!("size '{text}' is not a number with an optional K, M, G or T"))?;
    let bytes = value * (1u64 << shift) as f64;
    if bytes < 1.0 || bytes >= u64::MAX as f64 {
        bail!("size '{text}' is out of range");
    }
    Ok(bytes as u64)
}

/// `1536` -> `1.5 KiB`; exact bytes below 1 KiB.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("8G").unwrap(), 8 << 30);
        assert_eq!(parse_size("512M").unwrap(), 512 << 20);
        assert_eq!(parse_size("1.5GiB").unwrap(), 3 << 29);
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size(" 64 kb ").unwrap(), 64 << 10);
        for bad in ["", "G", "8X", "-1G", "0", "1e3", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn element_counts_refuse_overflow() {
        assert_eq!(element_count("x", &[2, 3, 4]).unwrap(), 24);
        assert_eq!(element_count("x", &[]).unwrap(), 1);
        assert_eq!(element_count("x", &[1 << 31, 0]).unwrap(), 0);
        let e = element_count("input 'x'", &[1 << 40, 1 << 40]).unwrap_err();
        assert!(e.to_string().contains("input 'x'"), "{e}");
        // Fits usize but not i64.
        assert!(element_count("x", &[1 << 63]).is_err());
    }

    #[test]
    fn budget_names_the_buffer_its_size_and_the_fix() {
        let b = MemoryBudget::user(1 << 20);
        b.check("x", 1 << 20).unwrap();
        let e = b
            .check("synthetic data for input 'x'", 3 << 29)
            .unwrap_err()
            .to_string();
        for needle in [
            "input 'x'",
            "1.5 GiB",
            "1.0 MiB",
            "--max-memory",
            "--input-shape",
        ] {
            assert!(e.contains(needle), "{needle}: {e}");
        }
        assert!(b.check_elements("x", u64::MAX, 4).is_err());
        assert!(MemoryBudget::default().bytes > 0);
    }

    #[test]
    fn synthetic_work_is_bounded() {
        check_synthetic("x", SYNTHETIC_MAX_VALUES).unwrap();
        let e = check_synthetic("synthetic data for input 'x'", SYNTHETIC_MAX_VALUES + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("input 'x'") && e.contains("--calib"), "{e}");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(human_bytes(1000), "1000 B");
        assert_eq!(human_bytes(1536), "1.5 KiB");
        assert_eq!(human_bytes(128 << 30), "128.0 GiB");
    }
}

/// Deadlines for work that may never finish on a hostile model: tract's analysis and plan
/// building, where symbolic-dim expressions can grow without bound (a Shape -> Cast chain fed a
/// rewired value kept tract's constant propagation busy for minutes, all inside one call that
/// cannot be interrupted). Such work registers a [`Watched`] deadline; the binary runs a
/// watchdog thread that ends the process with one error line past it ([`overdue`]). Library
/// callers without a watchdog are unaffected.
///
/// The budget counts the CPU time of the thread that registered the work, not wall time: on
/// a loaded machine (a CI runner, two cores shared by ten processes) a healthy analysis of
/// EfficientNet-B0 took more than its 22 s in wall time and the run was ended, while the runaway
/// analyses this guards against spend their whole wall time on the CPU.
pub mod watch {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Mutex;
    use std::time::Duration;

    /// A registered piece of work: id, the registering thread's CPU clock, its reading at
    /// registration, the budget and what the work is.
    type Entry = (u64, Clock, Duration, Duration, &'static str);

    static ACTIVE: Mutex<Vec<Entry>> = Mutex::new(Vec::new());
    static NEXT: AtomicU64 = AtomicU64::new(0);

    /// Floor of the analysis budget, whatever the model's size.
    pub const ANALYSIS_BASE: Duration = Duration::from_secs(20);
    /// Extra analysis time per MiB of model (tract packs weights while it builds a plan).
    pub const ANALYSIS_PER_MIB: Duration = Duration::from_millis(100);

    /// The CPU time tract may take to analyse and plan a model of `model_bytes`: 20 s plus
    /// 0.1 s per MiB (ViT-B/16, 330 MiB: 53 s; it takes a few seconds on the reference machine).
    pub fn analysis_budget(model_bytes: u64) -> Duration {
        ANALYSIS_BASE + ANALYSIS_PER_MIB * (model_bytes >> 20) as u32
    }

    /// The CPU-time clock of one thread, readable from any other thread of the process while
    /// that thread lives (the entry is removed before it can end: [`Watched`] is dropped
    /// first). Where no per-thread clock exists, the process's monotonic clock stands in.
    #[derive(Clone, Copy)]
    struct Clock(libc::clockid_t);

    impl Clock {
        #[cfg(target_os = "linux")]
        fn of_this_thread() -> Clock {
            let mut id: libc::clockid_t = libc::CLOCK_MONOTONIC;
            // SAFETY: pthread_self is always valid for the calling thread; on failure `id`
            // keeps the monotonic clock.
            let rc = unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut id) };
            Clock(if rc == 0 { id } else { libc::CLOCK_MONOTONIC })
        }

        #[cfg(not(target_os = "linux"))]
        fn of_this_thread() -> Clock {
            Clock(libc::CLOCK_MONOTONIC)
        }

        /// The clock's reading, or None if it cannot be read (the thread has ended).
        fn now(self) -> Option<Duration> {
            let mut t = libc::timespec {
                tv_sec: 0,
                tv_nsec: 0,
            };
            // SAFETY: `t` is a valid timespec to write into.
            let rc = unsafe { libc::clock_gettime(self.0, &mut t) };
            (rc == 0).then(|| {
                Duration::new(
                    t.tv_sec.max(0) as u64,
                    t.tv_nsec.clamp(0, 999_999_999) as u32,
                )
            })
        }
    }

    /// A registered deadline, removed when dropped.
    #[must_use]
    pub struct Watched(u64);

    impl Drop for Watched {
        fn drop(&mut self) {
            if let Ok(mut active) = ACTIVE.lock() {
                active.retain(|(id, ..)| *id != self.0);
            }
        }
    }

    /// Register `what` (e.g. "tract's analysis of the model") with `budget` of this thread's
    /// CPU time from now.
    pub fn start(what: &'static str, budget: Duration) -> Watched {
        let id = NEXT.fetch_add(1, Ordering::Relaxed);
        let clock = Clock::of_this_thread();
        let started = clock.now().unwrap_or_default();
        if let Ok(mut active) = ACTIVE.lock() {
            active.push((id, clock, started, budget, what));
        }
        Watched(id)
    }

    /// The first registered work that has used up its budget: what it is and its budget.
    pub fn overdue() -> Option<(&'static str, Duration)> {
        let active = ACTIVE.lock().ok()?;
        active
            .iter()
            .find(|(_, clock, started, budget, _)| {
                clock
                    .now()
                    .is_some_and(|now| now.saturating_sub(*started) >= *budget)
            })
            .map(|&(_, _, _, budget, what)| (what, budget))
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn deadlines_expire_and_leave_when_dropped() {
            let w = start("slow work", Duration::ZERO);
            assert_eq!(overdue().map(|(what, _)| what), Some("slow work"));
            drop(w);
            let _w = start("fast work", Duration::from_secs(3600));
            assert!(overdue().is_none_or(|(what, _)| what != "fast work"));
            assert_eq!(
                analysis_budget(330 << 20),
                Duration::from_secs(20) + Duration::from_millis(33_000)
            );
            drop(_w);

            // The budget is this thread's CPU time (Linux): waiting (a loaded machine) does
            // not use it, working does.
            let w = start("busy work", Duration::from_millis(30));
            std::thread::sleep(Duration::from_millis(120));
            if cfg!(target_os = "linux") {
                assert!(overdue().is_none_or(|(what, _)| what != "busy work"));
            }
            let wall = std::time::Instant::now();
            let mut x = 0u64;
            while overdue().is_none_or(|(what, _)| what != "busy work") {
                x = std::hint::black_box(x.wrapping_mul(6364136223846793005).wrapping_add(1));
                assert!(
                    wall.elapsed() < Duration::from_secs(300),
                    "CPU budget never ran out"
                );
            }
            drop(w);
        }
    }
}
