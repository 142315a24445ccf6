//! `cachecoord-bench`: how close the service comes to what a user would use
//! instead of it.
//!
//! It starts its own redis-server and the service (this same binary in `serve`
//! mode, so the service has a process of its own, logging as the real binary
//! does), then runs closed-loop clients against four kinds of target,
//! interleaved in one run:
//! - the service's RPCs;
//! - the gRPC floor: `grpc.health.v1.Health/Check` on the same server;
//! - the Redis floor: a plain redis-rs client on shared multiplexed
//!   connections sending the plainest equivalent commands;
//! - the service's store layer in this process (same scripts, no gRPC).
//!
//! For each it also reads Redis's own CPU time (`INFO cpu`) over the measured
//! window, so the Redis cost of one call can be compared across targets. It
//! prints a markdown table and writes it to `BENCHMARKS.md`.

mod targets;

use std::{
    fmt::Write as _,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use clap::{Parser, Subcommand};
use hdrhistogram::Histogram;
use targets::{Clients, Target};

/// jemalloc: measured ~10% less service CPU per Cache.Get than glibc malloc,
/// at a smaller RSS than mimalloc (BENCHMARKS.md, "Changes tried").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(name = "cachecoord-bench", about)]
struct Args {
    #[command(subcommand)]
    mode: Option<Mode>,
    /// How long each target runs at each concurrency.
    #[arg(long, default_value = "3s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Warm-up before each measurement.
    #[arg(long, default_value = "300ms", value_parser = humantime::parse_duration)]
    warmup: Duration,
    /// Concurrent callers, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    callers: Vec<usize>,
    /// HTTP/2 connections to the service (and Redis connections for the floor).
    #[arg(long, default_value_t = 4)]
    connections: usize,
    /// Where to write the report; `-` for none.
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: String,
    /// Measure only targets whose name contains one of these (comma-separated).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// A short smoke run (CI): 200 ms per point, callers 1 and 4, no report.
    #[arg(long)]
    quick: bool,
    /// Run against a local 3-master, 3-replica Redis Cluster instead of one
    /// redis-server (the service with redis+cluster://, the floor with a
    /// redis-rs cluster client).
    #[arg(long)]
    cluster: bool,
    /// Extra flags for the service (repeat), e.g. `--service-arg=--redis-connections=1`.
    #[arg(long = "service-arg", allow_hyphen_values = true)]
    service_args: Vec<String>,
    /// Environment for the service (repeat), e.g. `--service-env RUST_LOG=warn`.
    #[arg(long = "service-env")]
    service_env: Vec<String>,
    /// host:port of another Envoy rate limit server to measure beside ours
    /// (ShouldRateLimit on domain `bench`; see BENCHMARKS.md for its config).
    #[arg(long)]
    rls_external: Option<String>,
    /// Runs of the over-admission measurement (64 callers x 10 calls on a
    /// limit of 100).
    #[arg(long, default_value_t = 5)]
    overadmission_runs: usize,
    /// Instead of the full report: Cache.Get at 64 callers against two
    /// instances, one with --metrics-listen and one without, in this many
    /// interleaved rounds; prints a table (BENCHMARKS.md, "Metrics").
    #[arg(long)]
    metrics_compare: Option<usize>,
    /// Like --metrics-compare, with tracing: one instance exporting every
    /// RPC's spans by OTLP to a sink in this process, one without
    /// (BENCHMARKS.md, "Tracing").
    #[arg(long)]
    tracing_compare: Option<usize>,
}

/// The layer a comparison turns on in its second instance.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Compare {
    Metrics,
    Tracing,
}

#[derive(Subcommand)]
enum Mode {
    /// Run the service (used by the benchmark itself, in a child process).
    Serve {
        /// cachecoord flags.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        flags: Vec<String>,
    },
}

/// One measured point.
struct Point {
    target: &'static str,
    callers: usize,
    calls: u64,
    elapsed: Duration,
    latency: Histogram<u64>,
    /// Redis's CPU time (user + sys) over the measured window.
    redis_cpu: Duration,
    /// The service process's CPU time over the measured window.
    service_cpu: Duration,
}

