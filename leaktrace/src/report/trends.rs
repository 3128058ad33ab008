//! How each stack's outstanding memory behaves over the last reports: its growth, and whether
//! it is a leak, growing, stable or shrinking.

use std::collections::{HashMap, VecDeque};

use crate::model::{heap::StackUsage, stack_table::StackId};

/// How a stack's outstanding memory behaves over the trend window (see the README).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Never fell over the window, rose at each of the last samples, and still holds an
    /// allocation from the window's start.
    Leak,
    /// Grew over the window, but too briefly or too unevenly to call it a leak.
    Growing,
    /// Flat (within 1%) over the last samples, or within 5% while below its earlier peak or
    /// while every block it holds came after the first of them: high usage, not a leak.
    Stable,
    /// Fell over the window.
    Shrinking,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leak => "leak",
            Self::Growing => "growing",
            Self::Stable => "stable",
            Self::Shrinking => "shrinking",
        }
    }
}

/// Samples a window must hold before a stack can be called a leak.
pub const MIN_LEAK_SAMPLES: usize = 3;

/// The recent outstanding bytes of every stack, one sample per report.
#[derive(Debug)]
pub struct Trends {
    window: usize,
    /// Time of the latest sample.
    latest_s: f64,
    /// Samples closer than this to the previous one replace it.
    min_spacing_s: f64,
    samples: HashMap<StackId, VecDeque<(f64, u64)>>,
    /// The target's resident set, one sample per report.
    rss: VecDeque<(f64, u64)>,
}

impl Trends {
    pub fn new(window: usize, min_spacing_s: f64) -> Self {
        Self {
            window: window.max(2),
            latest_s: 0.0,
            min_spacing_s,
            samples: HashMap::new(),
            rss: VecDeque::new(),
        }
    }

    /// Records the target's resident set; returns its growth over the window (bytes/s), once
    /// two samples exist.
    pub(super) fn observe_rss(&mut self, elapsed_s: f64, rss_bytes: u64) -> Option<f64> {
        if let Some(&(t, _)) = self.rss.back()
            && elapsed_s - t < self.min_spacing_s
            && self.rss.len() > 1
        {
            self.rss.pop_back();
        }
        self.rss.push_back((elapsed_s, rss_bytes));
        while self.rss.len() > self.window {
            self.rss.pop_front();
        }
        (self.rss.len() >= 2).then(|| slope(self.rss.iter()))
    }

    /// Records one sample of every stack (0 for stacks that no longer hold memory).
    pub(super) fn observe(&mut self, elapsed_s: f64, usage: &[StackUsage]) {
        // A sample close after the previous one (the final report right after a tick) replaces
        // it: two samples a millisecond apart say nothing about growth.
        let replace = elapsed_s - self.latest_s < self.min_spacing_s;
        self.latest_s = elapsed_s;
        let now: HashMap<StackId, u64> = usage
            .iter()
            .map(|u| (u.stack, u.outstanding_bytes))
            .collect();
        let record = |series: &mut VecDeque<(f64, u64)>, bytes: u64| {
            if replace && series.len() > 1 {
                series.pop_back();
            }
            series.push_back((elapsed_s, bytes));
        };
        for (stack, series) in &mut self.samples {
            if !now.contains_key(stack) {
                record(series, 0);
            }
        }
        for (&stack, &bytes) in &now {
            // A stack seen for the first time started from nothing at attach.
            let series = self
                .samples
                .entry(stack)
                .or_insert_with(|| VecDeque::from([(0.0, 0)]));
            record(series, bytes);
        }
        let window = self.window;
        self.samples.retain(|_, series| {
            while series.len() > window {
                series.pop_front();
            }
            series.iter().any(|&(_, bytes)| bytes != 0)
        });
    }

    /// Whether the window still holds samples of `stack` (it held memory in the window).
    pub fn tracks(&self, stack: StackId) -> bool {
        self.samples.contains_key(&stack)
    }

    /// Growth (bytes/s, least squares over the last samples) and kind of one stack.
    pub(super) fn classify(&self, stack: StackId, oldest_age_s: f64) -> (f64, Kind) {
        let Some(series) = self.samples.get(&stack) else {
            return (0.0, Kind::Stable);
        };
        let bytes: Vec<u64> = series.iter().map(|s| s.1).collect();
        let (first, last) = (bytes[0], bytes[bytes.len() - 1]);
        let recent = &bytes[bytes.len().saturating_sub(MIN_LEAK_SAMPLES)..];
        let (low, high) = (
            recent.iter().min().copied().unwrap_or(0),
            recent.iter().max().copied().unwrap_or(0),
        );
        // Within 1% over the last samples: a plateau, whatever came before it.
        let flat = recent.len() >= MIN_LEAK_SAMPLES && (high - low) as f64 <= 0.01 * high as f64;
        // A full cache jitters (an entry evicted and not yet replaced, or younger than
        // --min-age): within 5%, and no higher than the peak it reached before the last
        // samples, it holds, while a leak makes a new high every few samples.
        let earlier_peak = bytes[..bytes.len() - recent.len()].iter().max().copied();
        let jitters = recent.len() >= MIN_LEAK_SAMPLES && (high - low) as f64 <= 0.05 * high as f64;
        let below_peak =
            jitters && earlier_peak.is_some_and(|peak| high as f64 <= 1.01 * peak as f64);
        // Every block it holds is younger than the first of the last samples: all it held then
        // was freed since, so its level is entries coming and going (a full cache that churns),
        // and a level that jitters within 5% is not accumulation, even above an earlier peak
        // that was a single sample of the same jitter.
        let turned_over = series
            .get(series.len().saturating_sub(MIN_LEAK_SAMPLES))
            .is_some_and(|&(t, _)| oldest_age_s < self.latest_s - t);
        let never_fell = bytes.windows(2).all(|w| w[1] >= w[0]);
        let still_rising = recent.windows(2).all(|w| w[1] > w[0]);
        // Old allocations never reclaimed: one made before the window's second sample is
        // still outstanding.
        let holds_old = series
            .get(1)
            .is_some_and(|&(t, _)| oldest_age_s >= self.latest_s - t);
        let kind = if bytes.len() > MIN_LEAK_SAMPLES && never_fell && still_rising && holds_old {
            Kind::Leak
        } else if flat || below_peak || (jitters && turned_over) {
            Kind::Stable
        } else if last > first {
            Kind::Growing
        } else if last < first {
            Kind::Shrinking
        } else {
            Kind::Stable
        };
        // The current rate, over the same recent samples: a cache that filled and then held
        // grows at 0 now, whatever it did at the start of the window.
        (
            slope(series.range(series.len().saturating_sub(MIN_LEAK_SAMPLES)..)),
            kind,
        )
    }
}

/// Least-squares slope of bytes over seconds.
fn slope<'a>(samples: impl Iterator<Item = &'a (f64, u64)> + Clone) -> f64 {
    let n = samples.clone().count() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let mean_t = samples.clone().map(|s| s.0).sum::<f64>() / n;
    let mean_b = samples.clone().map(|s| s.1 as f64).sum::<f64>() / n;
    let (mut num, mut den) = (0.0, 0.0);
    for &(t, b) in samples {
        num += (t - mean_t) * (b as f64 - mean_b);
        den += (t - mean_t) * (t - mean_t);
    }
    if den == 0.0 { 0.0 } else { num / den }
}
