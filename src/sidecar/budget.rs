//! Retry budget: retries may add at most `percent` of the requests seen over the last 10 seconds,
//! plus a reserve of `minPerSecond` retries in each second (so a quiet upstream can still retry),
//! so retries cannot multiply load during an outage (the Finagle/Linkerd idea, kept as a plain
//! sliding window).

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::config::RetryBudget;

const WINDOW_SECS: usize = 10;

pub struct Budget {
    percent: u64,
    min_per_second: u64,
    epoch: Instant,
    window: Mutex<Window>,
}

#[derive(Default)]
struct Window {
    /// (requests, retries paid by the ratio, retries paid by the reserve) per second,
    /// ring-indexed by second.
    buckets: [(u64, u64, u64); WINDOW_SECS],
    /// The second (since epoch) the newest bucket belongs to.
    current: u64,
}

impl Budget {
    pub fn new(cfg: &RetryBudget) -> Self {
        Budget {
            percent: cfg.percent as u64,
            min_per_second: cfg.min_per_second as u64,
            epoch: Instant::now(),
            window: Mutex::new(Window::default()),
        }
    }

    fn with_window<R>(&self, f: impl FnOnce(&mut Window, usize) -> R) -> R {
        let sec = Instant::now()
            .saturating_duration_since(self.epoch)
            .as_secs();
        let mut w = self.window.lock();
        if sec > w.current {
            let gap = (sec - w.current).min(WINDOW_SECS as u64);
            for i in 1..=gap {
                let idx = ((w.current + i) % WINDOW_SECS as u64) as usize;
                w.buckets[idx] = (0, 0, 0);
            }
            w.current = sec;
        }
        let idx = (sec % WINDOW_SECS as u64) as usize;
        f(&mut w, idx)
    }

    /// Counts an original request (not a retry).
    pub fn deposit(&self) {
        self.with_window(|w, i| w.buckets[i].0 += 1);
    }

    /// Takes one retry from the budget; `false` when it is exhausted.
    pub fn try_withdraw(&self) -> bool {
        let (percent, min) = (self.percent, self.min_per_second);
        self.with_window(|w, i| {
            if w.buckets[i].2 < min {
                w.buckets[i].2 += 1;
                return true;
            }
            let (requests, retries) = w
                .buckets
                .iter()
                .fold((0, 0), |(a, b), (r, t, _)| (a + r, b + t));
            let ok = (retries + 1) * 100 <= requests * percent;
            if ok {
                w.buckets[i].1 += 1;
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
            b.deposit();
        }
        let granted = (0..100).filter(|_| b.try_withdraw()).count();
        assert_eq!(granted, 20);
    }

    #[tokio::test(start_paused = true)]
    async fn reserve_adds_to_the_ratio() {
        let b = budget(20, 5);
        for _ in 0..100 {
            b.deposit();
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
            b.deposit();
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!b.try_withdraw());
        b.deposit();
        b.deposit();
        assert!(b.try_withdraw());
        assert!(!b.try_withdraw());
    }
}