impl Point {
    fn rate(&self) -> f64 {
        self.calls as f64 / self.elapsed.as_secs_f64()
    }
    fn p(&self, q: f64) -> f64 {
        self.latency.value_at_quantile(q) as f64 / 1000.0
    }
    /// Redis CPU µs per call.
    fn redis_us(&self) -> f64 {
        self.redis_cpu.as_secs_f64() * 1e6 / self.calls.max(1) as f64
    }
    /// Service CPU µs per call (zero for targets that do not call it).
    fn service_us(&self) -> f64 {
        self.service_cpu.as_secs_f64() * 1e6 / self.calls.max(1) as f64
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = Args::parse();
    if let Some(Mode::Serve { flags }) = args.mode.take() {
        return serve(flags);
    }
    if args.quick {
        args.duration = Duration::from_millis(200);
        args.warmup = Duration::from_millis(50);
        args.callers = vec![1, 4];
        args.out = "-".into();
        args.overadmission_runs = 1;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(run(args))
}

/// The service, in this process, until SIGTERM.
fn serve(flags: Vec<String>) -> Result<(), Box<dyn std::error::Error>> {
    use clap::Parser as _;
    let config = cachecoord::config::Config::try_parse_from(std::iter::once("cachecoord".to_string()).chain(flags))?;
    config.validate()?;
    cachecoord::telemetry::init(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        cachecoord::server::run(config, listener, shutdown).await.map_err(|e| e.to_string())?;
        Ok(())
    })
}

/// A child process killed on drop.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Starts `n` redis-servers (cluster nodes when `cluster`) in subdirectories
/// of `dir`; their ports and processes.
fn redis_servers(dir: &std::path::Path, n: usize, cluster: bool) -> std::io::Result<(Vec<u16>, Vec<Process>)> {
    let (mut ports, mut processes) = (Vec::new(), Vec::new());
    for i in 0..n {
        let port = free_port()?;
        let node_dir = dir.join(format!("redis{i}"));
        std::fs::create_dir_all(&node_dir)?;
        let mut command = Command::new("redis-server");
        command
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&node_dir)
            .stdout(Stdio::null());
        if cluster {
            command.args(["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]);
        }
        processes.push(Process(command.spawn()?));
        ports.push(port);
    }
    Ok((ports, processes))
}

/// Joins six nodes into a 3-master, 3-replica cluster and waits until every
/// node says it is OK.
async fn create_cluster(ports: &[u16]) -> Result<(), Box<dyn std::error::Error>> {
    let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    for _ in 0..500 {
        let ready = ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "PING"])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"PONG"))
        });
        if ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let output = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addrs)
        .args(["--cluster-replicas", "1", "--cluster-yes"])
        .output()?;
    if !output.status.success() {
        return Err(format!("cluster create: {}", String::from_utf8_lossy(&output.stdout)).into());
    }
    for _ in 0..500 {
        let ok = ports.iter().all(|p| {
            Command::new("redis-cli")
                .args(["-p", &p.to_string(), "CLUSTER", "INFO"])
                .output()
                .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("cluster_state:ok"))
        });
        if ok {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err("cluster did not become OK".into())
}

