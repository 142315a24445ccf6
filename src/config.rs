//! Process configuration: every flag has an environment variable, and every
//! value is checked here, once, before anything starts.

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use clap::{Parser, ValueEnum};

/// How log lines are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Rate-limit headers added to Envoy ShouldRateLimit answers.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum RlsHeaders {
    /// None.
    Off,
    /// `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset` (IETF draft).
    Draft,
    /// `X-RateLimit-Limit`, `X-RateLimit-Remaining`, `X-RateLimit-Reset`.
    X,
}

/// cachecoord: one gRPC contract in front of Redis for caching, sessions,
/// rate limits, locks and counters.
#[derive(Clone, Debug, Parser)]
#[command(name = "cachecoord", version, about, long_about = None)]
pub struct Config {
    /// Address the gRPC server listens on.
    #[arg(long, env = "CACHECOORD_LISTEN", default_value = "0.0.0.0:50051")]
    pub listen: SocketAddr,

    /// Redis URL, naming the topology: redis://[[user]:password@]host:port[/db]
    /// (one server); redis+cluster://[[user]:password@]host:port,host:port
    /// (Redis Cluster, seed nodes); redis+sentinel://[[user]:password@]host:port,host:port/master[/db]
    /// (the master the sentinels name; ?sentinel_password= for the
    /// sentinels' own). rediss, rediss+cluster, rediss+sentinel for TLS.
    #[arg(long, env = "REDIS_URL", default_value = "redis://127.0.0.1:6379", hide_env_values = true)]
    pub redis_url: String,

    /// PEM file of the CA that signed Redis's TLS certificates (default: the
    /// system's web roots).
    #[arg(long, env = "CACHECOORD_REDIS_TLS_CA")]
    pub redis_tls_ca: Option<std::path::PathBuf>,

    /// PEM file of a client certificate to present to Redis over TLS.
    #[arg(long, env = "CACHECOORD_REDIS_TLS_CERT")]
    pub redis_tls_cert: Option<std::path::PathBuf>,

    /// PEM file of the key of --redis-tls-cert.
    #[arg(long, env = "CACHECOORD_REDIS_TLS_KEY")]
    pub redis_tls_key: Option<std::path::PathBuf>,

    /// Redis connections that all calls share, round robin (each is
    /// multiplexed: concurrent calls on one are pipelined).
    #[arg(long, env = "CACHECOORD_REDIS_CONNECTIONS", default_value_t = 4)]
    pub redis_connections: usize,

    /// Most Redis commands in flight at once, over all connections; past it,
    /// calls wait (within --redis-timeout) instead of queueing without bound.
    #[arg(long, env = "CACHECOORD_REDIS_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub redis_max_in_flight: usize,

    /// Longest wait to open a Redis connection.
    #[arg(long, env = "CACHECOORD_REDIS_CONNECT_TIMEOUT", default_value = "2s", value_parser = duration)]
    pub redis_connect_timeout: Duration,

    /// Longest wait for one Redis operation (connecting included); past it
    /// the RPC fails with UNAVAILABLE.
    #[arg(long, env = "CACHECOORD_REDIS_TIMEOUT", default_value = "1s", value_parser = duration)]
    pub redis_timeout: Duration,

    /// Prefix of every Redis key and channel the service uses.
    #[arg(long, env = "CACHECOORD_KEY_PREFIX", default_value = "cc")]
    pub key_prefix: String,

    /// TTL of a cache entry written without one.
    #[arg(long, env = "CACHECOORD_CACHE_DEFAULT_TTL", default_value = "1h", value_parser = duration)]
    pub cache_default_ttl: Duration,

    /// Lifetime of a Fetch fill lease when the request gives none.
    #[arg(long, env = "CACHECOORD_CACHE_FILL_TIMEOUT", default_value = "10s", value_parser = duration)]
    pub cache_fill_timeout: Duration,

    /// Idle timeout of a session created without one; a value above
    /// --max-ttl is cut to it (so lowering --max-ttl alone stays valid).
    #[arg(long, env = "CACHECOORD_SESSION_DEFAULT_TTL", default_value = "24h", value_parser = duration)]
    pub session_default_ttl: Duration,

