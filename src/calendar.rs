//! Time buckets of the Stats service, in the configured IANA time zone.
//!
//! Every instant is a Unix time in milliseconds. A bucket is named by the
//! instant it starts at, so a bucket key means the same thing whatever the
//! zone's offset was when it was written:
//! - minute buckets are whole UTC minutes (every zone in use today has an
//!   offset of whole minutes, so they are local minutes too);
//! - an hour bucket starts at the local time truncated to the hour, at the
//!   offset in force at that instant (for whole-hour offsets, UTC hours);
//! - a day bucket starts at the first instant of the local calendar day, so a
//!   day lasts 23 or 25 hours when daylight saving time changes.
//!
//! The Increment and AddUnique scripts pick the bucket of Redis `TIME`, which
//! Rust does not know; [`Calendar::clock_table`] gives them the local day
//! starts and the offsets in force around the service's own now, and the
//! scripts apply the same rules as [`Calendar::bucket_start`]
//! ([`ClockTable::pick`] is that rule written in Rust, for the tests).

use jiff::{Timestamp, civil::Date, tz::TimeZone};

/// One minute, in milliseconds.
pub const MINUTE_MS: i64 = 60_000;
/// One hour, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// The size of a time series bucket.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Granularity {
    /// Whole minutes.
    Minute,
    /// Local hours.
    Hour,
    /// Local calendar days.
    Day,
}

impl Granularity {
    /// The letter that names the granularity in bucket keys.
    pub fn tag(self) -> &'static str {
        match self {
            Self::Minute => "m",
            Self::Hour => "h",
            Self::Day => "d",
        }
    }
}

/// Why a range of buckets cannot be listed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeError {
    /// The range covers more than this many buckets.
    TooMany(usize),
    /// An instant lies outside the years the time zone database covers.
    OutOfRange,
}

/// Bucket arithmetic in one time zone.
#[derive(Clone, Debug)]
pub struct Calendar {
    /// The zone whose hours and days bound the buckets.
    tz: TimeZone,
}

/// Local day starts and UTC offsets around an instant, for the scripts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClockTable {
    /// Consecutive local day starts (Unix ms): day `i` is
    /// `[day_starts[i], day_starts[i + 1])`.
    pub day_starts: Vec<i64>,
    /// `(from, offset)` pairs, both ms, ascending: from `from` on, the zone is
    /// `offset` ahead of UTC. The first `from` is `day_starts[0]`.
    pub offsets: Vec<(i64, i64)>,
}

fn timestamp(ms: i64) -> Result<Timestamp, RangeError> {
    Timestamp::from_millisecond(ms).map_err(|_| RangeError::OutOfRange)
}

impl Calendar {
    /// A calendar in `tz`.
    pub fn new(tz: TimeZone) -> Self {
        Self { tz }
    }

    /// The first instant of local day `date`.
    fn day_start(&self, date: Date) -> Result<i64, RangeError> {
        let start = date.to_zoned_datetime(self.tz.clone()).map_err(|_| RangeError::OutOfRange)?;
        Ok(start.timestamp().as_millisecond())
    }

    /// The local calendar day of instant `ms`.
    fn date(&self, ms: i64) -> Result<Date, RangeError> {
        Ok(timestamp(ms)?.to_zoned_datetime(self.tz.clone()).date())
    }

    /// The zone's UTC offset at `ms`, in ms.
    fn offset_ms(&self, ms: i64) -> Result<i64, RangeError> {
        Ok(i64::from(self.tz.to_offset(timestamp(ms)?).seconds()) * 1000)
    }

    /// The start of the bucket of granularity `g` that contains `ms`.
    pub fn bucket_start(&self, g: Granularity, ms: i64) -> Result<i64, RangeError> {
        match g {
            Granularity::Minute => ms.div_euclid(MINUTE_MS).checked_mul(MINUTE_MS).ok_or(RangeError::OutOfRange),
            Granularity::Hour => {
                let offset = self.offset_ms(ms)?;
                Ok((ms + offset).div_euclid(HOUR_MS) * HOUR_MS - offset)
            }
            Granularity::Day => self.day_start(self.date(ms)?),
        }
    }

    /// The start of the bucket after the one starting at `start`.
    pub fn next_start(&self, g: Granularity, start: i64) -> Result<i64, RangeError> {
        match g {
            // Checked: `start` may be any i64 (found by the calendar fuzz target).
            Granularity::Minute => start.checked_add(MINUTE_MS).ok_or(RangeError::OutOfRange),
            Granularity::Hour => {
                let next = self.bucket_start(g, start + HOUR_MS)?;
                // Only a half-hour offset change could land behind; never step back.
                Ok(if next > start { next } else { start + HOUR_MS })
            }
            Granularity::Day => {
                let tomorrow = self.date(start)?.tomorrow().map_err(|_| RangeError::OutOfRange)?;
                self.day_start(tomorrow)
            }
        }
    }

