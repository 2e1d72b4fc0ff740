//! Order statistics over repeated measurements.

/// Summary of repeated samples in milliseconds.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    pub runs: usize,
    pub p50_ms: f64,
    pub p95_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
}

/// The `q`-quantile (0.0..=1.0) of `samples` by the nearest-rank method; `None` when empty.
pub fn quantile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() || !(0.0..=1.0).contains(&q) {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    // Nearest rank: the smallest index whose cumulative share reaches q.
    let index = (0..sorted.len())
        .find(|&i| (i + 1) as f64 >= q * sorted.len() as f64)
        .unwrap_or(sorted.len() - 1);
    Some(sorted[index])
}

/// The median by the usual definition (mean of the two middle values for even counts).
pub fn median(samples: &[f64]) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    Some(if sorted.len().is_multiple_of(2) {
        (sorted[mid - 1] + sorted[mid]) / 2.0
    } else {
        sorted[mid]
    })
}

/// Summarises samples; `None` when there are none.
pub fn summarise(samples: &[f64]) -> Option<Summary> {
    Some(Summary {
        runs: samples.len(),
        p50_ms: median(samples)?,
        p95_ms: quantile(samples, 0.95)?,
        min_ms: samples.iter().copied().fold(f64::INFINITY, f64::min),
        max_ms: samples.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn quantile_uses_nearest_rank() {
        let samples: Vec<f64> = (1..=20).map(f64::from).collect();
        assert_eq!(quantile(&samples, 0.95), Some(19.0));
        assert_eq!(quantile(&samples, 1.0), Some(20.0));
        assert_eq!(quantile(&samples, 0.0), Some(1.0));
        assert_eq!(quantile(&samples, 1.5), None);
    }

    #[test]
    fn summary_has_extremes() {
        let s = summarise(&[5.0, 1.0, 9.0]).unwrap();
        assert_eq!((s.runs, s.p50_ms, s.min_ms, s.max_ms), (3, 5.0, 1.0, 9.0));
    }
}