async fn run(args: Args) -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let (redis_ports, _redis) = redis_servers(dir.path(), if args.cluster { 6 } else { 1 }, args.cluster)?;
    let redis_url = if args.cluster {
        create_cluster(&redis_ports).await?;
        let seeds: Vec<String> = redis_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        format!("redis+cluster://{}", seeds.join(","))
    } else {
        format!("redis://127.0.0.1:{}", redis_ports[0])
    };
    if let Some(rounds) = args.metrics_compare {
        return compare(&args, Compare::Metrics, rounds, dir.path(), &redis_url, &redis_ports).await;
    }
    if let Some(rounds) = args.tracing_compare {
        return compare(&args, Compare::Tracing, rounds, dir.path(), &redis_url, &redis_ports).await;
    }
    let grpc_port = free_port()?;
    // As deployed: the per-RPC log line at info, written to a file.
    let log = std::fs::File::create(dir.path().join("service.log"))?;
    let rls_config = dir.path().join("rls.yaml");
    std::fs::write(&rls_config, targets::RLS_CONFIG)?;
    let mut service = Command::new(std::env::current_exe()?);
    service
        .args(["serve", "--listen", &format!("127.0.0.1:{grpc_port}"), "--redis-url", &redis_url])
        .args(["--key-prefix", "bench"])
        .arg("--rls-config")
        .arg(&rls_config)
        .args(&args.service_args)
        .env("RUST_LOG", "info")
        .stdout(log);
    for pair in &args.service_env {
        let (name, value) = pair.split_once('=').ok_or("--service-env takes NAME=VALUE")?;
        service.env(name, value);
    }
    let service = Process(service.spawn()?);
    let service_pid = service.0.id();
    let clients = Arc::new(
        Clients::connect(grpc_port, &redis_url, &redis_ports, args.connections, args.rls_external.as_deref()).await?,
    );

    let mut points = Vec::new();
    for &callers in &args.callers {
        for target in Target::ALL {
            let wanted = args.only.is_empty() || args.only.iter().any(|o| target.name().contains(o.as_str()));
            if !clients.available(*target) || !wanted {
                continue;
            }
            let point = measure(&clients, *target, callers, args.warmup, args.duration, service_pid).await?;
            eprintln!(
                "{:<34} callers {:>3}: {:>9.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms  µs/call: redis {:>5.1} service {:>5.1}",
                point.target,
                callers,
                point.rate(),
                point.p(0.5),
                point.p(0.99),
                point.redis_us(),
                point.service_us()
            );
            points.push(point);
        }
    }
    let handoff = targets::lock_handoff(&clients, if args.quick { 20 } else { 200 }).await?;
    let mut admitted = Vec::new();
    for (name, channels) in clients.rls_channels() {
        if !channels.is_empty() {
            let counts = targets::overadmission(channels, args.overadmission_runs).await?;
            eprintln!("{name}: admitted {counts:?} of 640 calls on a limit of 100");
            admitted.push((name, counts));
        }
    }
    let rss = in_flight_rss(&clients, service.0.id()).await?;
    let report = report(&args, &points, handoff, rss, &admitted);
    println!("{report}");
    if args.out != "-" {
        // Keep the hand-written sections after the marker, if the file has it.
        let kept = std::fs::read_to_string(&args.out)
            .ok()
            .and_then(|old| old.find(HAND_WRITTEN).map(|at| old[at..].to_string()))
            .unwrap_or_default();
        let separator = if kept.is_empty() { "" } else { "\n" };
        std::fs::write(PathBuf::from(&args.out), format!("{report}{separator}{kept}"))?;
        eprintln!("wrote {}", args.out);
    }
    Ok(())
}

/// The line in the report file after which the sections are written by
/// hand: a run replaces only what is above it.
const HAND_WRITTEN: &str = "<!-- Written by hand below this line";

