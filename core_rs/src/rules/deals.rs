//! Deals (`rules.md`, "Deal rules"): one account's positions, its processed deal
//! ids and its deal counters — the cold part of a phase's state, touched by deals
//! and, for `weekend_hold`, by the rare tick that crosses a weekly close.
//!
//! The rules themselves (which deal is judged, breaches, the phase's end) are in
//! `engine.rs` (`Phase::deal`); this module keeps the bookkeeping they read.

use serde::{Deserialize, Serialize};

use crate::rules::config::hundredths;

/// A deal's direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Side {
    /// `buy`.
    Buy,
    /// `sell`.
    Sell,
}

impl Side {
    /// The side's name in every input and output.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Buy => "buy",
            Self::Sell => "sell",
        }
    }

    /// `buy` or `sell`; anything else is not a side.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "buy" => Some(Self::Buy),
            "sell" => Some(Self::Sell),
            _ => None,
        }
    }
}

/// Whether a deal opens/adds to (`in`) or reduces/closes (`out`) its position.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Entry {
    /// `in`.
    In,
    /// `out`.
    Out,
}

impl Entry {
    /// `in` or `out`; anything else is not an entry.
    #[must_use]
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "in" => Some(Self::In),
            "out" => Some(Self::Out),
            _ => None,
        }
    }
}

/// One deal row as it arrives, borrowed from the input batch. A field that was
/// null or not a known value is `None`.
#[derive(Clone, Copy, Debug)]
pub struct DealInput<'a> {
    /// Trading account login (`None`: null).
    pub account_id: Option<i64>,
    /// Execution time, UTC microseconds.
    pub ts: Option<i64>,
    /// Unique per account.
    pub deal_id: Option<i64>,
    /// The position the deal opens, adds to, reduces or closes.
    pub position_id: Option<i64>,
    /// Instrument.
    pub symbol: Option<&'a str>,
    /// `buy` | `sell`.
    pub side: Option<Side>,
    /// Lots.
    pub volume: Option<f64>,
    /// Execution price.
    pub price: Option<f64>,
    /// `in` | `out`.
    pub entry: Option<Entry>,
    /// Delivered before this tick row of the call (`0..=` tick rows).
    pub before_tick: u64,
}

/// A deal that passed the value checks (docs/rules.md, "Bad deals").
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Deal<'a> {
    /// Trading account login.
    pub account_id: i64,
    /// Execution time, UTC microseconds.
    pub ts: i64,
    /// Unique per account.
    pub deal_id: i64,
    /// The position it touches.
    pub position_id: i64,
    /// Instrument, non-empty.
    pub symbol: &'a str,
    /// Direction.
    pub side: Side,
    /// Lots in whole hundredths, ≥ 1.
    pub hundredths: i64,
    /// `in` or `out`.
    pub entry: Entry,
}

impl<'a> DealInput<'a> {
    /// The deal, if every field is present and valid: a non-empty symbol, a known
    /// side and entry, a finite volume of at least one hundredth after rounding, a
    /// finite price > 0. Otherwise the deal is counted `invalid` and skipped.
    #[must_use]
    pub fn checked(&self) -> Option<Deal<'a>> {
        let volume = self.volume.filter(|v| v.is_finite() && *v > 0.0)?;
        let lots = hundredths(volume);
        let price = self.price?;
        if lots < 1 || !(price.is_finite() && price > 0.0) {
            return None;
        }
        Some(Deal {
            account_id: self.account_id?,
            ts: self.ts?,
            deal_id: self.deal_id?,
            position_id: self.position_id?,
            symbol: self.symbol.filter(|s| !s.is_empty())?,
            side: self.side?,
            hundredths: lots,
            entry: self.entry?,
        })
    }
}

/// An open position (`rules.md`, "Positions").
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// The platform's position id.
    pub position_id: i64,
    /// The symbol of its first `in` deal.
    pub symbol: String,
    /// The side of its first `in` deal.
    pub side: Side,
    /// Open volume in hundredths (> 0 while the position is open).
    pub open_hundredths: i64,
    /// The `ts` of its first `in` deal.
    pub opened_at: i64,
    /// Whether `max_position_size` was already recorded for this opening.
    pub size_recorded: bool,
}

