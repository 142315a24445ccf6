//! The soak: the mixed load at half the throughput measured at the start,
//! on two instances, for a while. Checks, comparing the means of the last
//! and the first third of the samples taken after warm-up: no errors,
//! service RSS growth under 5%, Redis key count and memory flat within 10%
//! (nothing leaks: tag indexes, session indexes, lock fences per name, fill
//! leases), and the latency p99 less than doubled.

use std::{fmt::Write as _, sync::Arc, time::Duration};

use crate::{
    cluster::{self, Fallible},
    faults::System,
    load::Load,
    record::{Recorder, WINDOW},
};

/// One sample of the system.
struct Sample {
    at: f64,
    rss_kb: [u64; 2],
    keys: u64,
    memory: u64,
    errors: u64,
    calls: u64,
    p50: f64,
    p99: f64,
}

pub async fn run(duration: Duration, callers: usize) -> Fallible<(String, bool)> {
    // Short retention, so Stats buckets reach their steady count within the
    // run instead of growing for days as they would by default.
    let flags = ["--stats-retention-minute", "2m", "--stats-retention-hour", "1h", "--stats-retention-day", "1d"];
    let system = System::start(&flags).await?;
    let channels = system.channels()?;

    // The maximum: as fast as the callers go, 5 s.
    let probe = Arc::new(Recorder::new(Duration::from_secs(30)));
    let load = Load::start(&probe, &channels, callers, None);
    tokio::time::sleep(Duration::from_secs(6)).await;
    load.stop().await;
    let max_rate = probe.ok_between(1.0, 6.0) as f64 / 5.0;
    let rate = max_rate / 2.0;
    let pace = Duration::from_secs_f64(callers as f64 / rate);
    eprintln!(
        "maximum {max_rate:.0} calls/s; soaking at {rate:.0} calls/s ({callers} callers, one call each per {pace:?})"
    );

    let warmup = Duration::from_secs(20).min(duration / 2);
    let total = warmup + duration;
    let recorder = Arc::new(Recorder::new(total + Duration::from_secs(30)));
    let load = Load::start(&recorder, &channels, callers, Some(pace));
    let mut admin = system.redis.admin().await?;
    let mut samples = Vec::new();
    let step = WINDOW;
    let mut next = warmup;
    loop {
        let now = recorder.origin.elapsed();
        if next > now {
            tokio::time::sleep(next - now).await;
        }
        let at = recorder.now();
        let windows = recorder.latency_windows();
        let last = ((at / WINDOW.as_secs_f64()) as usize).saturating_sub(1);
        let (calls, p50, p99, _) = windows.get(last).copied().unwrap_or_default();
        let pid = |s: &cluster::ServiceProc| s.pid().unwrap_or(0);
        samples.push(Sample {
            at,
            rss_kb: [cluster::rss_kb(pid(&system.a)).unwrap_or(0), cluster::rss_kb(pid(&system.b)).unwrap_or(0)],
            keys: cluster::redis_keys(&mut admin).await.unwrap_or(0),
            memory: cluster::redis_memory(&mut admin).await.unwrap_or(0),
            errors: recorder.codes().values().sum(),
            calls,
            p50,
            p99,
        });
        if next >= total {
            break;
        }
        next += step;
    }
    load.stop().await;
    let panics = system.a.panics() + system.b.panics();

    let first = &samples[0];
    let last = &samples[samples.len() - 1];
    // One sample is noisy (sessions, leases and locks in flight come and
    // go): compare the means of the first and the last third.
    let third = (samples.len() / 3).max(1);
    let (early, late) = (&samples[..third], &samples[samples.len() - third..]);
    let mean = |s: &[Sample], f: &dyn Fn(&Sample) -> f64| s.iter().map(f).sum::<f64>() / s.len() as f64;
    let growth = |f: &dyn Fn(&Sample) -> f64| {
        let a = mean(early, f);
        if a == 0.0 { 0.0 } else { mean(late, f) / a - 1.0 }
    };
    let rss_growth = [growth(&|s| s.rss_kb[0] as f64), growth(&|s| s.rss_kb[1] as f64)];
    let keys_growth = growth(&|s| s.keys as f64);
    let memory_growth = growth(&|s| s.memory as f64);
    // p99 of one window swings with whatever else the machine runs: the
    // median window of each third, and only with three windows or more.
    let median = |s: &[Sample]| {
        let mut p: Vec<f64> = s.iter().map(|s| s.p99).collect();
        p.sort_by(f64::total_cmp);
        p[p.len() / 2]
    };
    let judged = third >= 3;
    let p99_ratio = if median(early) > 0.0 { median(late) / median(early) } else { 0.0 };
    let errors = last.errors;

    let mut out = String::new();
    let _ = writeln!(out, "### Soak\n");
    let _ = writeln!(
        out,
        "{} after a {} warm-up, {callers} callers on two instances at {rate:.0} calls/s (half of the {max_rate:.0} calls/s measured first).\n",
        humantime::format_duration(duration),
        humantime::format_duration(warmup)
    );
    let _ = writeln!(
        out,
        "| t (s) | RSS A (MB) | RSS B (MB) | Redis keys | Redis memory (MB) | errors so far | calls in the last 10 s | p50 ms | p99 ms |"
    );
    let _ = writeln!(out, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for s in &samples {
        let _ = writeln!(
            out,
            "| {:.0} | {:.1} | {:.1} | {} | {:.2} | {} | {} | {:.2} | {:.2} |",
            s.at,
            s.rss_kb[0] as f64 / 1024.0,
            s.rss_kb[1] as f64 / 1024.0,
            s.keys,
            s.memory as f64 / 1048576.0,
            s.errors,
            s.calls,
            s.p50,
            s.p99
        );
    }
    let pct = |x: f64| format!("{:+.1}%", x * 100.0);
    let _ = writeln!(out, "\n- errors: {errors}; panics: {panics}");
    let _ = writeln!(out, "\nLast third of the samples against the first third (means):\n");
    let _ = writeln!(out, "- RSS: A {}, B {} (bound +5%)", pct(rss_growth[0]), pct(rss_growth[1]));
    let _ = writeln!(
        out,
        "- Redis keys {} (bound {}; first sample {}, last {}), Redis memory {} (bound +10%)",
        pct(keys_growth),
        if judged { "+10%" } else { "+25% with fewer than 9 samples" },
        first.keys,
        last.keys,
        pct(memory_growth)
    );
    let _ = writeln!(
        out,
        "- p99 (median window of each third): ×{p99_ratio:.2} ({})",
        if judged { "bound ×2" } else { "not judged: fewer than 9 samples" }
    );
    let passed = errors == 0
        && panics == 0
        && rss_growth.iter().all(|g| *g < 0.05)
        && keys_growth < if judged { 0.10 } else { 0.25 }
        && memory_growth < 0.10
        && (!judged || p99_ratio < 2.0);
    Ok((out, passed))
}
