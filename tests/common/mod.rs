//! Test harness: a throwaway `redis-server` per test and the real service
//! in-process on port 0, with typed clients.
//!
//! Every test gets its own Redis (free port, no persistence, temp dir,
//! killed on drop, its log printed when the test fails) and its own key
//! prefix, so tests run in parallel and never touch the Redis on 6379.

#![allow(dead_code)]

pub mod certs;
pub mod cluster;

use std::{
    collections::HashMap,
    net::TcpListener as StdListener,
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
    time::Duration,
};

use cachecoord::{
    config::Config,
    proto::{
        cache_service_client::CacheServiceClient, lock_service_client::LockServiceClient,
        rate_limit_service_client::RateLimitServiceClient, session_service_client::SessionServiceClient,
        stats_service_client::StatsServiceClient,
    },
};
use clap::Parser;
use deadpool_redis::redis;
use tokio::sync::oneshot;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// A redis-server of the test's own.
pub struct RedisServer {
    pub port: u16,
    /// Extra redis-server arguments, kept for restarts.
    args: Vec<String>,
    /// The password clients must give, if any.
    password: Option<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts redis-server on a free port and waits until it answers.
    pub async fn start() -> Self {
        Self::start_with(&[], None).await
    }

    /// Like `start`, but with an append-only file synced on every write, so
    /// `stop`/`restart` (a crash) keeps every acknowledged write.
    pub async fn start_persistent() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"], None).await
    }

    /// Starts redis-server that requires `password`.
    pub async fn start_with_password(password: &str) -> Self {
        Self::start_with(&["--requirepass", password], Some(password)).await
    }

    /// Starts redis-server with a TLS port as well (`tls_port`), serving
    /// `certs.redis` and requiring client certificates signed by `certs.ca`.
    /// The plain port stays open, for the harness's own checks.
    pub async fn start_tls(certs: &certs::Files) -> (Self, u16) {
        let tls_port = free_port().to_string();
        let path = |name: &str| certs.path(name).to_string_lossy().into_owned();
        let (cert, key, ca) = (path("redis.pem"), path("redis.key"), path("ca.pem"));
        let args = ["--tls-port", &tls_port, "--tls-cert-file", &cert, "--tls-key-file", &key];
        let args = [&args[..], &["--tls-ca-cert-file", &ca, "--tls-auth-clients", "yes"]].concat();
        let server = Self::start_with(&args, None).await;
        (server, tls_port.parse().expect("port"))
    }

    /// Starts redis-server with extra arguments (and the password they set).
    pub async fn start_with(args: &[&str], password: Option<&str>) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let args = args.iter().map(|a| a.to_string()).collect();
        let mut server = Self { port, args, password: password.map(String::from), dir, child: None };
        server.spawn().await;
        server
    }

    pub fn url(&self) -> String {
        match &self.password {
            Some(password) => format!("redis://:{password}@127.0.0.1:{}", self.port),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// A plain client for inspecting what the service wrote (no reply
    /// timeout: fault tests send commands that block Redis on purpose).
    pub async fn client(&self) -> redis::aio::MultiplexedConnection {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        redis::Client::open(self.url())
            .expect("redis url")
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .expect("connect to test redis")
    }

    /// Like `client`, but `None` when the server does not answer.
    pub async fn try_client(&self) -> Option<redis::aio::MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(1)))
            .set_response_timeout(Some(Duration::from_secs(2)));
        redis::Client::open(self.url()).ok()?.get_multiplexed_async_connection_with_config(&config).await.ok()
    }

    /// True unless `stop` killed it.
    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// Calls per command so far, from INFO commandstats (commands run inside
    /// scripts included).
    pub async fn command_calls(&self) -> HashMap<String, u64> {
        let mut conn = self.client().await;
        let info: String = redis::cmd("INFO").arg("commandstats").query_async(&mut conn).await.expect("INFO");
        info.lines()
            .filter_map(|line| {
                let (name, rest) = line.strip_prefix("cmdstat_")?.split_once(":calls=")?;
                Some((name.to_string(), rest.split(',').next()?.parse().ok()?))
            })
            .collect()
    }

    /// How many times Redis has run `command` (lower case, e.g. `evalsha`).
    pub async fn calls(&self, command: &str) -> u64 {
        self.command_calls().await.get(command).copied().unwrap_or(0)
    }

    /// Blocks Redis with `DEBUG SLEEP seconds` (a slow Redis, not a dead
    /// one) and returns once it has taken hold; the handle ends when Redis
    /// answers again.
    pub async fn stall(&self, seconds: f64) -> tokio::task::JoinHandle<()> {
        let mut sleeper = self.client().await;
        let mut probe = self.client().await;
        let stall = tokio::spawn(async move {
            let _: redis::RedisResult<()> =
                redis::cmd("DEBUG").arg("SLEEP").arg(seconds).query_async(&mut sleeper).await;
        });
        let stalled = async {
            loop {
                let ping = redis::cmd("PING");
                if tokio::time::timeout(Duration::from_millis(50), ping.query_async::<String>(&mut probe))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), stalled).await.expect("DEBUG SLEEP never took hold");
        stall
    }

    /// Kills the server (as a crash would) and waits for it to be gone.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            // DEBUG SLEEP lets fault tests make Redis slow.
            .args(["--enable-debug-command", "yes"])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.log_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        self.child = Some(child);
        for _ in 0..500 {
            if let Ok(client) = redis::Client::open(self.url())
                && let Ok(mut conn) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("redis-server on port {} did not start", self.port);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            eprintln!("--- redis-server log (port {}) ---\n{log}", self.port);
        }
    }
}

