//! Local trading days: which day a UTC instant belongs to, and when that day ends.
//!
//! Day `d` (a calendar date) ends at the local wall time `(d + 1) 00:00 − shift`,
//! where `shift = (24 h − rollover) mod 24 h`; so with a 17:00 rollover Sunday 17:00
//! opens Monday's day. The end is the first UTC instant whose local wall time is at
//! or after that time (the end of a DST gap, the first instant of a DST fold), which
//! keeps days monotone in time.

use std::collections::HashMap;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, LocalResult, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;

/// Days from 0001-01-01 (chrono's CE day 1) to 1970-01-01.
const UNIX_EPOCH_CE_DAYS: i32 = 719_163;

/// Maps instants to local trading days for one time zone and rollover.
#[derive(Clone, Copy, Debug)]
pub struct DayClock {
    tz: Tz,
    shift_minutes: i64,
}

impl DayClock {
    /// A clock for an IANA zone name and a rollover in minutes after local midnight.
    ///
    /// # Panics
    /// If `timezone` is not a zone name; rule sets are validated before this.
    #[must_use]
    pub fn new(timezone: &str, rollover_minutes: u16) -> Self {
        let tz = Tz::from_str(timezone).expect("time zone validated with the rule set");
        Self {
            tz,
            shift_minutes: (1440 - i64::from(rollover_minutes)) % 1440,
        }
    }

    /// The day (days since 1970-01-01) of the instant `ts_us` (UTC microseconds) and
    /// the UTC instant at which that day ends.
    ///
    /// Every phase on the same zone and rollover crosses the same day boundaries,
    /// so their ends are kept per thread in a table of consecutive days (each end
    /// computed once by [`DayClock::day_end`]); an instant inside the table is
    /// located by a binary search, with the same answer as the time zone
    /// arithmetic (day ends grow strictly with the day).
    #[must_use]
    pub fn locate(&self, ts_us: i64) -> (i32, i64) {
        let key = (self.tz, self.shift_minutes);
        let hit = DAY_ENDS.with(|c| c.borrow().get(&key).and_then(|t| t.find(ts_us)));
        if let Some(found) = hit {
            return found;
        }
        let (day, end) = self.locate_uncached(ts_us);
        DAY_ENDS.with(|c| {
            c.borrow_mut()
                .entry(key)
                .or_insert_with(DayEnds::default)
                .cover(self, day);
        });
        (day, end)
    }

    /// [`DayClock::locate`] by the time zone arithmetic alone.
    #[must_use]
    pub fn locate_uncached(&self, ts_us: i64) -> (i32, i64) {
        let utc = DateTime::from_timestamp_micros(ts_us).unwrap_or_default();
        let local = utc.with_timezone(&self.tz).naive_local();
        let shifted = local + Duration::minutes(self.shift_minutes);
        let mut day = shifted.date().num_days_from_ce() - UNIX_EPOCH_CE_DAYS;
        // The wall-clock guess is off by one at most in a DST fold or gap.
        loop {
            let end = self.day_end(day);
            if ts_us >= end {
                day += 1;
            } else if ts_us < self.day_end(day - 1) {
                day -= 1;
            } else {
                return (day, end);
            }
        }
    }

    /// The UTC instant (microseconds) at which day `day` ends.
    #[must_use]
    pub fn day_end(&self, day: i32) -> i64 {
        let date =
            NaiveDate::from_num_days_from_ce_opt(day + 1 + UNIX_EPOCH_CE_DAYS).unwrap_or_default();
        let wall =
            date.and_hms_opt(0, 0, 0).unwrap_or_default() - Duration::minutes(self.shift_minutes);
        first_instant_at_or_after(self.tz, wall)
    }
}

/// Most days one table keeps (about 180 years); a day further away starts a new
/// table.
const MAX_CACHED_DAYS: i32 = 1 << 16;

thread_local! {
    /// The day ends of each (zone, shift) seen on this thread.
    static DAY_ENDS: std::cell::RefCell<HashMap<(Tz, i64), DayEnds>> =
        std::cell::RefCell::new(HashMap::new());
}