    /// Most live sessions one user may have; creating one more evicts the
    /// user's oldest. 0 means unlimited. Bounded by default because the
    /// session scripts walk a user's whole index inside Redis (RELIABILITY.md).
    #[arg(long, env = "CACHECOORD_SESSION_MAX_PER_USER", default_value_t = 100)]
    pub session_max_per_user: u32,

    /// Largest session data, in bytes of JSON. A merge scans the stored JSON
    /// inside Redis, which blocks every other client meanwhile: at the
    /// costliest shape that takes about 0.2 ms per KiB (RELIABILITY.md).
    #[arg(long, env = "CACHECOORD_SESSION_MAX_DATA_BYTES", default_value_t = 16 << 10)]
    pub session_max_data_bytes: usize,

    /// Replicas that must acknowledge a lock grant (Redis WAIT) before it is
    /// answered, so a fail-over to one of them keeps it; a grant they do not
    /// acknowledge within half of --redis-timeout is released and the call
    /// fails UNAVAILABLE. 0 (the default) answers at once. Lock calls then
    /// use connections of their own, since WAIT holds a connection.
    #[arg(long, env = "CACHECOORD_LOCK_REPLICAS", default_value_t = 0)]
    pub lock_replicas: usize,

    /// Lease of a lock acquired or extended without a TTL.
    #[arg(long, env = "CACHECOORD_LOCK_DEFAULT_TTL", default_value = "30s", value_parser = duration)]
    pub lock_default_ttl: Duration,

    /// Longest key, name or tag, in bytes.
    #[arg(long, env = "CACHECOORD_MAX_KEY_BYTES", default_value_t = 512)]
    pub max_key_bytes: usize,

    /// Largest value, in bytes.
    #[arg(long, env = "CACHECOORD_MAX_VALUE_BYTES", default_value_t = 1 << 20)]
    pub max_value_bytes: usize,

    /// Most items in one batch (keys, entries, tags, tokens, limits).
    #[arg(long, env = "CACHECOORD_MAX_BATCH", default_value_t = 1000)]
    pub max_batch: usize,

    /// Most limits in one RateLimit Check (and descriptors in one Envoy
    /// ShouldRateLimit). A check is one Lua script, atomic over all its
    /// limits, and blocks Redis about 13 µs per limit: the default keeps it
    /// under 5 ms (RELIABILITY.md).
    #[arg(long, env = "CACHECOORD_RATE_LIMIT_MAX_LIMITS", default_value_t = 200)]
    pub rate_limit_max_limits: usize,

    /// Most deltas in one Stats Increment. An increment is one Lua script,
    /// atomic over all its deltas, and blocks Redis about 30 µs per delta:
    /// the default keeps it under 5 ms (RELIABILITY.md).
    #[arg(long, env = "CACHECOORD_STATS_MAX_DELTAS", default_value_t = 100)]
    pub stats_max_deltas: usize,

    /// Most tags on one cache entry. An entry is written by one Lua script
    /// with its tag list, and a 1 MiB value with 1,000 long tags blocks
    /// Redis about 5 ms: the default keeps a write near 3 ms (RELIABILITY.md).
    #[arg(long, env = "CACHECOORD_CACHE_MAX_TAGS", default_value_t = 100)]
    pub cache_max_tags: usize,

    /// Longest TTL a request may ask for.
    #[arg(long, env = "CACHECOORD_MAX_TTL", default_value = "30d", value_parser = duration)]
    pub max_ttl: Duration,

    /// IANA time zone whose hours and days bound Stats buckets (bundled tz database).
    #[arg(long, env = "CACHECOORD_STATS_TIME_ZONE", default_value = "UTC")]
    pub stats_time_zone: String,

    /// How long Stats minute buckets are kept after they end.
    #[arg(long, env = "CACHECOORD_STATS_RETENTION_MINUTE", default_value = "48h", value_parser = duration)]
    pub stats_retention_minute: Duration,

    /// How long Stats hour buckets are kept after they end.
    #[arg(long, env = "CACHECOORD_STATS_RETENTION_HOUR", default_value = "30d", value_parser = duration)]
    pub stats_retention_hour: Duration,

