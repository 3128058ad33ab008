//! Median, min and max over rounds.

/// The median, min and max of some measurements (none when there were none).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary(Option<(f64, f64, f64)>);

impl Summary {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Self {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return Self(None);
        }
        v.sort_by(f64::total_cmp);
        let n = v.len();
        let median = if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        };
        Self(Some((median, v[0], v[n - 1])))
    }

    pub fn scaled(self, factor: f64) -> Self {
        Self(
            self.0
                .map(|(m, lo, hi)| (m * factor, lo * factor, hi * factor)),
        )
    }

    pub fn median(self) -> Option<f64> {
        self.0.map(|(m, _, _)| m)
    }

    /// `median [min..max]` with `decimals` decimals, or `-`.
    pub fn show(self, decimals: usize) -> String {
        match self.0 {
            Some((m, lo, hi)) => format!("{m:.decimals$} [{lo:.decimals$}..{hi:.decimals$}]"),
            None => "-".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        assert_eq!(Summary::of([3.0, 1.0, 2.0]).show(0), "2 [1..3]");
        assert_eq!(Summary::of([4.0, 1.0, 2.0, 3.0]).show(1), "2.5 [1.0..4.0]");
        assert_eq!(Summary::of([f64::NAN]).show(0), "-");
        assert_eq!(Summary::of([]).show(0), "-");
        assert_eq!(Summary::of([2.0]).scaled(0.5).show(1), "1.0 [1.0..1.0]");
    }
}