/// `ends[k]` is the end of day `first - 1 + k`: the days `first..first + ends.len() - 1`
/// with the start (the previous day's end) of the first.
#[derive(Default)]
struct DayEnds {
    first: i32,
    ends: Vec<i64>,
}

impl DayEnds {
    /// The day of `ts_us` and its end, if the table holds that day.
    fn find(&self, ts_us: i64) -> Option<(i32, i64)> {
        let (&lo, &hi) = (self.ends.first()?, self.ends.last()?);
        if ts_us < lo || ts_us >= hi {
            return None;
        }
        // ends[k - 1] <= ts < ends[k], k >= 1.
        let k = self.ends.partition_point(|&e| e <= ts_us);
        let day = self.first - 1 + i32::try_from(k).ok()?;
        Some((day, self.ends[k]))
    }

    /// Grow the table to hold `day` (or start it again at `day` if far away).
    fn cover(&mut self, clock: &DayClock, day: i32) {
        let last = self.first - 2 + i32::try_from(self.ends.len()).unwrap_or(i32::MAX);
        if self.ends.is_empty()
            || day < self.first - MAX_CACHED_DAYS
            || day > last + MAX_CACHED_DAYS
            || last - self.first > MAX_CACHED_DAYS
        {
            self.first = day;
            self.ends = vec![clock.day_end(day - 1), clock.day_end(day)];
        } else if day > last {
            self.ends.extend((last + 1..=day).map(|d| clock.day_end(d)));
        } else if day < self.first {
            let mut ends: Vec<i64> = (day - 1..self.first - 1)
                .map(|d| clock.day_end(d))
                .collect();
            ends.extend_from_slice(&self.ends);
            self.ends = ends;
            self.first = day;
        }
    }
}

/// The first UTC instant (microseconds) whose local wall time in `tz` is at or
/// after `wall`: in a DST gap the end of the gap, in a fold the first instant.
fn first_instant_at_or_after(tz: Tz, wall: NaiveDateTime) -> i64 {
    match tz.from_local_datetime(&wall) {
        LocalResult::Single(t) => t.timestamp_micros(),
        LocalResult::Ambiguous(a, b) => a.timestamp_micros().min(b.timestamp_micros()),
        LocalResult::None => {
            // Inside a DST gap: the first valid wall minute after it is the
            // transition instant itself.
            for minutes in 1..=2 * 1440 {
                match tz.from_local_datetime(&(wall + Duration::minutes(minutes))) {
                    LocalResult::Single(t) => return t.timestamp_micros(),
                    LocalResult::Ambiguous(a, b) => {
                        return a.timestamp_micros().min(b.timestamp_micros())
                    }
                    LocalResult::None => {}
                }
            }
            wall.and_utc().timestamp_micros()
        }
    }
}

/// The weekly `weekend_close` instants of one time zone (`rules.md`,
/// `weekend_hold`): on every local date whose weekday is the close's, the first UTC
/// instant whose local wall time is at or after the close's time, found as a day
/// boundary is (the end of a DST gap, the first instant of a fold). The instants
/// grow with the date, so "the latest W ≤ ts" and "the first W > ts" are each a
/// walk over the dates next to `ts`'s local date.
#[derive(Clone, Copy, Debug)]
pub struct WeeklyClock {
    tz: Tz,
    weekday: u32,
    minutes: u32,
}

impl WeeklyClock {
    /// A clock for an IANA zone, a weekday (0 = Monday) and minutes after midnight.
    ///
    /// # Panics
    /// If `timezone` is not a zone name; rule sets are validated before this.
    #[must_use]
    pub fn new(timezone: &str, weekday: u8, minutes: u16) -> Self {
        let tz = Tz::from_str(timezone).expect("time zone validated with the rule set");
        Self {
            tz,
            weekday: u32::from(weekday % 7),
            minutes: u32::from(minutes),
        }
    }

