//! Stats operations: counters with minute/hour/day buckets, activity sets and
//! daily HyperLogLogs. One Redis round trip per call.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use deadpool_redis::redis::{self, Script, ScriptInvocation};

use super::Redis;
use crate::{
    calendar::{Calendar, ClockTable, Granularity},
    error::{Error, Result},
    keys::Keys,
};

macro_rules! clock_script {
    ($file:literal) => {
        super::script($file, concat!(include_str!("lua/stats_lib.lua"), include_str!(concat!("lua/", $file))))
    };
}

/// Most days one PFCOUNT or PFMERGE takes (each dense day costs Redis about
/// 40 µs).
pub const UNIQUE_DAYS_PER_COMMAND: usize = 64;

/// Lifetime of CountUnique's scratch key, should it not be deleted.
const SCRATCH_TTL_MS: u64 = 60_000;

/// How long buckets are kept after they end, per granularity.
#[derive(Clone, Copy, Debug)]
pub struct Retention {
    /// Minute buckets.
    pub minute: Duration,
    /// Hour buckets.
    pub hour: Duration,
    /// Day buckets and daily unique sets.
    pub day: Duration,
}

/// The Stats service's data in Redis.
pub struct StatsStore {
    redis: Redis,
    keys: Keys,
    /// Bucket boundaries in the configured zone.
    calendar: Calendar,
    retention: Retention,
    /// The longest activity window; older members are trimmed.
    active_window_max: Duration,
    scripts: Scripts,
}

/// Loaded once; EVALSHA'd per call.
struct Scripts {
    increment: Script,
    add_unique: Script,
    mark_active: Script,
    count_active: Script,
}

impl StatsStore {
    /// A store under `keys`.
    pub fn new(
        redis: Redis,
        keys: Keys,
        calendar: Calendar,
        retention: Retention,
        active_window_max: Duration,
    ) -> Self {
        let scripts = Scripts {
            increment: clock_script!("increment.lua"),
            add_unique: clock_script!("add_unique.lua"),
            mark_active: super::script("mark_active.lua", include_str!("lua/mark_active.lua")),
            count_active: super::script("count_active.lua", include_str!("lua/count_active.lua")),
        };
        Self { redis, keys, calendar, retention, active_window_max, scripts }
    }

    /// The key space without a tenant; `Keys::tenant` derives a tenant's.
    pub fn keys(&self) -> &Keys {
        &self.keys
    }

    /// Adds each `(name, amount)` to its counter's current buckets and total;
    /// returns the totals right after each, in order. One round trip (one
    /// script call per hash slot on Redis Cluster, sent together). A delta
    /// that would overflow a total is an invalid argument, and then nothing
    /// is written: atomically within a slot; across slots the totals are
    /// read and checked first, so only an increment racing this one past
    /// the int64 range between that read and the write could leave the other
    /// slots' deltas applied.
    pub async fn increment(&self, space: &Keys, deltas: &[(&str, i64)]) -> Result<Vec<i64>> {
        let keys: Vec<String> = deltas.iter().map(|(name, _)| space.stats_counter(name)).collect();
        let groups = self.redis.slot_groups(keys.iter().map(String::as_str));
        if groups.len() > 1 {
            let names: Vec<String> = deltas.iter().map(|(name, _)| name.to_string()).collect();
            let mut totals = self.totals(space, &names).await?;
            for (i, (_, amount)) in deltas.iter().enumerate() {
                totals[i] = totals[i].checked_add(*amount).ok_or_else(|| overflow(i))?;
                // Later deltas of the same name add to this one.
                for later in i + 1..deltas.len() {
                    if deltas[later].0 == deltas[i].0 {
                        totals[later] = totals[i];
                    }
                }
            }
        }
        let clock = self.clock_table()?;
        let keys = &keys;
        let calls = groups.iter().map(|group| {
            let clock = &clock;
            async move {
                let mut call = self.scripts.increment.prepare_invoke();
                call.arg(millis(self.retention.minute))
                    .arg(millis(self.retention.hour))
                    .arg(millis(self.retention.day));
                clock_args(&mut call, clock);
                for &i in group {
                    call.key(&keys[i]).arg(deltas[i].1);
                }
                let reply: Vec<String> = self.redis.invoke(&call).await?;
                if let [flag, k] = reply.as_slice()
                    && flag == "overflow"
                {
                    let k = k.parse::<usize>().map_err(|e| Error::Internal(format!("overflow index {k}: {e}")))?;
                    let i = group.get(k.saturating_sub(1)).copied().unwrap_or(0);
                    return Err(overflow(i));
                }
                if reply.len() != group.len() {
                    return Err(Error::Internal(format!(
                        "increment returned {} totals for {} deltas",
                        reply.len(),
                        group.len()
                    )));
                }
                reply
                    .iter()
                    .map(|total| total.parse().map_err(|e| Error::Internal(format!("increment total {total}: {e}"))))
                    .collect::<Result<Vec<i64>>>()
            }
        });
        let mut totals = vec![0; deltas.len()];
        for (group, group_totals) in groups.iter().zip(futures::future::try_join_all(calls).await?) {
            for (&i, total) in group.iter().zip(group_totals) {
                totals[i] = total;
            }
        }
        self.redis.metrics().stats_increments(deltas.len() as u64);
        Ok(totals)
    }