/// Anything the service can be pointed at with `--redis-url`.
pub trait Target {
    fn url(&self) -> String;
}

impl Target for RedisServer {
    fn url(&self) -> String {
        RedisServer::url(self)
    }
}

/// The real service, in-process on a free port.
pub struct TestServer {
    pub addr: std::net::SocketAddr,
    pub prefix: String,
    pub channel: Channel,
    stop: Option<oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

static PREFIXES: AtomicUsize = AtomicUsize::new(0);

impl TestServer {
    /// Starts the service against `redis` with default configuration.
    pub async fn start(redis: &impl Target) -> Self {
        Self::start_with(redis, &[]).await
    }

    /// Starts the service with extra flags, and waits until it is SERVING.
    pub async fn start_with(redis: &impl Target, flags: &[&str]) -> Self {
        let server = Self::start_unchecked(redis, flags).await;
        server.wait_for_health("", ServingStatus::Serving).await;
        server
    }

    /// Starts the service without waiting for Redis.
    pub async fn start_unchecked(redis: &impl Target, flags: &[&str]) -> Self {
        let prefix = format!("t{}x{}", std::process::id(), PREFIXES.fetch_add(1, Ordering::Relaxed));
        Self::start_on(redis, &prefix, flags).await
    }

    /// A second instance sharing `other`'s Redis and key prefix.
    pub async fn start_sibling(redis: &impl Target, other: &TestServer) -> Self {
        let server = Self::start_on(redis, &other.prefix, &[]).await;
        server.wait_for_health("", ServingStatus::Serving).await;
        server
    }

    async fn start_on(redis: &impl Target, prefix: &str, flags: &[&str]) -> Self {
        let prefix = prefix.to_string();
        let url = redis.url();
        let mut args = vec!["cachecoord", "--key-prefix", &prefix, "--listen", "127.0.0.1:0"];
        if !flags.contains(&"--redis-url") {
            args.extend(["--redis-url", &url]);
        }
        args.extend_from_slice(flags);
        let config = Config::try_parse_from(args).expect("test flags parse");
        config.validate().expect("test flags valid");

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            cachecoord::server::run(config, listener, async {
                let _ = stopped.await;
            })
            .await
            .expect("server runs");
        });
        let channel = Channel::from_shared(format!("http://{addr}")).expect("uri").connect_lazy();
        Self { addr, prefix, channel, stop: Some(stop), task: Some(task) }
    }

    pub fn cache(&self) -> CacheServiceClient<Channel> {
        CacheServiceClient::new(self.channel.clone()).max_decoding_message_size(64 << 20)
    }
    pub fn sessions(&self) -> SessionServiceClient<Channel> {
        SessionServiceClient::new(self.channel.clone())
    }
    pub fn rate_limit(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.channel.clone())
    }
    pub fn locks(&self) -> LockServiceClient<Channel> {
        LockServiceClient::new(self.channel.clone())
    }
    pub fn stats(&self) -> StatsServiceClient<Channel> {
        StatsServiceClient::new(self.channel.clone())
    }
    pub fn health(&self) -> HealthClient<Channel> {
        HealthClient::new(self.channel.clone())
    }

    /// The health status of `service` ("" for overall).
    pub async fn health_status(&self, service: &str) -> ServingStatus {
        let request = HealthCheckRequest { service: service.to_string() };
        match self.health().check(request).await {
            Ok(response) => response.into_inner().status(),
            Err(_) => ServingStatus::Unknown,
        }
    }

    /// Waits (by watching the health stream) until `service` reports `want`;
    /// returns how long that took. Panics after 10 s.
    pub async fn wait_for_health(&self, service: &str, want: ServingStatus) -> Duration {
        let started = std::time::Instant::now();
        let watch = async {
            loop {
                let request = HealthCheckRequest { service: service.to_string() };
                if let Ok(response) = self.health().watch(request).await {
                    let mut stream = response.into_inner();
                    while let Ok(Some(update)) = stream.message().await {
                        if update.status() == want {
                            return;
                        }
                    }
                }
                // The server is not listening yet; try again shortly.
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(10), watch)
            .await
            .unwrap_or_else(|_| panic!("health of {service:?} never became {want:?}"));
        started.elapsed()
    }

    /// Triggers shutdown and waits for `run` to return.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }

    /// The Redis key the service uses for cache entry `key`.
    pub fn cache_key(&self, key: &str) -> String {
        format!("{}:c:{{{key}}}", self.prefix)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A protobuf Duration of `ms` milliseconds.
pub fn ms(ms: u64) -> Option<prost_types::Duration> {
    Some(prost_types::Duration { seconds: (ms / 1000) as i64, nanos: ((ms % 1000) * 1_000_000) as i32 })
}

/// Asserts a status is INVALID_ARGUMENT and its message starts with `field`.
#[track_caller]
pub fn assert_invalid<T: std::fmt::Debug>(result: Result<T, tonic::Status>, field: &str) {
    let status = result.expect_err("expected INVALID_ARGUMENT");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with(field), "message {:?} should name {field:?}", status.message());
}