    fn local_date(&self, ts_us: i64) -> NaiveDate {
        let utc = DateTime::from_timestamp_micros(ts_us).unwrap_or_default();
        utc.with_timezone(&self.tz).date_naive()
    }

    /// The instant of the close on local date `date`.
    fn on(&self, date: NaiveDate) -> i64 {
        let wall = date
            .and_hms_opt(self.minutes / 60, self.minutes % 60, 0)
            .unwrap_or_default();
        first_instant_at_or_after(self.tz, wall)
    }

    fn is_close_day(&self, date: NaiveDate) -> bool {
        date.weekday().num_days_from_monday() == self.weekday
    }

    /// The latest weekly instant `W ≤ ts_us`.
    #[must_use]
    pub fn latest_at_or_before(&self, ts_us: i64) -> i64 {
        let local = self.local_date(ts_us);
        // The close on the day after `ts`'s local date can still be ≤ ts (a close
        // late in the evening inside a DST gap ends at the gap's end); from there
        // down, the first close ≤ ts is the latest one.
        for back in 0..16 {
            let date = local + Duration::days(1 - back);
            if self.is_close_day(date) {
                let w = self.on(date);
                if w <= ts_us {
                    return w;
                }
            }
        }
        i64::MIN
    }

    /// The first weekly instant `W > ts_us`.
    #[must_use]
    pub fn first_after(&self, ts_us: i64) -> i64 {
        let local = self.local_date(ts_us);
        for ahead in 0..16 {
            let date = local + Duration::days(ahead - 1);
            if self.is_close_day(date) {
                let w = self.on(date);
                if w > ts_us {
                    return w;
                }
            }
        }
        i64::MAX
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn cached_days_locate_as_the_time_zone_arithmetic() {
        // Instants an hour and a bit apart over two years (DST changes in both
        // directions), visited out of order so the table grows both ways and
        // restarts; three zones and rollovers.
        let start = 1_735_689_600_000_000_i64; // 2025-01-01
        let step = 3_900_000_000_i64;
        let mut order: Vec<i64> = (0..2 * 365 * 24).collect();
        let mut x = 88_172_645_463_325_252_u64;
        for i in (1..order.len()).rev() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            order.swap(i, (x % (i as u64 + 1)) as usize);
        }
        for (tz, rollover) in [
            ("Europe/Prague", 0),
            ("America/New_York", 1020),
            ("Asia/Kolkata", 90),
        ] {
            let c = DayClock::new(tz, rollover);
            for &k in &order {
                let ts = start + k * step;
                assert_eq!(c.locate(ts), c.locate_uncached(ts), "{tz} {ts}");
            }
            // A day far away restarts the table; near ones still agree.
            let far = start + 400 * 365 * 86_400_000_000;
            assert_eq!(c.locate(far), c.locate_uncached(far));
            assert_eq!(c.locate(start), c.locate_uncached(start));
        }
    }

    use super::*;

    fn us(s: &str) -> i64 {
        DateTime::parse_from_rfc3339(s).unwrap().timestamp_micros()
    }

    fn day(s: &str) -> i32 {
        NaiveDate::from_str(s).unwrap().num_days_from_ce() - UNIX_EPOCH_CE_DAYS
    }

    #[test]
    fn utc_midnight_days() {
        let c = DayClock::new("UTC", 0);
        assert_eq!(
            c.locate(us("2026-01-05T23:59:59Z")),
            (day("2026-01-05"), us("2026-01-06T00:00:00Z"))
        );
        assert_eq!(c.locate(us("2026-01-06T00:00:00Z")).0, day("2026-01-06"));
    }

    #[test]
    fn rollover_names_the_day_it_ends_on() {
        // 17:00 New York: Sunday 17:00 opens Monday's day.
        let c = DayClock::new("America/New_York", 17 * 60);
        assert_eq!(c.locate(us("2026-01-04T22:00:00Z")).0, day("2026-01-05")); // Sun 17:00 EST
        assert_eq!(c.locate(us("2026-01-04T21:59:59Z")).0, day("2026-01-04"));
        assert_eq!(c.locate(us("2026-01-05T21:59:59Z")).0, day("2026-01-05")); // Mon 16:59:59
    }