/// What one processed deal did to its account's positions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Update {
    /// An `in` deal opened or added to the position at this index.
    In(usize),
    /// An `out` deal reduced an open position that stays open.
    Reduced,
    /// An `out` deal closed a position opened at `opened_at`.
    Closed {
        /// The closed position's `opened_at`.
        opened_at: i64,
    },
    /// An `out` deal for a position that is not open: no position changes.
    Unmatched,
}

/// One account's deal state: positions, processed deal ids, counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DealState {
    /// Open positions, in opening order (most accounts hold 0–3).
    pub positions: Vec<Position>,
    /// Every processed `deal_id`, sorted. Exact (docs/rules.md): a later
    /// delivery of a once-late deal is processed, however ids are ordered; deal
    /// ids grow per account on every platform we know, so inserts are appends.
    seen: Vec<i64>,
    /// Processed deals.
    pub deals: u64,
    /// Late deals (older than the last processed event, or before the start).
    pub late_deals: u64,
    /// Deals whose `deal_id` was already processed.
    pub duplicate_deals: u64,
    /// `out` deals for a position that was not open.
    pub unmatched_deals: u64,
    /// Under `trading_day_basis = deals`: when the day of the last counted `in`
    /// deal ends (UTC µs; `i64::MIN` before the first).
    pub deal_day_end: i64,
    /// The first weekly `weekend_close` after some processed deal at or before
    /// the last one (`i64::MIN`: none yet): a cache, so that reopening a position
    /// before that close needs no time-zone arithmetic.
    pub next_close: i64,
}

impl DealState {
    /// A state with no deals.
    #[must_use]
    pub fn new() -> Self {
        Self {
            deal_day_end: i64::MIN,
            next_close: i64::MIN,
            ..Self::default()
        }
    }

    /// The account's open lots in hundredths: the sum of its open volumes.
    #[must_use]
    pub fn open_hundredths(&self) -> i64 {
        self.positions.iter().map(|p| p.open_hundredths).sum()
    }

    /// Whether `deal_id` was already processed.
    #[must_use]
    pub fn is_duplicate(&self, deal_id: i64) -> bool {
        self.seen.binary_search(&deal_id).is_ok()
    }

    /// Take `deal_id` (it was not taken: see [`DealState::is_duplicate`]).
    pub fn take_id(&mut self, deal_id: i64) {
        match self.seen.last() {
            Some(&last) if last >= deal_id => {
                let at = self.seen.partition_point(|&id| id < deal_id);
                if self.seen.get(at) != Some(&deal_id) {
                    self.seen.insert(at, deal_id);
                }
            }
            _ => self.seen.push(deal_id),
        }
    }

    /// How many deal ids are held.
    #[must_use]
    pub fn ids_held(&self) -> usize {
        self.seen.len()
    }