/// Cache.Get at 64 callers (the bar: metrics cost at most 3%)
/// against an instance with metrics (or tracing) and one without, sharing
/// one Redis, measured in interleaved rounds so that drift on a shared
/// machine hits both alike.
async fn compare(
    args: &Args,
    what: Compare,
    rounds: usize,
    dir: &std::path::Path,
    redis_url: &str,
    redis_ports: &[u16],
) -> Result<(), Box<dyn std::error::Error>> {
    let callers = 64;
    let label = if what == Compare::Metrics { "metrics" } else { "tracing" };
    // Tracing exports to a sink here, which counts the spans it receives.
    let sink = if what == Compare::Tracing { Some(targets::span_sink().await?) } else { None };
    let mut instances = Vec::new();
    for (name, on) in [("off", false), ("on", true)] {
        let grpc_port = free_port()?;
        let log = std::fs::File::create(dir.join(format!("service-{name}.log")))?;
        let mut service = Command::new(std::env::current_exe()?);
        service
            .args(["serve", "--listen", &format!("127.0.0.1:{grpc_port}"), "--redis-url", redis_url])
            .args(["--key-prefix", "bench"])
            .args(&args.service_args)
            .env("RUST_LOG", "info")
            .stdout(log);
        match (on, &sink) {
            (false, _) => {}
            (true, None) => {
                service.args(["--metrics-listen", &format!("127.0.0.1:{}", free_port()?)]);
            }
            (true, Some((endpoint, _))) => {
                service.args(["--otlp-endpoint", endpoint]);
            }
        }
        let process = Process(service.spawn()?);
        let clients = Arc::new(Clients::connect(grpc_port, redis_url, redis_ports, args.connections, None).await?);
        instances.push((name, process, clients));
    }
    let mut rows: Vec<(usize, &str, Point)> = Vec::new();
    for round in 1..=rounds {
        // Alternate which goes first.
        let order = if round % 2 == 1 { [0, 1] } else { [1, 0] };
        for i in order {
            let (name, process, clients) = &instances[i];
            let point = measure(clients, Target::CacheGet, callers, args.warmup, args.duration, process.0.id()).await?;
            eprintln!(
                "round {round} {label} {name:<3}: {:>9.0}/s  p50 {:.3} ms  p99 {:.3} ms  service {:.1} µs/call",
                point.rate(),
                point.p(0.5),
                point.p(0.99),
                point.service_us()
            );
            rows.push((round, name, point));
        }
    }
    let mut out = String::new();
    let _ = writeln!(out, "| round | {label} | Cache.Get/s | p50 ms | p99 ms | service CPU µs/call |");
    let _ = writeln!(out, "|---|---|---|---|---|---|");
    for (round, name, p) in &rows {
        let _ = writeln!(
            out,
            "| {round} | {name} | {:.0} | {:.3} | {:.3} | {:.1} |",
            p.rate(),
            p.p(0.5),
            p.p(0.99),
            p.service_us()
        );
    }
    let total = |want: &str, f: &dyn Fn(&Point) -> f64| {
        let values: Vec<f64> = rows.iter().filter(|(_, name, _)| *name == want).map(|(_, _, p)| f(p)).collect();
        values.iter().sum::<f64>() / values.len().max(1) as f64
    };
    let (rate_off, rate_on) = (total("off", &|p| p.rate()), total("on", &|p| p.rate()));
    let (cpu_off, cpu_on) = (total("off", &|p| p.service_us()), total("on", &|p| p.service_us()));
    let _ = writeln!(
        out,
        "\nMean over {rounds} rounds: {rate_off:.0}/s off, {rate_on:.0}/s on ({:+.1}% throughput); \
         service CPU {cpu_off:.1} → {cpu_on:.1} µs/call ({:+.1}%).",
        (rate_on / rate_off - 1.0) * 100.0,
        (cpu_on / cpu_off - 1.0) * 100.0
    );
    if let Some((_, spans)) = &sink {
        let measured: u64 = rows.iter().filter(|(_, name, _)| *name == "on").map(|(_, _, p)| p.calls).sum();
        let _ = writeln!(
            out,
            "The sink received {} spans; the traced instance answered {measured} measured Gets (warm-ups not counted).",
            spans.load(std::sync::atomic::Ordering::Relaxed)
        );
    }
    println!("{out}");
    Ok(())
}

/// Runs `callers` closed-loop tasks on `target` and merges their histograms.
async fn measure(
    clients: &Arc<Clients>,
    target: Target,
    callers: usize,
    warmup: Duration,
    duration: Duration,
    service_pid: u32,
) -> Result<Point, Box<dyn std::error::Error>> {
    let start = Instant::now() + warmup;
    let end = start + duration;
    let tasks: Vec<_> = (0..callers)
        .map(|caller| {
            let clients = Arc::clone(clients);
            tokio::spawn(async move {
                let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("histogram bounds");
                let mut calls = 0u64;
                let mut worker = clients.worker(target, caller);
                loop {
                    let sent = Instant::now();
                    if sent >= end {
                        break;
                    }
                    worker.call().await?;
                    if sent >= start {
                        let _ = latency.record(sent.elapsed().as_micros() as u64);
                        calls += 1;
                    }
                }
                Ok::<_, String>((calls, latency))
            })
        })
        .collect();
    tokio::time::sleep_until(start.into()).await;
    let (cpu_before, service_before) = (clients.redis_cpu().await?, process_cpu(service_pid));
    tokio::time::sleep_until(end.into()).await;
    let (cpu_after, service_after) = (clients.redis_cpu().await?, process_cpu(service_pid));
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut calls = 0;
    for task in tasks {
        let (n, h) = task.await??;
        calls += n;
        latency.add(h)?;
    }
    let redis_cpu = cpu_after.saturating_sub(cpu_before);
    let service_cpu = service_after.saturating_sub(service_before);
    Ok(Point { target: target.name(), callers, calls, elapsed: duration, latency, redis_cpu, service_cpu })
}

