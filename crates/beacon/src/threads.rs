//! Parallel loops that give way when the machine is busy.
//!
//! candle's barrier pool wakes its workers for every parallel op and the calling thread spins until
//! they report done. When another process holds one of two cores, a woken worker waits for a time
//! slice while the caller spins on the only core it has: each op then costs a scheduler tick instead
//! of microseconds, and decode (hundreds of small ops per token) fell from 24 to 6 tok/s. So our
//! kernels (few-row products, attention) ask [`spread`] first: it samples, at most every 100 ms,
//! how much CPU the rest of the machine uses (`/proc/stat` less this process's own time) and runs the
//! loop on the calling thread alone while fewer cores than the pool's threads are free.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// Run `f` over `0..n_items` in chunks: across candle's barrier pool when the cores it needs are
/// free, else on this thread.
pub fn for_chunks<F: Fn(std::ops::Range<usize>) + Sync>(n_items: usize, f: F) {
    let pool = candle_core::utils::barrier_pool();
    if n_items <= 1 || pool.n_workers() == 0 || !spread() {
        f(0..n_items);
    } else {
        pool.execute_chunked(n_items, f);
    }
}

static SPREAD: AtomicBool = AtomicBool::new(true);
/// Milliseconds since [`START`] of the last sample.
static LAST_MS: AtomicU64 = AtomicU64::new(0);
static SAMPLER: Mutex<Option<Sample>> = Mutex::new(None);
static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

const RESAMPLE_MS: u64 = 100;

#[derive(Clone, Copy)]
struct Sample {
    /// Busy ticks of all CPUs (`/proc/stat`).
    machine: u64,
    /// This process's user + system ticks (`/proc/self/stat`).
    own: u64,
    at: Instant,
}

/// Whether to spread work over the pool: false while other processes use so much CPU that fewer
/// cores than the pool's threads are free. `BEACON_ADAPTIVE_THREADS=0` always spreads (the old
/// behaviour, for comparison).
pub fn spread() -> bool {
    let start = *START.get_or_init(Instant::now);
    let now_ms = start.elapsed().as_millis() as u64;
    let last = LAST_MS.load(Ordering::Relaxed);
    if now_ms.saturating_sub(last) >= RESAMPLE_MS
        && LAST_MS
            .compare_exchange(last, now_ms, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        resample();
    }
    SPREAD.load(Ordering::Relaxed)
}

fn adaptive() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| {
        std::env::var("BEACON_ADAPTIVE_THREADS")
            .map(|v| v != "0" && !v.eq_ignore_ascii_case("false"))
            .unwrap_or(true)
    })
}

fn resample() {
    if !adaptive() {
        return;
    }
    let Some(now) = read_sample() else { return };
    let mut guard = match SAMPLER.try_lock() {
        Ok(g) => g,
        Err(_) => return,
    };
    if let Some(prev) = *guard {
        let wall = now.at.duration_since(prev.at).as_secs_f64();
        if wall > 0.0 {
            // Ticks are USER_HZ = 100 per second on Linux.
            let others = (now.machine.saturating_sub(prev.machine) as f64
                - now.own.saturating_sub(prev.own) as f64)
                / 100.0
                / wall;
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
            let threads = (candle_core::utils::barrier_pool().n_workers() + 1) as f64;
            let free = cores - others.max(0.0);
            // Hysteresis: go single-threaded below threads − 0.6 free cores, back above − 0.3.
            let was = SPREAD.load(Ordering::Relaxed);
            let spread = if was {
                free >= threads - 0.6
            } else {
                free >= threads - 0.3
            };
            if spread != was {
                tracing::debug!("{others:.2} cores busy elsewhere: spread = {spread}");
            }
            SPREAD.store(spread, Ordering::Relaxed);
        }
    }
    *guard = Some(now);
}

fn read_sample() -> Option<Sample> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let cpu = stat.lines().next()?;
    let v: Vec<u64> = cpu
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    if v.len() < 8 {
        return None;
    }
    let machine = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
    let own_stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name: state is field 3; utime, stime are 14, 15.
    let rest = &own_stat[own_stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let own = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(Sample {
        machine,
        own,
        at: Instant::now(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_parse_and_loops_cover_every_item() {
        let s = read_sample().expect("/proc/stat and /proc/self/stat readable");
        assert!(s.machine > 0);
        let hits: Vec<AtomicU64> = (0..1000).map(|_| AtomicU64::new(0)).collect();
        for _ in 0..3 {
            for_chunks(hits.len(), |r| {
                for i in r {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                }
            });
            std::thread::sleep(std::time::Duration::from_millis(60));
        }
        assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 3));
    }
}