    /// The values of counter `name`'s buckets starting at `starts` (zero when
    /// absent or expired), in one MGET.
    pub async fn series(&self, space: &Keys, name: &str, g: Granularity, starts: &[i64]) -> Result<Vec<i64>> {
        let keys: Vec<String> = starts.iter().map(|start| space.stats_bucket(name, g.tag(), *start)).collect();
        self.read_counts(&keys).await
    }

    /// The all-time totals of `names` (zero for a name never written), in one
    /// MGET.
    pub async fn totals(&self, space: &Keys, names: &[String]) -> Result<Vec<i64>> {
        let keys: Vec<String> = names.iter().map(|name| space.stats_total(name)).collect();
        self.read_counts(&keys).await
    }

    async fn read_counts(&self, keys: &[String]) -> Result<Vec<i64>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let values: Vec<Option<i64>> = self.redis.query(redis::cmd("MGET").arg(keys)).await?;
        if values.len() != keys.len() {
            return Err(Error::Internal(format!("MGET returned {} values for {} keys", values.len(), keys.len())));
        }
        Ok(values.into_iter().map(Option::unwrap_or_default).collect())
    }

    /// Records `member` of `group` as seen now (Redis time).
    pub async fn mark_active(&self, space: &Keys, group: &str, member: &str) -> Result<()> {
        let mut call = self.scripts.mark_active.prepare_invoke();
        call.key(space.stats_active(group)).arg(member).arg(millis(self.active_window_max));
        let _: i64 = self.redis.invoke(&call).await?;
        Ok(())
    }

    /// How many members of `group` were seen within `window` before now.
    pub async fn count_active(&self, space: &Keys, group: &str, window: Duration) -> Result<u64> {
        let mut call = self.scripts.count_active.prepare_invoke();
        call.key(space.stats_active(group)).arg(millis(window));
        self.redis.invoke(&call).await
    }

    /// Adds `members` to today's HyperLogLog of `name`; true when it changed.
    pub async fn add_unique(&self, space: &Keys, name: &str, members: &[String]) -> Result<bool> {
        let mut call = self.scripts.add_unique.prepare_invoke();
        call.key(space.stats_unique(name)).arg(millis(self.retention.day));
        self.clock_args(&mut call)?;
        call.arg(members);
        let changed: i64 = self.redis.invoke(&call).await?;
        Ok(changed == 1)
    }

    /// The estimated distinct members of `name` over the days starting at
    /// `day_starts` (the union of their HyperLogLogs): one PFCOUNT of up to
    /// [`UNIQUE_DAYS_PER_COMMAND`] days. More days are merged that many at a
    /// time (PFMERGE, about 40 µs of Redis time per dense day) into a scratch
    /// key of this call, counted, then deleted; the scratch key expires
    /// within a minute should the call be cut short. Each step is atomic,
    /// the whole count is not: a member added to today's set meanwhile may
    /// or may not be counted.
    pub async fn count_unique(&self, space: &Keys, name: &str, day_starts: &[i64]) -> Result<u64> {
        if day_starts.is_empty() {
            return Ok(0);
        }
        let keys: Vec<String> = day_starts.iter().map(|start| space.stats_unique_day(name, *start)).collect();
        if keys.len() <= UNIQUE_DAYS_PER_COMMAND {
            return self.redis.query(redis::cmd("PFCOUNT").arg(keys)).await;
        }
        let scratch = space.stats_unique_merge(name, &super::random_token());
        for (n, days) in keys.chunks(UNIQUE_DAYS_PER_COMMAND).enumerate() {
            let () = self.redis.query(redis::cmd("PFMERGE").arg(&scratch).arg(days)).await?;
            if n == 0 {
                let _: i64 = self.redis.query(redis::cmd("PEXPIRE").arg(&scratch).arg(SCRATCH_TTL_MS)).await?;
            }
        }
        let count = self.redis.query(redis::cmd("PFCOUNT").arg(&scratch)).await;
        let _: i64 = self.redis.query(redis::cmd("DEL").arg(&scratch)).await?;
        count
    }

    /// The clock table around the service's now (stats_lib.lua).
    fn clock_table(&self) -> Result<ClockTable> {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_err(|e| Error::Internal(e.to_string()))?;
        let now = i64::try_from(now.as_millis()).map_err(|e| Error::Internal(e.to_string()))?;
        self.calendar.clock_table(now).map_err(|e| Error::Internal(format!("clock table: {e:?}")))
    }

    /// Appends the clock table around the service's now.
    fn clock_args(&self, call: &mut ScriptInvocation<'_>) -> Result<()> {
        clock_args(call, &self.clock_table()?);
        Ok(())
    }
}

/// Appends a clock table to a script's arguments.
fn clock_args(call: &mut ScriptInvocation<'_>, table: &ClockTable) {
    call.arg(table.day_starts.len()).arg(&table.day_starts);
    call.arg(table.offsets.len());
    for (from, offset) in &table.offsets {
        call.arg(from).arg(offset);
    }
}

/// Increment's answer to a delta that would overflow its total.
fn overflow(i: usize) -> Error {
    Error::invalid(format!("deltas[{i}].amount"), "would take the total outside the int64 range")
}

/// Whole milliseconds, saturating.
fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