    /// The starts of every bucket that overlaps `[start, end]` (`start <= end`),
    /// oldest first; at most `max` of them.
    pub fn buckets(&self, g: Granularity, start: i64, end: i64, max: usize) -> Result<Vec<i64>, RangeError> {
        let mut starts = Vec::new();
        let mut bucket = self.bucket_start(g, start)?;
        while bucket <= end {
            if starts.len() == max {
                return Err(RangeError::TooMany(max));
            }
            starts.push(bucket);
            bucket = self.next_start(g, bucket)?;
        }
        Ok(starts)
    }

    /// The table the scripts pick Redis `TIME`'s buckets from: yesterday
    /// through the day after tomorrow around `now_ms`, so a Redis clock a day
    /// off the service's still finds its day.
    pub fn clock_table(&self, now_ms: i64) -> Result<ClockTable, RangeError> {
        let mut date = self.date(now_ms)?.yesterday().map_err(|_| RangeError::OutOfRange)?;
        let mut day_starts = Vec::with_capacity(5);
        for _ in 0..5 {
            day_starts.push(self.day_start(date)?);
            date = date.tomorrow().map_err(|_| RangeError::OutOfRange)?;
        }
        let (first, last) = (day_starts[0], day_starts[4]);
        let mut offsets = vec![(first, self.offset_ms(first)?)];
        for transition in self.tz.following(timestamp(first)?) {
            let at = transition.timestamp().as_millisecond();
            if at >= last {
                break;
            }
            offsets.push((at, i64::from(transition.offset().seconds()) * 1000));
        }
        Ok(ClockTable { day_starts, offsets })
    }
}

