//! A dense per-account loop: the yardstick the engine benchmark runs beside the
//! engine on the same ticks (`benchmarks/test_engine_bench.py`). Not used by the
//! service or the backtest.
//!
//! It does the least a rules engine must do per tick — find the account's state
//! in a dense array indexed by id, roll the UTC day, keep the day's start, the
//! day's low and a trailing high-water mark, and compare equity with a daily and
//! an overall floor — in arrival order, with no grouping, outputs or rules file:
//! the cost of touching each account's state once per tick.

/// One account's state in the baseline: 40 bytes.
#[derive(Clone, Copy)]
struct State {
    day: i64,
    day_start: f64,
    day_low: f64,
    hwm: f64,
    breaches: u64,
}

/// Run the baseline over ticks in the order given; returns (ticks judged, floor
/// breaches seen), so that the work can't be optimized away and a caller can
/// check it did something.
#[must_use]
pub fn dense_loop(account_id: &[i64], ts: &[i64], equity: &[f64]) -> (u64, u64) {
    let n = account_id.len().min(ts.len()).min(equity.len());
    let (Some(&lo), Some(&hi)) = (account_id.iter().min(), account_id.iter().max()) else {
        return (0, 0);
    };
    let span = usize::try_from(hi.wrapping_sub(lo))
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    let mut states = vec![
        State {
            day: i64::MIN,
            day_start: 0.0,
            day_low: 0.0,
            hwm: 100_000.0,
            breaches: 0,
        };
        span.min(1 << 28)
    ];
    let mut judged = 0u64;
    for i in 0..n {
        let Some(st) = states.get_mut(account_id[i].wrapping_sub(lo) as usize) else {
            continue;
        };
        let e = equity[i];
        let day = ts[i].div_euclid(86_400_000_000);
        if day != st.day {
            st.day = day;
            st.day_start = e;
            st.day_low = e;
        }
        st.day_low = st.day_low.min(e);
        st.hwm = st.hwm.max(e);
        if e < st.day_start - 5_000.0 || e < st.hwm - 10_000.0 {
            st.breaches += 1;
        }
        judged += 1;
    }
    (judged, states.iter().map(|s| s.breaches).sum())
}

#[cfg(test)]
mod tests {
    use super::dense_loop;

    #[test]
    fn counts_ticks_and_breaches() {
        let (n, b) = dense_loop(
            &[5, 6, 5, 5],
            &[0, 0, 1, 86_400_000_000],
            &[100_000.0, 100_000.0, 94_000.0, 94_000.0],
        );
        assert_eq!((n, b), (4, 1));
        assert_eq!(dense_loop(&[], &[], &[]), (0, 0));
    }
}