    /// How long Stats day buckets and daily unique sets are kept after they end.
    #[arg(long, env = "CACHECOORD_STATS_RETENTION_DAY", default_value = "400d", value_parser = duration)]
    pub stats_retention_day: Duration,

    /// Most buckets (or days) one GetSeries or CountUnique may span.
    #[arg(long, env = "CACHECOORD_STATS_MAX_BUCKETS", default_value_t = 1000)]
    pub stats_max_buckets: usize,

    /// Longest CountActive window; members not seen for longer are trimmed.
    #[arg(long, env = "CACHECOORD_STATS_ACTIVE_WINDOW_MAX", default_value = "24h", value_parser = duration)]
    pub stats_active_window_max: Duration,
    /// Longest a RevokeToken keeps a token revoked, from now: at least the
    /// life of the longest-lived token you revoke (refresh tokens included).
    #[arg(long, env = "CACHECOORD_MAX_REVOCATION_TTL", default_value = "366d", value_parser = duration)]
    pub max_revocation_ttl: Duration,

    /// API keys file (TOML; see README "Securing it"). Without one,
    /// authentication is off: anyone who reaches --listen can call
    /// everything (logged as a warning at start-up).
    #[arg(long, env = "CACHECOORD_AUTH_KEYS_FILE")]
    pub auth_keys_file: Option<PathBuf>,

    /// How often --auth-keys-file is checked for changes (it is also re-read
    /// on SIGHUP); 0s: only on SIGHUP.
    #[arg(long, env = "CACHECOORD_AUTH_KEYS_POLL", default_value = "1s", value_parser = duration)]
    pub auth_keys_poll: Duration,

    /// With --auth-keys-file, require a key for grpc.health.v1.Health too
    /// (by default health answers anyone, for orchestrators' probes).
    #[arg(long, env = "CACHECOORD_AUTH_HEALTH_NEEDS_KEY", default_value_t = false)]
    pub auth_health_needs_key: bool,

    /// With --auth-keys-file, require a key for server reflection too (by
    /// default it answers anyone: it tells only the public contract).
    #[arg(long, env = "CACHECOORD_AUTH_REFLECTION_NEEDS_KEY", default_value_t = false)]
    pub auth_reflection_needs_key: bool,

    /// When Redis is unavailable, let rate-limit checks pass (`allowed`,
    /// `unchecked`) instead of failing them with UNAVAILABLE.
    #[arg(long, env = "CACHECOORD_RATE_LIMIT_FAIL_OPEN", default_value_t = false)]
    pub rate_limit_fail_open: bool,

    /// envoyproxy/ratelimit YAML config files or directories (their *.yaml
    /// and *.yml files); repeat the flag or separate with commas. When set,
    /// envoy.service.ratelimit.v3.RateLimitService is served.
    #[arg(long, env = "CACHECOORD_RLS_CONFIG", value_delimiter = ',')]
    pub rls_config: Vec<PathBuf>,

    /// How often the --rls-config files are checked for changes; 0s: only
    /// on SIGHUP.
    #[arg(long, env = "CACHECOORD_RLS_CONFIG_POLL", default_value = "1s", value_parser = duration)]
    pub rls_config_poll: Duration,

    /// Rate-limit headers in ShouldRateLimit answers (for Envoy to add to
    /// the client's response).
    #[arg(long, env = "CACHECOORD_RLS_RESPONSE_HEADERS", value_enum, default_value = "off")]
    pub rls_response_headers: RlsHeaders,

    /// Largest gRPC message accepted or sent, in bytes.
    #[arg(long, env = "CACHECOORD_MAX_MESSAGE_BYTES", default_value_t = 16 << 20)]
    pub max_message_bytes: usize,

    /// How long in-flight RPCs may run on after SIGTERM/SIGINT.
    #[arg(long, env = "CACHECOORD_SHUTDOWN_GRACE", default_value = "10s", value_parser = duration)]
    pub shutdown_grace: Duration,

    /// Address serving Prometheus metrics at /metrics (plain HTTP), e.g.
    /// 127.0.0.1:9090; unset (the default): no metrics are recorded.
    #[arg(long, env = "CACHECOORD_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,