    /// Apply a processed deal to the positions (`rules.md`, "Positions"): an `in`
    /// deal opens the position or adds to it whatever its side and symbol say; an
    /// `out` deal subtracts its volume (never below zero) and closes the position
    /// at zero; an `out` deal for a position that is not open changes nothing.
    pub fn apply(&mut self, deal: &Deal<'_>) -> Update {
        let at = self
            .positions
            .iter()
            .position(|p| p.position_id == deal.position_id);
        match (deal.entry, at) {
            (Entry::In, Some(i)) => {
                let p = &mut self.positions[i];
                p.open_hundredths = p.open_hundredths.saturating_add(deal.hundredths);
                Update::In(i)
            }
            (Entry::In, None) => {
                self.positions.push(Position {
                    position_id: deal.position_id,
                    symbol: deal.symbol.to_owned(),
                    side: deal.side,
                    open_hundredths: deal.hundredths,
                    opened_at: deal.ts,
                    size_recorded: false,
                });
                Update::In(self.positions.len() - 1)
            }
            (Entry::Out, None) => Update::Unmatched,
            (Entry::Out, Some(i)) => {
                let p = &mut self.positions[i];
                p.open_hundredths = (p.open_hundredths - deal.hundredths).max(0);
                if p.open_hundredths > 0 {
                    return Update::Reduced;
                }
                let closed = self.positions.remove(i);
                Update::Closed {
                    opened_at: closed.opened_at,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deal(id: i64, position_id: i64, entry: Entry, lots: f64, ts: i64) -> DealInput<'static> {
        DealInput {
            account_id: Some(1),
            ts: Some(ts),
            deal_id: Some(id),
            position_id: Some(position_id),
            symbol: Some("EURUSD"),
            side: Some(Side::Buy),
            volume: Some(lots),
            price: Some(1.1),
            entry: Some(entry),
            before_tick: 0,
        }
    }

    fn apply(s: &mut DealState, d: &DealInput<'_>) -> Update {
        s.apply(&d.checked().expect("a valid deal"))
    }

    #[test]
    fn positions_open_add_reduce_close() {
        let mut s = DealState::new();
        assert_eq!(
            apply(&mut s, &deal(1, 10, Entry::In, 1.0, 100)),
            Update::In(0)
        );
        assert_eq!(
            apply(&mut s, &deal(2, 11, Entry::In, 0.5, 200)),
            Update::In(1)
        );
        // Adding keeps opened_at, side and symbol, whatever the adding deal says.
        let mut add = deal(3, 10, Entry::In, 1.005, 300);
        add.side = Some(Side::Sell);
        add.symbol = Some("XAUUSD");
        assert_eq!(apply(&mut s, &add), Update::In(0));
        assert_eq!(s.positions[0].open_hundredths, 200);
        assert_eq!(s.positions[0].opened_at, 100);
        assert_eq!(s.positions[0].side, Side::Buy);
        assert_eq!(s.positions[0].symbol, "EURUSD");
        assert_eq!(s.open_hundredths(), 250);
        assert_eq!(
            apply(&mut s, &deal(4, 10, Entry::Out, 0.75, 400)),
            Update::Reduced
        );
        assert_eq!(s.open_hundredths(), 175);
        // An out larger than the open volume closes the position, never below 0.
        assert_eq!(
            apply(&mut s, &deal(5, 10, Entry::Out, 9.0, 500)),
            Update::Closed { opened_at: 100 }
        );
        assert_eq!(s.open_hundredths(), 50);
        assert_eq!(s.positions.len(), 1);
        // An out for a position that is not open changes nothing.
        assert_eq!(
            apply(&mut s, &deal(6, 10, Entry::Out, 1.0, 600)),
            Update::Unmatched
        );
        assert_eq!(s.open_hundredths(), 50);
        // Reopening a closed position id is a new position.
        assert_eq!(
            apply(&mut s, &deal(7, 10, Entry::In, 0.01, 700)),
            Update::In(1)
        );
        assert_eq!(s.positions[1].opened_at, 700);
        assert!(!s.positions[1].size_recorded);
    }

    #[test]
    fn bad_values_are_not_deals() {
        let good = deal(1, 1, Entry::In, 1.0, 0);
        assert!(good.checked().is_some());
        let cases: [fn(&mut DealInput<'static>); 10] = [
            |d| d.volume = Some(0.004),
            |d| d.volume = Some(0.0),
            |d| d.volume = Some(-1.0),
            |d| d.volume = Some(f64::NAN),
            |d| d.price = Some(0.0),
            |d| d.price = Some(f64::INFINITY),
            |d| d.symbol = Some(""),
            |d| d.side = None,
            |d| d.entry = None,
            |d| d.deal_id = None,
        ];
        for (i, spoil) in cases.iter().enumerate() {
            let mut d = good;
            spoil(&mut d);
            assert!(d.checked().is_none(), "case {i}");
        }
        let mut half = good;
        half.volume = Some(0.005); // 0.5 hundredths round to 0 (ties to even)
        assert!(half.checked().is_none());
        half.volume = Some(0.015); // 1.5 round to 2
        assert_eq!(half.checked().map(|d| d.hundredths), Some(2));
    }

    #[test]
    fn deal_ids_are_exact_in_any_order() {
        let mut s = DealState::new();
        for id in [5, 7, 6, 1, 9, 7] {
            if !s.is_duplicate(id) {
                s.take_id(id);
            }
        }
        assert_eq!(s.ids_held(), 5);
        for id in [1, 5, 6, 7, 9] {
            assert!(s.is_duplicate(id));
        }
        for id in [0, 2, 8, 10] {
            assert!(!s.is_duplicate(id));
        }
    }
}
