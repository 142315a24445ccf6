//! Stats calendar arithmetic for any bundled time zone and any instant: the
//! bucket of an instant starts no later than it, bucket starts only go
//! forward, a range lists the bucket of every instant in it, and the clock
//! table the scripts get picks the same buckets as the calendar. Never a
//! panic.

#![no_main]

use std::sync::OnceLock;

use cachecoord::calendar::{Calendar, Granularity, MINUTE_MS};
use libfuzzer_sys::fuzz_target;

fn zones() -> &'static Vec<String> {
    static ZONES: OnceLock<Vec<String>> = OnceLock::new();
    ZONES.get_or_init(|| {
        let mut names: Vec<String> = jiff::tz::db().available().map(|n| n.to_string()).collect();
        names.sort();
        names
    })
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 12 {
        return;
    }
    let zone = &zones()[usize::from(u16::from_le_bytes([data[0], data[1]])) % zones().len()];
    let Ok(tz) = jiff::tz::TimeZone::get(zone) else { return };
    let calendar = Calendar::new(tz);
    let ms = i64::from_le_bytes(data[2..10].try_into().expect("8 bytes"));
    // Within years 0001..9999 most of the time, anywhere otherwise.
    let ms = if data[10] & 1 == 0 {
        ms.rem_euclid(315_537_897_599_999 + 62_135_596_800_000) - 62_135_596_800_000
    } else {
        ms
    };
    let g = match data[11] % 3 {
        0 => Granularity::Minute,
        1 => Granularity::Hour,
        _ => Granularity::Day,
    };
    let Ok(start) = calendar.bucket_start(g, ms) else { return };
    assert!(start <= ms, "{zone} {g:?}: bucket {start} after {ms}");
    if let Ok(next) = calendar.next_start(g, start) {
        assert!(next > start, "{zone} {g:?}: no step forward from {start}");
    }
    // Where a half-hour offset change turns clocks back (Lord Howe), hour
    // buckets overlap, so a bucket need not end where the next starts; what
    // must hold is that GetSeries over a range lists the bucket of every
    // instant in it: no increment is lost.
    let span = i64::from(data.get(12).copied().unwrap_or(0)) * MINUTE_MS * 7;
    if let Ok(starts) = calendar.buckets(g, ms, ms.saturating_add(span), 64) {
        assert_eq!(starts.first(), Some(&start));
        assert!(starts.windows(2).all(|w| w[0] < w[1]), "{zone} {g:?}: starts not increasing");
        let mut t = Some(ms);
        while let Some(at) = t.filter(|at| *at <= ms.saturating_add(span)) {
            let bucket = calendar.bucket_start(g, at).expect("within the range");
            assert!(starts.contains(&bucket), "{zone} {g:?}: {at} lands in {bucket}, not listed for [{ms}, +{span}]");
            t = at.checked_add(7 * MINUTE_MS);
        }
    }
    if let Ok(table) = calendar.clock_table(ms) {
        // Redis's clock within a day of the service's.
        let redis_ms = ms + i64::from(i16::from_le_bytes([data[10], data[11]])) * 2_637;
        if let Some((pick_start, pick_end)) = table.pick(g, redis_ms) {
            assert_eq!(Ok(pick_start), calendar.bucket_start(g, redis_ms), "{zone} {g:?} at {redis_ms}");
            assert!(pick_end > redis_ms);
        }
    }
});