    /// OpenTelemetry collector receiving traces by OTLP/gRPC, e.g.
    /// http://otel-collector:4317; unset (the default): no traces.
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, when set, takes precedence.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Log line format.
    #[arg(long, env = "CACHECOORD_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// TLS on the gRPC port (--tls-*).
    #[command(flatten)]
    pub tls: crate::tls::TlsConfig,

    /// A task other than serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Tasks other than serving.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
    /// API keys for --auth-keys-file.
    #[command(subcommand)]
    Keys(KeysCommand),
}

/// `cachecoord keys ...`
#[derive(Clone, Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Makes a fresh API key: prints the key on stderr (give it to the
    /// caller; it is shown only this once) and its entry for the keys file
    /// on stdout (`cachecoord keys new ... >> keys.toml`).
    New {
        /// The key's id, named in logs: 1..64 of A-Z a-z 0-9 _ -.
        #[arg(long)]
        id: String,
        /// The tenant whose key space the key's calls use.
        #[arg(long)]
        tenant: String,
        /// What it may call: `*`, services (cachecoord.v1.CacheService) or
        /// methods (cachecoord.v1.LockService/Acquire); comma-separated.
        #[arg(long, value_delimiter = ',', default_value = "*")]
        allow: Vec<String>,
    },
}

fn duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("{e} (examples: 500ms, 2s, 1h, 30d)"))
}

impl Config {
    /// Checks the values that parse but make no sense, collecting them all.
    pub fn validate(&self) -> Result<(), String> {
        let mut bad = Vec::new();
        let mut check = |ok: bool, what: &str| {
            if !ok {
                bad.push(what.to_string());
            }
        };
        let topology = crate::store::Topology::parse(&self.redis_url);
        check(topology.is_ok(), &format!("--redis-url {}", topology.err().unwrap_or_default()));
        check(
            self.redis_tls_cert.is_some() == self.redis_tls_key.is_some(),
            "--redis-tls-cert and --redis-tls-key go together",
        );
        check(self.redis_connections > 0, "--redis-connections must be at least 1");
        check(
            self.redis_max_in_flight >= self.redis_connections,
            "--redis-max-in-flight must be at least --redis-connections",
        );
        check(!self.redis_connect_timeout.is_zero(), "--redis-connect-timeout must be positive");
        check(!self.redis_timeout.is_zero(), "--redis-timeout must be positive");
        check(
            !self.key_prefix.is_empty() && self.key_prefix.len() <= 64 && !self.key_prefix.contains(['{', '}']),
            "--key-prefix must be 1..64 bytes without '{' or '}'",
        );
        check(self.max_key_bytes > 0, "--max-key-bytes must be at least 1");
        check(self.max_value_bytes > 0, "--max-value-bytes must be at least 1");
        check(self.max_batch > 0, "--max-batch must be at least 1");
        check(self.rate_limit_max_limits > 0, "--rate-limit-max-limits must be at least 1");
        check(self.stats_max_deltas > 0, "--stats-max-deltas must be at least 1");
        check(self.cache_max_tags > 0, "--cache-max-tags must be at least 1");
        check(!self.max_ttl.is_zero(), "--max-ttl must be positive");
        check(!self.max_revocation_ttl.is_zero(), "--max-revocation-ttl must be positive");
        check(
            !self.cache_default_ttl.is_zero() && self.cache_default_ttl <= self.max_ttl,
            "--cache-default-ttl must be positive and at most --max-ttl",
        );
        check(
            !self.cache_fill_timeout.is_zero() && self.cache_fill_timeout <= self.max_ttl,
            "--cache-fill-timeout must be positive and at most --max-ttl",
        );
        check(!self.session_default_ttl.is_zero(), "--session-default-ttl must be positive");
        check(
            self.session_max_data_bytes >= 2 && self.session_max_data_bytes + 64 * 1024 <= self.max_message_bytes,
            "--session-max-data-bytes must be at least 2 and leave 64 KiB of --max-message-bytes",
        );
        check(
            self.lock_default_ttl >= Duration::from_millis(1) && self.lock_default_ttl <= self.max_ttl,
            "--lock-default-ttl must be at least 1ms and at most --max-ttl",
        );
        check(
            self.max_message_bytes >= self.max_value_bytes + 64 * 1024,
            "--max-message-bytes must exceed --max-value-bytes by at least 64 KiB",
        );
        check(
            jiff::tz::TimeZone::get(&self.stats_time_zone).is_ok(),
            "--stats-time-zone must be an IANA time zone name such as UTC or Asia/Shanghai",
        );
        check(!self.stats_retention_minute.is_zero(), "--stats-retention-minute must be positive");
        check(!self.stats_retention_hour.is_zero(), "--stats-retention-hour must be positive");
        check(!self.stats_retention_day.is_zero(), "--stats-retention-day must be positive");
        check(self.stats_max_buckets > 0, "--stats-max-buckets must be at least 1");
        check(
            self.stats_active_window_max >= Duration::from_millis(1),
            "--stats-active-window-max must be at least 1ms",
        );
        bad.extend(self.tls.problems());
        if bad.is_empty() { Ok(()) } else { Err(bad.join("; ")) }
    }

