//! The processes a scenario runs and breaks: its own redis-server and its own
//! service instances (this binary in `serve` mode, each a child process so it
//! can be killed or paused), all on free ports of 127.0.0.1.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use redis::aio::MultiplexedConnection;
use tonic::transport::Channel;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// Errors of the harness itself (not of the service under test).
pub type Fallible<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// A port nobody listens on right now.
pub fn free_port() -> Fallible<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Sends `signal` to `pid` (SIGSTOP/SIGCONT/SIGKILL).
pub fn signal(pid: u32, signal: libc::c_int) {
    // SAFETY: kill(2) has no memory effects; a stale pid only fails.
    unsafe {
        libc::kill(pid as libc::pid_t, signal);
    }
}

/// Resident set size of a process, in KiB.
pub fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Open file descriptors of a process (sockets included).
pub fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

/// A redis-server of the scenario's own.
pub struct RedisProc {
    pub port: u16,
    /// Extra arguments, kept for restarts.
    args: Vec<String>,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl RedisProc {
    /// Starts redis-server on a free port, with an append-only file
    /// (`everysec`: a killed process loses nothing it acknowledged, since
    /// the file is written before the reply; only fsync is deferred).
    pub async fn start(extra: &[&str]) -> Fallible<Self> {
        let mut args = vec!["--appendonly", "yes", "--appendfsync", "everysec"];
        args.extend_from_slice(extra);
        let mut redis = Self {
            port: free_port()?,
            args: args.iter().map(|a| a.to_string()).collect(),
            dir: tempfile::tempdir()?,
            child: None,
        };
        redis.spawn().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A connection for the scenario's own commands (no reply timeout:
    /// some of them block Redis on purpose).
    pub async fn admin(&self) -> Fallible<MultiplexedConnection> {
        let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
        Ok(redis::Client::open(self.url())?.get_multiplexed_async_connection_with_config(&config).await?)
    }

    /// SIGKILL, as a crash would, and wait for it to be gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and directory (so the AOF replays).
    pub async fn restart(&mut self) -> Fallible<()> {
        self.kill();
        self.spawn().await
    }

    async fn spawn(&mut self) -> Fallible<()> {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--enable-debug-command", "yes"])
            .args(&self.args)
            .arg("--dir")
            .arg(self.dir.path())
            .arg("--logfile")
            .arg(self.dir.path().join("redis.log"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| format!("redis-server must be installed: {e}"))?;
        self.child = Some(child);
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(20) {
            if let Ok(mut conn) = self.admin().await
                && redis::cmd("PING").query_async::<String>(&mut conn).await.is_ok()
            {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Err(format!("redis-server on port {} did not start", self.port).into())
    }
}

impl Drop for RedisProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One service instance: this binary in `serve` mode, in its own process.
pub struct ServiceProc {
    pub port: u16,
    /// cachecoord flags, kept for restarts.
    flags: Vec<String>,
    /// stdout and stderr of every run of this instance, appended.
    log: PathBuf,
    child: Option<Child>,
    pub channel: Channel,
}

impl ServiceProc {
    /// Starts an instance against `redis_url` under `prefix`, logging into
    /// `dir`, and waits until it reports SERVING.
    pub async fn start(name: &str, dir: &Path, redis_url: &str, prefix: &str, extra: &[&str]) -> Fallible<Self> {
        let port = free_port()?;
        let mut flags: Vec<String> = ["--listen", &format!("127.0.0.1:{port}"), "--redis-url", redis_url]
            .iter()
            .map(|s| s.to_string())
            .collect();
        flags.extend(["--key-prefix".to_string(), prefix.to_string()]);
        flags.extend(extra.iter().map(|s| s.to_string()));
        let channel = Channel::from_shared(format!("http://127.0.0.1:{port}"))?
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy();
        let mut service = Self { port, flags, log: dir.join(format!("{name}.log")), child: None, channel };
        service.spawn().await?;
        Ok(service)
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A new connection of its own (the shared `channel` multiplexes).
    pub fn new_channel(&self) -> Fallible<Channel> {
        Ok(Channel::from_shared(format!("http://127.0.0.1:{}", self.port))?
            .connect_timeout(Duration::from_millis(500))
            .connect_lazy())
    }

    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) -> Fallible<()> {
        self.kill();
        self.spawn().await
    }

    /// Lines of its log that report a panic.
    pub fn panics(&self) -> usize {
        std::fs::read_to_string(&self.log).unwrap_or_default().lines().filter(|l| l.contains("panicked")).count()
    }

    /// Lines of its log at ERROR level (internal errors are logged so).
    pub fn error_lines(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains("ERROR"))
            .map(str::to_string)
            .collect()
    }

    async fn spawn(&mut self) -> Fallible<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log)?;
        let child = Command::new(std::env::current_exe()?)
            .arg("serve")
            .args(&self.flags)
            .env("RUST_LOG", std::env::var("TORTURE_SERVICE_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()?;
        self.child = Some(child);
        wait_serving(&self.channel, Duration::from_secs(20)).await
    }
}

impl Drop for ServiceProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Waits until the overall health on `channel` is SERVING.
pub async fn wait_serving(channel: &Channel, within: Duration) -> Fallible<()> {
    let started = Instant::now();
    while started.elapsed() < within {
        let mut health = HealthClient::new(channel.clone());
        let mut request = tonic::Request::new(HealthCheckRequest { service: String::new() });
        request.set_timeout(Duration::from_millis(500));
        if let Ok(response) = health.check(request).await
            && response.into_inner().status() == ServingStatus::Serving
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the service did not report SERVING in time".into())
}

/// Redis's `connected_clients`.
pub async fn redis_clients(conn: &mut MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO").arg("clients").query_async(conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("connected_clients:")?.trim().parse().ok())
}

/// Redis's `used_memory`, in bytes.
pub async fn redis_memory(conn: &mut MultiplexedConnection) -> Option<u64> {
    let info: String = redis::cmd("INFO").arg("memory").query_async(conn).await.ok()?;
    info.lines().find_map(|l| l.strip_prefix("used_memory:")?.trim().parse().ok())
}

/// Keys in Redis's current database.
pub async fn redis_keys(conn: &mut MultiplexedConnection) -> Option<u64> {
    redis::cmd("DBSIZE").query_async(conn).await.ok()
}