/// A process's CPU time so far (user + system), from `/proc/<pid>/stat`.
fn process_cpu(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state;
    // utime and stime are the 14th and 15th fields of the whole line.
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let ticks: u64 = rest.split_whitespace().skip(11).take(2).filter_map(|f| f.parse::<u64>().ok()).sum();
    // Linux reports these in clock ticks of 1/100 s (USER_HZ) on every common platform.
    Duration::from_millis(ticks * 10)
}

/// Peak RSS (VmHWM) of the service after 1,000 concurrent calls.
async fn in_flight_rss(clients: &Arc<Clients>, pid: u32) -> Result<Option<u64>, Box<dyn std::error::Error>> {
    measure(clients, Target::CacheGet, 1000, Duration::ZERO, Duration::from_secs(1), pid).await?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    Ok(status
        .lines()
        .find(|line| line.starts_with("VmHWM:"))
        .and_then(|line| line.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<u64>().ok()))
}

fn find<'a>(points: &'a [Point], target: &str, callers: usize) -> Option<&'a Point> {
    points.iter().find(|p| p.target == target && p.callers == callers)
}

/// Per RLS server, how many calls each over-admission run admitted.
type Admitted = [(&'static str, Vec<usize>)];

fn report(
    args: &Args,
    points: &[Point],
    handoff: Option<(f64, f64)>,
    rss_kb: Option<u64>,
    admitted: &Admitted,
) -> String {
    let mut out = String::new();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let memory = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| m.lines().next().map(|l| l.split_whitespace().nth(1).unwrap_or("0").to_string()))
        .and_then(|kb| kb.parse::<u64>().ok())
        .map_or("unknown".to_string(), |kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0));
    let _ = writeln!(out, "# Benchmarks\n");
    let _ = writeln!(
        out,
        "Run {} on {cores} cores, {memory}; load generator, service and Redis share the machine.\n",
        humantime::format_rfc3339_seconds(std::time::SystemTime::now())
    );
    let extra: String = args
        .cluster
        .then(|| " --cluster".to_string())
        .into_iter()
        .chain(args.service_args.iter().map(|a| format!(" --service-arg={a}")))
        .chain(args.service_env.iter().map(|e| format!(" --service-env {e}")))
        .collect();
    let _ = writeln!(
        out,
        "Command: `cargo run --release -p cachecoord-bench -- --duration {} --callers {} --connections {}{extra}`\n",
        humantime::format_duration(args.duration),
        args.callers.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(","),
        args.connections
    );
    let _ = writeln!(
        out,
        "| target | callers | calls/s | p50 ms | p99 ms | Redis µs/call | service µs/call | ÷ echo | ÷ redis | ÷ store | glue overhead |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for point in points {
        let (mut vs_echo, mut vs_redis, mut vs_store, mut glue) =
            (String::new(), String::new(), String::new(), String::new());
        let target = Target::from_name(point.target);
        let echo = find(points, Target::Echo.name(), point.callers);
        if let Some(floor) = target.and_then(Target::floor)
            && let (Some(echo), Some(floor)) = (echo, find(points, floor.name(), point.callers))
        {
            vs_echo = format!("{:.2}", point.rate() / echo.rate());
            vs_redis = format!("{:.2}", point.rate() / floor.rate());
            glue = pct(Some(glue_overhead(point.rate(), echo.rate(), floor.rate())));
        }
        if let Some(store) = target.and_then(Target::store).and_then(|t| find(points, t.name(), point.callers)) {
            vs_store = format!("{:.2}", point.rate() / store.rate());
        }
        // Our processes' CPU says nothing about another server's calls.
        let external = target == Some(Target::ExternalShouldRateLimit);
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.3} | {:.3} | {} | {} | {vs_echo} | {vs_redis} | {vs_store} | {glue} |",
            point.target,
            point.callers,
            point.rate(),
            point.p(0.5),
            point.p(0.99),
            if external { String::new() } else { format!("{:.1}", point.redis_us()) },
            if point.service_cpu.is_zero() || external { String::new() } else { format!("{:.1}", point.service_us()) }
        );
    }
    let _ = writeln!(
        out,
        "\nglue overhead = (1/R_svc) / (1/R_echo + 1/R_redis) − 1, per concurrency, where R_redis is the \
         plain-client floor of the same row group (the first `redis …` row after it). Redis µs/call and \
         service µs/call are the CPU time of each process over the measured window divided by the calls \
         made (clock ticks of 10 ms: rough below a few thousand calls).\n"
    );
    let _ = writeln!(out, "## Derived\n");
    for &callers in &args.callers {
        if let (Some(get), Some(many)) =
            (find(points, Target::CacheGet.name(), callers), find(points, Target::CacheGetMany.name(), callers))
        {
            let _ = writeln!(
                out,
                "- {callers} callers: GetMany(100) moves {:.0} keys/s vs Get {:.0} keys/s ({:.1}×)",
                many.rate() * 100.0,
                get.rate(),
                many.rate() * 100.0 / get.rate()
            );
        }
    }
    if let (Some(get), Some(echo), Some(direct)) = (
        find(points, Target::CacheGet.name(), 1),
        find(points, Target::Echo.name(), 1),
        find(points, Target::RedisGet.name(), 1),
    ) {
        let _ = writeln!(
            out,
            "- 1 caller: Cache.Get p50 {:.3} ms vs echo p50 + redis GET p50 = {:.3} ms ({:.2}×)",
            get.p(0.5),
            echo.p(0.5) + direct.p(0.5),
            get.p(0.5) / (echo.p(0.5) + direct.p(0.5))
        );
    }
    match handoff {
        Some((p50, p99)) => {
            let _ = writeln!(
                out,
                "- lock hand-off (waiter blocked in Acquire, woken by Release): p50 {p50:.3} ms, p99 {p99:.3} ms"
            );
        }
        None => {
            let _ = writeln!(out, "- lock hand-off: LockService not implemented in this build");
        }
    }
    if let Some(kb) = rss_kb {
        let _ = writeln!(out, "- service peak RSS with 1,000 calls in flight: {:.1} MB", kb as f64 / 1024.0);
    }
    for (name, counts) in admitted {
        let counts: Vec<String> = counts.iter().map(ToString::to_string).collect();
        let _ = writeln!(
            out,
            "- ShouldRateLimit exactness ({name}): 64 callers x 10 calls on a limit of 100 admitted {} (runs)",
            counts.join(", ")
        );
    }
    goals(&mut out, points, handoff, rss_kb, admitted);
    out
}