    /// The Redis URL with any password replaced, for logs.
    pub fn redacted_redis_url(&self) -> String {
        redact_url(&self.redis_url)
    }
}

/// Replaces the userinfo part of a URL (`user:password@`) with `***@`.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}***{}", &url[..scheme_end + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Config, clap::Error> {
        Config::try_parse_from(std::iter::once("cachecoord").chain(args.iter().copied()))
    }

    #[test]
    fn defaults_are_valid() {
        let config = parse(&[]).expect("defaults parse");
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.listen.port(), 50051);
        assert_eq!(config.max_ttl, Duration::from_secs(30 * 24 * 3600));
    }

    #[test]
    fn every_bad_value_is_named_at_once() {
        let config = parse(&["--redis-connections", "0", "--key-prefix", "a{b", "--max-batch", "0"]).expect("parses");
        let err = config.validate().expect_err("invalid");
        assert!(err.contains("--redis-connections"), "{err}");
        assert!(err.contains("--key-prefix"), "{err}");
        assert!(err.contains("--max-batch"), "{err}");
    }

    #[test]
    fn stats_flags_are_checked() {
        let config = parse(&["--stats-time-zone", "Mars/Olympus", "--stats-max-buckets", "0"]).expect("parses");
        let err = config.validate().expect_err("invalid");
        assert!(err.contains("--stats-time-zone"), "{err}");
        assert!(err.contains("--stats-max-buckets"), "{err}");
        let config = parse(&["--stats-time-zone", "Asia/Shanghai", "--stats-retention-day", "0s"]).expect("parses");
        assert!(config.validate().expect_err("invalid").contains("--stats-retention-day"));
        assert_eq!(parse(&["--stats-time-zone", "Asia/Shanghai"]).expect("parses").validate(), Ok(()));
    }

    #[test]
    fn unparsable_duration_is_rejected() {
        assert!(parse(&["--redis-timeout", "soon"]).is_err());
    }

    #[test]
    fn bad_redis_url_is_rejected() {
        let config = parse(&["--redis-url", "http://x"]).expect("parses");
        assert!(config.validate().expect_err("invalid").contains("--redis-url"));
    }

    #[test]
    fn rls_flags_take_several_files() {
        let config = parse(&["--rls-config", "a.yaml,dir", "--rls-config", "b.yml"]).expect("parses");
        assert_eq!(config.rls_config, vec![PathBuf::from("a.yaml"), PathBuf::from("dir"), PathBuf::from("b.yml")]);
        assert_eq!(config.rls_config_poll, Duration::from_secs(1));
        assert_eq!(config.rls_response_headers, RlsHeaders::Off);
        assert!(parse(&[]).expect("parses").rls_config.is_empty());
        assert!(parse(&["--rls-response-headers", "sometimes"]).is_err());
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(redact_url("redis://:s3cret@host:6379/2"), "redis://***@host:6379/2");
        assert_eq!(redact_url("redis://host:6379"), "redis://host:6379");
    }
}
