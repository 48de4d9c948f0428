//! Load as users feel it, for the benchmark and `benches/crosscheck.sh` (through the
//! `kb-load` binary): requests offered at a fixed rate (open loop), each one's latency measured
//! from the moment it was due, not from when it was sent, so that a stall counts against every
//! request it holds up (no coordinated omission); and a process's own CPU time, read from
//! `/proc/<pid>/stat`, for CPU per request.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// The latencies of one run.
#[derive(Debug, Clone, Default)]
pub struct Latencies {
    /// Requests offered.
    pub offered: usize,
    /// Those that failed (a transport error or an unexpected status).
    pub failed: usize,
    /// From the first request's due time to the last answer.
    pub elapsed: Duration,
    /// Each request's latency from its due time, in microseconds, sorted.
    pub micros: Vec<u64>,
}

impl Latencies {
    /// The `q` quantile (0..=1), in milliseconds: the smallest latency at or above which lies
    /// the fraction `1 - q` of the requests.
    pub fn quantile_ms(&self, q: f64) -> f64 {
        quantile_ms(&self.micros, q)
    }

    /// The rate the answers came back at.
    pub fn answered_per_sec(&self) -> f64 {
        self.micros.len() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// The `q` quantile (0..=1) of `sorted` microseconds, in milliseconds (0 when there are none).
pub fn quantile_ms(sorted: &[u64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1] as f64 / 1000.0
}

/// Offers `rate` requests a second for `duration`: request `i` is due at `start + i / rate`,
/// and started then (or at once, if the generator is late), whatever the earlier ones are
/// doing. `call(i)` makes request `i` and says whether it succeeded. Tokio's timer has a
/// millisecond's grain, so requests start up to a millisecond after they are due, the same for
/// every target compared.
pub async fn open_loop<F, Fut>(rate: f64, duration: Duration, call: F) -> Latencies
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = bool> + Send + 'static,
{
    let offered = (rate * duration.as_secs_f64()).round().max(1.0) as usize;
    let start = Instant::now() + Duration::from_millis(5);
    let mut running = Vec::with_capacity(offered);
    for i in 0..offered {
        let due = start + Duration::from_secs_f64(i as f64 / rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due).await;
        }
        let request = call(i);
        running.push(tokio::spawn(async move {
            let ok = request.await;
            (due.elapsed().as_micros() as u64, ok)
        }));
    }
    let mut out = Latencies { offered, ..Default::default() };
    for task in running {
        match task.await {
            Ok((micros, true)) => out.micros.push(micros),
            _ => out.failed += 1,
        }
    }
    out.elapsed = start.elapsed();
    out.micros.sort_unstable();
    out
}

/// The benchmark's reference workload, in microseconds: one thread hashes 4 MiB (FNV-1a over a
/// 64 KiB buffer, 64 times), the best of seven tries. Fixed work that is nobody's code, measured
/// in the same run as what it normalises; `benches/crosscheck.sh` measures it beside wrk's CPU
/// per direct create (the yardstick of issue 20), which gives the ratio the benchmark uses.
pub fn reference_unit() -> f64 {
    let buffer: Vec<u8> = (0..65_536u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8).collect();
    let mut best = f64::INFINITY;
    for _ in 0..7 {
        let started = std::time::Instant::now();
        let mut hash = 0xcbf2_9ce4_8422_2325u64;
        for _ in 0..64 {
            for byte in &buffer {
                hash = (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        std::hint::black_box(hash);
        best = best.min(started.elapsed().as_secs_f64() * 1e6);
    }
    best
}

/// The CPU time (user and system, all threads, the exited ones included) process `pid` has
/// used, from `/proc/<pid>/stat`, in the kernel's 10 ms ticks (`USER_HZ` is 100 on Linux).
pub fn cpu_time(pid: u32) -> anyhow::Result<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // The command name (field 2) may hold spaces; the fields after its `)` are fixed.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| -> anyhow::Result<u64> {
        Ok(fields.get(i).ok_or_else(|| anyhow::anyhow!("short /proc/{pid}/stat"))?.parse()?)
    };
    // After the name: state is field 3, so utime (14) and stime (15) are the 11th and 12th.
    Ok(Duration::from_millis((ticks(11)? + ticks(12)?) * 10))
}

/// A field of `/proc/<pid>/status` in kB (`VmHWM:` is the peak resident set).
pub fn status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = text
        .lines()
        .find(|l| l.starts_with(field))
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(line.split_whitespace().nth(1).ok_or_else(|| anyhow::anyhow!("malformed {field}"))?.parse()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_stall_counts_against_every_request_it_holds_up() {
        // The generator itself stalls for 50 ms at the first request (as a saturated machine
        // would): the nine requests due during the stall start late, and their lateness is
        // latency, though each is answered at once.
        let lat = open_loop(200.0, Duration::from_millis(500), |i| {
            if i == 0 {
                std::thread::sleep(Duration::from_millis(50));
            }
            async { true }
        })
        .await;
        assert_eq!(lat.offered, 100);
        assert_eq!(lat.micros.len(), 100);
        assert!(lat.quantile_ms(0.5) < 5.0, "most requests are on time: {lat:?}");
        assert!(lat.quantile_ms(1.0) >= 40.0, "the first one due in the stall waited for it: {lat:?}");
        assert!(lat.quantile_ms(0.92) >= 5.0, "and so did the next eight: {lat:?}");
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        std::hint::black_box(x);
        assert!(cpu_time(std::process::id()).unwrap() > Duration::ZERO);
        assert!(status_kb(std::process::id(), "VmHWM:").unwrap() > 0);
    }
}