    #[test]
    fn dst_spring_forward_gap_rollover() {
        // Europe/Prague jumps 02:00 → 03:00 on 2026-03-29; a 02:30 rollover falls in
        // the gap, so the day ends at the transition, 01:00 UTC.
        let c = DayClock::new("Europe/Prague", 150);
        assert_eq!(c.day_end(day("2026-03-29")), us("2026-03-29T01:00:00Z"));
    }

    #[test]
    fn dst_fold_rollover_is_monotone() {
        // 2026-10-25 Prague: 03:00 CEST → 02:00 CET; 02:30 happens twice, the first
        // (00:30 UTC) ends the day and the second stays in the new day.
        let c = DayClock::new("Europe/Prague", 150);
        assert_eq!(c.day_end(day("2026-10-25")), us("2026-10-25T00:30:00Z"));
        assert_eq!(c.locate(us("2026-10-25T01:10:00Z")).0, day("2026-10-26"));
        assert_eq!(c.locate(us("2026-10-25T00:29:59Z")).0, day("2026-10-25"));
    }

    #[test]
    fn weekly_close_in_utc() {
        // 2026-01-09 is a Friday.
        let w = WeeklyClock::new("UTC", 4, 22 * 60);
        let fri = us("2026-01-09T22:00:00Z");
        assert_eq!(w.latest_at_or_before(fri), fri);
        assert_eq!(w.latest_at_or_before(fri - 1), fri - 7 * 86_400_000_000);
        assert_eq!(w.first_after(fri - 1), fri);
        assert_eq!(w.first_after(fri), fri + 7 * 86_400_000_000);
        assert_eq!(w.latest_at_or_before(us("2026-01-12T08:00:00Z")), fri);
    }

    #[test]
    fn weekly_close_follows_dst() {
        // New York springs forward on Sunday 2026-03-08: Friday 03-06 17:00 EST is
        // 22:00 UTC, Friday 03-13 17:00 EDT is 21:00 UTC.
        let w = WeeklyClock::new("America/New_York", 4, 17 * 60);
        assert_eq!(
            w.first_after(us("2026-03-06T12:00:00Z")),
            us("2026-03-06T22:00:00Z")
        );
        assert_eq!(
            w.first_after(us("2026-03-06T22:00:00Z")),
            us("2026-03-13T21:00:00Z")
        );
        assert_eq!(
            w.latest_at_or_before(us("2026-03-13T21:59:00Z")),
            us("2026-03-13T21:00:00Z")
        );
        assert_eq!(
            w.latest_at_or_before(us("2026-03-13T20:59:59Z")),
            us("2026-03-06T22:00:00Z")
        );
        // London springs forward on Sunday 2026-03-29 at 01:00 UTC: a close at
        // Sunday 01:30 falls in the gap and is the gap's end, 01:00 UTC.
        let london = WeeklyClock::new("Europe/London", 6, 90);
        assert_eq!(
            london.first_after(us("2026-03-28T12:00:00Z")),
            us("2026-03-29T01:00:00Z")
        );
        // London falls back on Sunday 2026-10-25: 01:30 happens twice, the first
        // (00:30 UTC) is the close.
        assert_eq!(
            london.first_after(us("2026-10-24T12:00:00Z")),
            us("2026-10-25T00:30:00Z")
        );
        assert_eq!(
            london.latest_at_or_before(us("2026-10-25T01:10:00Z")),
            us("2026-10-25T00:30:00Z")
        );
    }

    #[test]
    fn midnight_days_across_dst() {
        let c = DayClock::new("Europe/Prague", 0);
        assert_eq!(
            c.locate(us("2026-03-28T23:00:00Z")),
            (day("2026-03-29"), us("2026-03-29T22:00:00Z"))
        );
    }
}
