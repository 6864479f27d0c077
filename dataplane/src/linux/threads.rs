//! When [`LoopThreads::Auto`](super::LoopThreads::Auto) splits the hot loops onto a thread per
//! direction and when it joins them again: busy time measured over windows of wall-clock time,
//! with the clock passed in, so the decisions are tested without waiting.

use std::time::{Duration, Instant};

/// How long the one thread is watched before it decides whether to split.
pub(crate) const SPLIT_WINDOW: Duration = Duration::from_millis(50);
/// Busy share (percent of [`SPLIT_WINDOW`]) above which the one thread splits in two.
pub(crate) const SPLIT_BUSY_PERCENT: u32 = 50;
/// How long the split loops are watched before the receive thread decides whether to join them:
/// as long as the split window, so that a request and answer that follow a transfer get the
/// one-thread turnaround within 50–100 ms of its end (with 200 ms, the first 20–40 of an
/// e2e run's pings 10 ms apart still went through two threads). The two thresholds (over a
/// half to split, under a fifth to join) keep a load in between where it is.
pub(crate) const JOIN_WINDOW: Duration = Duration::from_millis(50);
/// Busy share of both threads together (percent of one thread over [`JOIN_WINDOW`]) under
/// which the receive loop goes back to the transmit thread.
pub(crate) const JOIN_BUSY_PERCENT: u32 = 20;

/// Busy time summed over one window of wall-clock time.
#[derive(Debug)]
struct Window {
    length: Duration,
    start: Instant,
    busy: Duration,
}

impl Window {
    fn new(length: Duration, now: Instant) -> Window {
        Window { length, start: now, busy: Duration::ZERO }
    }

    /// Once the window's length has passed at `now`: the time watched and the busy time in
    /// it; the next window starts at `now`.
    fn close(&mut self, now: Instant) -> Option<(Duration, Duration)> {
        let watched = now.saturating_duration_since(self.start);
        if watched < self.length {
            return None;
        }
        let busy = std::mem::take(&mut self.busy);
        self.start = now;
        Some((watched, busy))
    }
}

/// The meter of the one thread that runs both loops: is it busy enough to split?
#[derive(Debug)]
pub(crate) struct SplitMeter(Window);

impl SplitMeter {
    pub(crate) fn new(now: Instant) -> SplitMeter {
        SplitMeter(Window::new(SPLIT_WINDOW, now))
    }

    /// Adds time the thread spent working rather than waiting.
    pub(crate) fn add_busy(&mut self, busy: Duration) {
        self.0.busy += busy;
    }

    /// At the end of each [`SPLIT_WINDOW`]: whether the thread was busy more than
    /// [`SPLIT_BUSY_PERCENT`] of it. `None` within a window.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<bool> {
        let (watched, busy) = self.0.close(now)?;
        Some(busy * 100 > watched * SPLIT_BUSY_PERCENT)
    }
}

/// The receive thread's meter while the loops are split: are both threads together idle
/// enough to join?
#[derive(Debug)]
pub(crate) struct JoinMeter {
    window: Window,
    /// The transmit thread's busy total (nanoseconds) when the window began.
    tx_busy_at: u64,
}

impl JoinMeter {
    /// A meter whose first window starts at `now`, when the transmit thread's busy total is
    /// `tx_busy_ns`.
    pub(crate) fn new(now: Instant, tx_busy_ns: u64) -> JoinMeter {
        JoinMeter { window: Window::new(JOIN_WINDOW, now), tx_busy_at: tx_busy_ns }
    }

    /// Adds time the receive thread spent working rather than waiting.
    pub(crate) fn add_busy(&mut self, busy: Duration) {
        self.window.busy += busy;
    }

    /// At the end of each [`JOIN_WINDOW`]: whether the receive thread and the transmit thread
    /// (whose busy total is now `tx_busy_ns`) were busy together less than
    /// [`JOIN_BUSY_PERCENT`] of it. `None` within a window.
    pub(crate) fn poll(&mut self, now: Instant, tx_busy_ns: u64) -> Option<bool> {
        let (watched, busy) = self.window.close(now)?;
        let tx_busy = Duration::from_nanos(tx_busy_ns.saturating_sub(self.tx_busy_at));
        self.tx_busy_at = tx_busy_ns;
        Some((busy + tx_busy) * 100 < watched * JOIN_BUSY_PERCENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn the_one_thread_splits_only_when_busy_more_than_half_a_window() {
        let t0 = Instant::now();
        let mut m = SplitMeter::new(t0);
        m.add_busy(40 * MS);
        assert_eq!(m.poll(t0 + 49 * MS), None, "the window is not over");
        assert_eq!(m.poll(t0 + 50 * MS), Some(true), "40 of 50 ms busy");
        // The next window starts where the last one was closed, with nothing busy yet.
        m.add_busy(25 * MS);
        assert_eq!(m.poll(t0 + 100 * MS), Some(false), "exactly half is not more than half");
        m.add_busy(26 * MS);
        assert_eq!(m.poll(t0 + 140 * MS), None);
        assert_eq!(m.poll(t0 + 150 * MS), Some(true));
        // A late look measures the whole time since the window began.
        m.add_busy(30 * MS);
        assert_eq!(m.poll(t0 + 250 * MS), Some(false), "30 of 100 ms busy");
    }

    #[test]
    fn the_loops_join_when_both_threads_together_are_busy_under_a_fifth() {
        let (t0, w) = (Instant::now(), JOIN_WINDOW);
        let tx_at = 1_000_000_000; // the transmit thread's total before the split
        let mut m = JoinMeter::new(t0, tx_at);
        m.add_busy(w / 20);
        assert_eq!(m.poll(t0 + w - MS, tx_at), None, "the window is not over");
        assert_eq!(m.poll(t0 + w, tx_at), Some(true), "a twentieth of the window busy");
        // Receive and transmit a tenth each in the next window: a fifth is not under a fifth.
        m.add_busy(w / 10);
        let tx_now = tx_at + (w / 10).as_nanos() as u64;
        assert_eq!(m.poll(t0 + 2 * w, tx_now), Some(false));
        // Only what the transmit thread did since the last window counts.
        m.add_busy(w / 20);
        assert_eq!(m.poll(t0 + 3 * w, tx_now + (w / 10).as_nanos() as u64), Some(true), "3/20 of the window busy");
    }
}