/// Glue overhead of a service rate against its two floors.
fn glue_overhead(service: f64, echo: f64, redis: f64) -> f64 {
    (1.0 / service) / (1.0 / echo + 1.0 / redis) - 1.0
}

/// The goals of the connection-layer issue, each with what this run measured.
fn goals(out: &mut String, points: &[Point], handoff: Option<(f64, f64)>, rss_kb: Option<u64>, admitted: &Admitted) {
    let at = |t: Target, c| find(points, t.name(), c);
    let rate = |t: Target, c| at(t, c).map(Point::rate);
    let mut rows: Vec<(&str, String, Option<bool>)> = Vec::new();
    let glue = match (rate(Target::CacheGet, 64), rate(Target::Echo, 64), rate(Target::RedisGet, 64)) {
        (Some(s), Some(e), Some(d)) => Some(glue_overhead(s, e, d)),
        _ => None,
    };
    rows.push((
        "Cache.Get glue overhead at 64 callers ≤ 10% (floors: echo, redis GET)",
        pct(glue),
        glue.map(|g| g <= 0.10),
    ));
    let p50 = |t: Target| at(t, 1).map(|p| p.p(0.5));
    let ratio = match (p50(Target::CacheGet), p50(Target::Echo), p50(Target::RedisGet)) {
        (Some(s), Some(e), Some(d)) => Some(s / (e + d)),
        _ => None,
    };
    rows.push((
        "Cache.Get p50 at 1 caller ≤ 1.1 × (echo p50 + redis GET p50)",
        ratio.map_or("n/a".into(), |r| format!("{r:.2}×")),
        ratio.map(|r| r <= 1.1),
    ));
    let cpu = match (at(Target::CacheGet, 64), at(Target::RedisEvalGet, 64)) {
        (Some(s), Some(e)) => Some(s.redis_us() / e.redis_us()),
        _ => None,
    };
    rows.push((
        "Redis CPU per Cache.Get ≤ 1.5 × EVALSHA get.lua from a plain client (64 callers)",
        cpu.map_or("n/a".into(), |r| format!("{r:.2}×")),
        cpu.map(|r| r <= 1.5),
    ));
    let checks = match (rate(Target::RateLimitCheck, 64), rate(Target::CacheGet, 64)) {
        (Some(c), Some(g)) => Some(c / g),
        _ => None,
    };
    rows.push((
        "RateLimit.Check (token bucket) at 64 callers ≥ 0.9 × Cache.Get",
        checks.map_or("n/a".into(), |r| format!("{r:.2}×")),
        checks.map(|r| r >= 0.9),
    ));
    let keys = match (rate(Target::CacheGetMany, 64), rate(Target::CacheGet, 64)) {
        (Some(many), Some(get)) => Some(many * 100.0 / get),
        _ => None,
    };
    rows.push((
        "GetMany(100) keys/s ≥ 30 × Get keys/s (64 callers)",
        keys.map_or("n/a".into(), |k| format!("{k:.1}×")),
        keys.map(|k| k >= 30.0),
    ));
    let envoy = rate(Target::ShouldRateLimit, 64);
    let ratio = envoy.zip(rate(Target::RateLimitCheck, 64)).map(|(e, c)| e / c);
    rows.push((
        "ShouldRateLimit at 64 callers ≥ RateLimit.Check at 64 callers",
        ratio.map_or("n/a".into(), |r| format!("{r:.2}×")),
        ratio.map(|r| r >= 1.0),
    ));
    let ratio = envoy.zip(rate(Target::ExternalShouldRateLimit, 64)).map(|(e, x)| e / x);
    rows.push((
        "ShouldRateLimit at 64 callers ≥ 1.5 × the external RLS server's",
        ratio.map_or("n/a (no --rls-external)".into(), |r| format!("{r:.2}×")),
        ratio.map(|r| r >= 1.5),
    ));
    let exact = admitted.iter().find(|(name, _)| *name == "cachecoord").map(|(_, counts)| counts);
    rows.push((
        "ShouldRateLimit admits exactly 100 of 640 calls on a limit of 100 (64 callers)",
        exact.map_or("n/a".into(), |c| format!("{c:?}")),
        exact.map(|c| c.iter().all(|&n| n == 100)),
    ));
    rows.push((
        "lock hand-off p50 ≤ 1 ms, p99 ≤ 2 ms",
        handoff.map_or("n/a".into(), |(p50, p99)| format!("{p50:.3} / {p99:.3} ms")),
        handoff.map(|(p50, p99)| p50 <= 1.0 && p99 <= 2.0),
    ));
    rows.push((
        "service RSS ≤ 50 MB with 1,000 calls in flight",
        rss_kb.map_or("n/a".into(), |kb| format!("{:.1} MB", kb as f64 / 1024.0)),
        rss_kb.map(|kb| kb <= 50 * 1024),
    ));
    let _ = writeln!(out, "\n## Goals\n\n| goal | measured | met |\n|---|---:|---|");
    for (goal, measured, met) in rows {
        let met = match met {
            Some(true) => "yes",
            Some(false) => "no",
            None => "n/a",
        };
        let _ = writeln!(out, "| {goal} | {measured} | {met} |");
    }
}

fn pct(x: Option<f64>) -> String {
    x.map_or("n/a".into(), |x| format!("{:+.0}%", x * 100.0))
}
