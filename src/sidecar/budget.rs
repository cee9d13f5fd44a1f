//! Retry budget: retries may add at most `percent` of the requests seen over the last 10 seconds,
//! plus a reserve of `minPerSecond` retries in each second (so a quiet upstream can still retry),
//! so retries cannot multiply load during an outage (the Finagle/Linkerd idea, kept as a plain
//! sliding window).

use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RetryBudget;

const WINDOW_SECS: usize = 10;

pub struct Budget {
    percent: u64,
    min_per_second: u64,
    epoch: Instant,
    /// Requests per second, ring-indexed like `Window::buckets`. Counted without the lock:
    /// every request deposits, while the lock is only taken to withdraw (failures) or to move
    /// the window on.
    requests: [AtomicU64; WINDOW_SECS],
    /// `Window::current`, readable without the lock.
    current: AtomicU64,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// (retries paid by the ratio, retries paid by the reserve) per second, ring-indexed by
    /// second.
    buckets: [(u64, u64); WINDOW_SECS],
    /// The second (since epoch) the newest bucket belongs to.
    current: u64,
}

impl Budget {
    pub fn new(cfg: &RetryBudget) -> Self {
        Budget {
            percent: cfg.percent as u64,
            min_per_second: cfg.min_per_second as u64,
            epoch: Instant::now(),
            requests: Default::default(),
            current: AtomicU64::new(0),
            window: Mutex::new(Window::default()),
        }
    }

    fn second(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs()
    }

    fn with_window<R>(&self, now: Instant, f: impl FnOnce(&mut Window, usize) -> R) -> R {
        let sec = self.second(now);
        let mut w = self.window.lock();
        if sec > w.current {
            let gap = (sec - w.current).min(WINDOW_SECS as u64);
            for i in 1..=gap {
                let idx = ((w.current + i) % WINDOW_SECS as u64) as usize;
                w.buckets[idx] = (0, 0);
                self.requests[idx].store(0, Ordering::Relaxed);
            }
            w.current = sec;
            self.current.store(sec, Ordering::Relaxed);
        }
        let idx = (sec % WINDOW_SECS as u64) as usize;
        f(&mut w, idx)
    }

    /// Counts an original request (not a retry) that arrived at `now`.
    pub fn deposit(&self, now: Instant) {
        let sec = self.second(now);
        let idx = (sec % WINDOW_SECS as u64) as usize;
        if sec == self.current.load(Ordering::Relaxed) {
            self.requests[idx].fetch_add(1, Ordering::Relaxed);
        } else {
            // A new second: move the window on first (under the lock).
            self.with_window(now, |_, i| {
                self.requests[i].fetch_add(1, Ordering::Relaxed);
            });
        }
    }

    /// Takes one retry from the budget; `false` when it is exhausted.
    pub fn try_withdraw(&self) -> bool {
        let (percent, min) = (self.percent, self.min_per_second);
        self.with_window(Instant::now(), |w, i| {
            if w.buckets[i].1 < min {
                w.buckets[i].1 += 1;
                return true;
            }
            let retries: u64 = w.buckets.iter().map(|(t, _)| t).sum();
            let requests: u64 = self
                .requests
                .iter()
                .map(|r| r.load(Ordering::Relaxed))
                .sum();
            let ok = (retries + 1) * 100 <= requests * percent;
            if ok {
                w.buckets[i].0 += 1;
            }
            ok
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn budget(percent: u32, min: u32) -> Budget {
        Budget::new(&RetryBudget {
            percent,
            min_per_second: min,
        })
    }

    #[tokio::test(start_paused = true)]
    async fn ratio_of_requests() {
        let b = budget(20, 0);
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_adds_to_the_ratio() {
        let b = budget(20, 5);
        for _ in 0..100 {
            b.deposit(Instant::now());
        }
        assert_eq!((0..100).filter(|_| b.try_withdraw()).count(), 25);
    }

    #[tokio::test(start_paused = true)]
    async fn minimum_per_second_when_idle() {
        let b = budget(20, 3);
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 3);
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!((0..10).filter(|_| b.try_withdraw()).count(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn old_requests_leave_the_window() {
        let b = budget(50, 0);
        for _ in 0..10 {
            b.deposit(Instant::now());
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.try_withdraw());
        b.deposit(Instant::now());
        b.deposit(Instant::now());
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }
}