impl ClockTable {
    /// What the scripts compute for Redis time `ms`: `(start, end)` of its
    /// bucket of granularity `g`, or `None` when `ms` is outside the table.
    pub fn pick(&self, g: Granularity, ms: i64) -> Option<(i64, i64)> {
        let (&first, &last) = (self.day_starts.first()?, self.day_starts.last()?);
        if ms < first || ms >= last {
            return None;
        }
        match g {
            Granularity::Minute => {
                let start = ms - ms.rem_euclid(MINUTE_MS);
                Some((start, start + MINUTE_MS))
            }
            Granularity::Hour => {
                let offset = self.offsets.iter().take_while(|(from, _)| *from <= ms).last()?.1;
                let start = (ms + offset).div_euclid(HOUR_MS) * HOUR_MS - offset;
                Some((start, start + HOUR_MS))
            }
            Granularity::Day => {
                let i = self.day_starts.iter().rposition(|start| *start <= ms)?;
                Some((self.day_starts[i], *self.day_starts.get(i + 1)?))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calendar(zone: &str) -> Calendar {
        Calendar::new(TimeZone::get(zone).expect("bundled zone"))
    }

    fn ms(instant: &str) -> i64 {
        instant.parse::<Timestamp>().expect("instant").as_millisecond()
    }

    #[test]
    fn shanghai_evening_utc_is_the_next_local_day() {
        let shanghai = calendar("Asia/Shanghai");
        // 16:30 UTC is 00:30 the next day in Shanghai (UTC+8).
        let at = ms("2026-03-01T16:30:00Z");
        assert_eq!(shanghai.bucket_start(Granularity::Day, at), Ok(ms("2026-03-01T16:00:00Z")));
        assert_eq!(shanghai.bucket_start(Granularity::Hour, at), Ok(ms("2026-03-01T16:00:00Z")));
        assert_eq!(shanghai.bucket_start(Granularity::Minute, at), Ok(at));
        // 15:59:59.999 UTC is still the previous local day.
        assert_eq!(
            shanghai.bucket_start(Granularity::Day, ms("2026-03-01T15:59:59.999Z")),
            Ok(ms("2026-02-28T16:00:00Z"))
        );
        // In UTC the same instant is in March 1st.
        assert_eq!(calendar("UTC").bucket_start(Granularity::Day, at), Ok(ms("2026-03-01T00:00:00Z")));
    }

    #[test]
    fn half_hour_zones_have_half_hour_aligned_hours() {
        let kolkata = calendar("Asia/Kolkata");
        assert_eq!(kolkata.bucket_start(Granularity::Hour, ms("2026-03-01T10:20:00Z")), Ok(ms("2026-03-01T09:30:00Z")));
        assert_eq!(kolkata.bucket_start(Granularity::Day, ms("2026-03-01T10:20:00Z")), Ok(ms("2026-02-28T18:30:00Z")));
    }

    #[test]
    fn dst_days_have_23_and_25_hours() {
        let ny = calendar("America/New_York");
        // 2026-03-08: clocks go 02:00 → 03:00 (EST −5 → EDT −4).
        let spring = ny.buckets(Granularity::Hour, ms("2026-03-08T05:00:00Z"), ms("2026-03-09T03:59:59Z"), 1000);
        assert_eq!(spring.map(|b| b.len()), Ok(23));
        let day = ny.bucket_start(Granularity::Day, ms("2026-03-08T12:00:00Z")).unwrap();
        assert_eq!(day, ms("2026-03-08T05:00:00Z"));
        assert_eq!(ny.next_start(Granularity::Day, day), Ok(ms("2026-03-09T04:00:00Z")));
        // 2026-11-01: clocks go 02:00 → 01:00 (EDT → EST): 25 hours.
        let day = ny.bucket_start(Granularity::Day, ms("2026-11-01T12:00:00Z")).unwrap();
        let next = ny.next_start(Granularity::Day, day).unwrap();
        assert_eq!((next - day) / HOUR_MS, 25);
        let fall = ny.buckets(Granularity::Hour, day, next - 1, 1000).unwrap();
        assert_eq!(fall.len(), 25);
        assert!(fall.windows(2).all(|w| w[1] - w[0] == HOUR_MS), "hours are contiguous");
    }

    #[test]
    fn buckets_overlap_the_inclusive_range_and_stop_at_the_maximum() {
        let utc = calendar("UTC");
        let t = ms("2026-03-01T10:00:00Z");
        // An end exactly on a boundary includes the bucket starting there.
        assert_eq!(utc.buckets(Granularity::Minute, t, t + MINUTE_MS, 10), Ok(vec![t, t + MINUTE_MS]));
        assert_eq!(utc.buckets(Granularity::Minute, t + 1, t + MINUTE_MS - 1, 10), Ok(vec![t]));
        assert_eq!(utc.buckets(Granularity::Minute, t, t + 999 * MINUTE_MS, 1000).map(|b| b.len()), Ok(1000));
        assert_eq!(utc.buckets(Granularity::Minute, t, t + 1000 * MINUTE_MS, 1000), Err(RangeError::TooMany(1000)));
        assert_eq!(utc.buckets(Granularity::Day, t, t, 1), Ok(vec![ms("2026-03-01T00:00:00Z")]));
    }

    #[test]
    fn clock_table_picks_what_bucket_start_computes() {
        // Around both New York transitions, Lord Howe's half-hour DST, and a
        // plain zone: every 7 minutes over the table's span.
        for (zone, now) in [
            ("America/New_York", "2026-03-08T12:00:00Z"),
            ("America/New_York", "2026-11-01T12:00:00Z"),
            ("Australia/Lord_Howe", "2026-04-04T15:00:00Z"),
            ("Asia/Shanghai", "2026-03-01T16:30:00Z"),
        ] {
            let calendar = calendar(zone);
            let table = calendar.clock_table(ms(now)).unwrap();
            assert_eq!(table.day_starts.len(), 5);
            let (first, last) = (table.day_starts[0], table.day_starts[4]);
            let hours = calendar.buckets(Granularity::Hour, first, last, 1000).unwrap();
            let mut t = first;
            while t < last {
                for g in [Granularity::Minute, Granularity::Hour, Granularity::Day] {
                    let (start, _) = table.pick(g, t).unwrap();
                    assert_eq!(Ok(start), calendar.bucket_start(g, t), "{zone} {g:?} at {t}");
                }
                let (_, day_end) = table.pick(Granularity::Day, t).unwrap();
                assert_eq!(
                    Ok(day_end),
                    calendar.next_start(Granularity::Day, calendar.bucket_start(Granularity::Day, t).unwrap())
                );
                // A GetSeries over the range lists the bucket an increment at t lands in.
                assert!(hours.contains(&calendar.bucket_start(Granularity::Hour, t).unwrap()), "{zone} hour at {t}");
                t += 7 * MINUTE_MS;
            }
            assert_eq!(table.pick(Granularity::Day, first - 1), None);
            assert_eq!(table.pick(Granularity::Day, last), None);
        }
    }

    #[test]
    fn minutes_at_the_ends_of_the_i64_range_are_out_of_range() {
        // Found by the calendar fuzz target (overflow).
        let utc = calendar("UTC");
        let start = utc.bucket_start(Granularity::Minute, i64::MAX).unwrap();
        assert_eq!(utc.next_start(Granularity::Minute, start), Err(RangeError::OutOfRange));
        assert_eq!(utc.buckets(Granularity::Minute, start, i64::MAX, 10), Err(RangeError::OutOfRange));
        // The first minute would start before i64::MIN.
        assert_eq!(utc.bucket_start(Granularity::Minute, i64::MIN), Err(RangeError::OutOfRange));
    }

    #[test]
    fn clock_table_lists_transitions() {
        let table = calendar("America/New_York").clock_table(ms("2026-03-08T12:00:00Z")).unwrap();
        assert_eq!(
            table.offsets,
            vec![(ms("2026-03-07T05:00:00Z"), -5 * HOUR_MS), (ms("2026-03-08T07:00:00Z"), -4 * HOUR_MS)]
        );
        let table = calendar("UTC").clock_table(ms("2026-03-08T12:00:00Z")).unwrap();
        assert_eq!(table.offsets, vec![(ms("2026-03-07T00:00:00Z"), 0)]);
    }
}
