//! Throwaway Redis Cluster and Sentinel setups, from the `redis-server` and
//! `redis-cli` binaries on free ports (no Docker), killed on drop.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::Duration,
};

use deadpool_redis::redis::{self, aio::MultiplexedConnection};

use super::{RedisServer, Target, free_port};

/// Failovers in tests should take about a second, not the default 15.
const NODE_TIMEOUT_MS: &str = "1000";

/// A 3-master, 3-replica Redis Cluster.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl Target for RedisCluster {
    fn url(&self) -> String {
        let seeds: Vec<String> = self.nodes.iter().take(3).map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", seeds.join(","))
    }
}

impl RedisCluster {
    /// Starts six nodes and joins them with `redis-cli --cluster create`.
    pub async fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..6 {
            let args = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                NODE_TIMEOUT_MS,
                // Replicas in sync at once, not after the default 5 s delay.
                "--repl-diskless-sync-delay",
                "0",
            ];
            nodes.push(RedisServer::start_with(&args, None).await);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .output()
            .expect("redis-cli must be installed (see .ci/run)");
        assert!(output.status.success(), "cluster create: {}", String::from_utf8_lossy(&output.stdout));
        let cluster = Self { nodes };
        cluster.wait_until_stable().await;
        cluster
    }

    /// Waits until every live node reports the cluster OK, every slot
    /// served, and the same view of who is master.
    pub async fn wait_until_stable(&self) {
        for _ in 0..600 {
            if self.stable().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("cluster did not become stable");
    }

    async fn stable(&self) -> bool {
        let mut views = Vec::new();
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let Some(mut conn) = node.try_client().await else { return false };
            let info: String = match redis::cmd("CLUSTER").arg("INFO").query_async(&mut conn).await {
                Ok(info) => info,
                Err(_) => return false,
            };
            if !info.contains("cluster_state:ok")
                || !info.contains("cluster_slots_ok:16384")
                || !in_sync(&mut conn).await
            {
                return false;
            }
            views.push(masters_seen(&mut conn).await);
        }
        views.windows(2).all(|w| w[0] == w[1]) && views.first().is_some_and(|m| m.len() == 3)
    }

    /// A plain connection to the node on `port`.
    pub async fn node(&self, port: u16) -> MultiplexedConnection {
        self.nodes.iter().find(|n| n.port == port).expect("node").client().await
    }

    /// The port of the master serving `key` now.
    pub async fn master_of(&self, key: &str) -> u16 {
        let mut conn = self.any().await;
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut conn).await.expect("KEYSLOT");
        let ranges: Vec<redis::Value> = redis::cmd("CLUSTER").arg("SLOTS").query_async(&mut conn).await.expect("SLOTS");
        for range in ranges {
            let redis::Value::Array(range) = range else { continue };
            let (Some(redis::Value::Int(from)), Some(redis::Value::Int(to)), Some(redis::Value::Array(master))) =
                (range.first(), range.get(1), range.get(2))
            else {
                continue;
            };
            if (*from..=*to).contains(&slot)
                && let Some(redis::Value::Int(port)) = master.get(1)
            {
                return u16::try_from(*port).expect("port");
            }
        }
        panic!("no master serves slot {slot}");
    }

    /// A connection to any running node.
    pub async fn any(&self) -> MultiplexedConnection {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            if let Some(conn) = node.try_client().await {
                return conn;
            }
        }
        panic!("no cluster node answers");
    }

    /// Promotes a replica of the master serving `key` with `CLUSTER
    /// FAILOVER` (the old master stays up and becomes its replica); returns
    /// the new master's port once the whole cluster agrees.
    pub async fn failover(&self, key: &str) -> u16 {
        let old = self.master_of(key).await;
        let replica = self.replica_of(old).await;
        let mut conn = self.node(replica).await;
        // Redis drops a manual fail-over its master has not completed within
        // 5 s (a replica still catching up on a loaded machine): ask again.
        for _ in 0..4 {
            let _: () = redis::cmd("CLUSTER").arg("FAILOVER").query_async(&mut conn).await.expect("CLUSTER FAILOVER");
            if self.master_within(key, |port| port == replica, 240).await {
                return replica;
            }
        }
        panic!("the slot of {key:?} never moved to {replica}");
    }

    /// Kills the master serving `key` (SIGKILL); returns its port once a
    /// replica has taken over and the cluster agrees.
    pub async fn kill_master_of(&mut self, key: &str) -> u16 {
        let old = self.master_of(key).await;
        self.nodes.iter_mut().find(|n| n.port == old).expect("node").stop();
        self.wait_for_master(key, |port| port != old).await;
        old
    }

    /// Starts a killed node again (same port, same nodes.conf): it rejoins
    /// as a replica of the master that replaced it.
    pub async fn revive(&mut self, port: u16) {
        self.nodes.iter_mut().find(|n| n.port == port).expect("node").restart().await;
        self.wait_until_stable().await;
    }

    /// Moves the hash slot of `key`, with its keys, to another master while
    /// clients keep running (IMPORTING/MIGRATING, MIGRATE, SETSLOT NODE);
    /// returns the new master's port.
    pub async fn migrate_slot_of(&self, key: &str) -> u16 {
        let mut any = self.any().await;
        let slot: i64 = redis::cmd("CLUSTER").arg("KEYSLOT").arg(key).query_async(&mut any).await.expect("KEYSLOT");
        let source = self.master_of(key).await;
        let masters = masters_seen(&mut any).await;
        let target = *masters.iter().find(|&&p| p != source).expect("another master");
        let (mut from, mut to) = (self.node(source).await, self.node(target).await);
        let id = |conn: &mut MultiplexedConnection| {
            let mut conn = conn.clone();
            async move { redis::cmd("CLUSTER").arg("MYID").query_async::<String>(&mut conn).await.expect("MYID") }
        };
        let (source_id, target_id) = (id(&mut from).await, id(&mut to).await);
        let setslot = |conn: &mut MultiplexedConnection, state: &str, node: &str| {
            let mut conn = conn.clone();
            let (state, node) = (state.to_string(), node.to_string());
            async move {
                let _: () = redis::cmd("CLUSTER")
                    .arg("SETSLOT")
                    .arg(slot)
                    .arg(&state)
                    .arg(&node)
                    .query_async(&mut conn)
                    .await
                    .expect("SETSLOT");
            }
        };
        setslot(&mut to, "IMPORTING", &source_id).await;
        setslot(&mut from, "MIGRATING", &target_id).await;
        loop {
            let keys: Vec<String> = redis::cmd("CLUSTER")
                .arg("GETKEYSINSLOT")
                .arg(slot)
                .arg(100)
                .query_async(&mut from)
                .await
                .expect("GETKEYSINSLOT");
            if keys.is_empty() {
                break;
            }
            let _: () = redis::cmd("MIGRATE")
                .arg("127.0.0.1")
                .arg(target)
                .arg("")
                .arg(0)
                .arg(5000)
                .arg("KEYS")
                .arg(&keys)
                .query_async(&mut from)
                .await
                .expect("MIGRATE");
        }
        setslot(&mut to, "NODE", &target_id).await;
        setslot(&mut from, "NODE", &target_id).await;
        for port in masters.iter().filter(|&&p| p != source && p != target) {
            setslot(&mut self.node(*port).await, "NODE", &target_id).await;
        }
        self.wait_for_master(key, |port| port == target).await;
        target
    }

    async fn replica_of(&self, master: u16) -> u16 {
        for node in self.nodes.iter().filter(|n| n.is_running()) {
            let mut conn = node.client().await;
            let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.expect("ROLE");
            if let (Some(redis::Value::BulkString(kind)), Some(redis::Value::Int(port))) = (role.first(), role.get(2))
                && kind == b"slave"
                && *port == i64::from(master)
            {
                return node.port;
            }
        }
        panic!("no replica of {master}");
    }

    async fn wait_for_master(&self, key: &str, done: impl Fn(u16) -> bool) {
        assert!(self.master_within(key, done, 800).await, "the slot of {key:?} never moved");
    }

    /// Whether the cluster is stable with `key`'s master `done` within
    /// `polls` polls, 25 ms apart.
    async fn master_within(&self, key: &str, done: impl Fn(u16) -> bool, polls: usize) -> bool {
        for _ in 0..polls {
            if self.stable().await && done(self.master_of(key).await) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }
}

/// False for a replica whose link to its master is not up (still syncing).
async fn in_sync(conn: &mut MultiplexedConnection) -> bool {
    let info: String = redis::cmd("INFO").arg("replication").query_async(conn).await.unwrap_or_default();
    !info.contains("role:slave") || info.contains("master_link_status:up")
}

/// The ports of the masters serving slots, as `conn`'s node sees them.
async fn masters_seen(conn: &mut MultiplexedConnection) -> Vec<u16> {
    let ranges: Vec<redis::Value> = match redis::cmd("CLUSTER").arg("SLOTS").query_async(conn).await {
        Ok(ranges) => ranges,
        Err(_) => return Vec::new(),
    };
    let mut ports: Vec<u16> = ranges
        .iter()
        .filter_map(|range| match range {
            redis::Value::Array(range) => match range.get(2) {
                Some(redis::Value::Array(master)) => match master.get(1) {
                    Some(redis::Value::Int(port)) => u16::try_from(*port).ok(),
                    _ => None,
                },
                _ => None,
            },
            _ => None,
        })
        .collect();
    ports.sort_unstable();
    ports.dedup();
    ports
}

/// A master, two replicas and three sentinels monitoring it as `mymaster`.
pub struct RedisSentinel {
    pub servers: Vec<RedisServer>,
    sentinels: Vec<SentinelProcess>,
}

impl Target for RedisSentinel {
    fn url(&self) -> String {
        let sentinels: Vec<String> = self.sentinels.iter().map(|s| format!("127.0.0.1:{}", s.port)).collect();
        format!("redis+sentinel://{}/mymaster", sentinels.join(","))
    }
}

impl RedisSentinel {
    /// Starts the servers and sentinels and waits until every sentinel
    /// knows both replicas and the other sentinels.
    pub async fn start() -> Self {
        // Replicas in sync at once, not after the default 5 s delay.
        let master = RedisServer::start_with(&["--repl-diskless-sync-delay", "0"], None).await;
        let port = master.port.to_string();
        let mut servers = vec![master];
        for _ in 0..2 {
            let args = ["--replicaof", "127.0.0.1", &port, "--repl-diskless-sync-delay", "0"];
            servers.push(RedisServer::start_with(&args, None).await);
        }
        let sentinels = (0..3).map(|_| SentinelProcess::start(servers[0].port)).collect();
        let setup = Self { servers, sentinels };
        for _ in 0..800 {
            if setup.ready().await {
                return setup;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("sentinels did not discover the replicas and each other");
    }

    async fn ready(&self) -> bool {
        for server in &self.servers {
            let Some(mut conn) = server.try_client().await else { return false };
            if !in_sync(&mut conn).await {
                return false;
            }
        }
        for sentinel in &self.sentinels {
            let Some(mut conn) = sentinel.try_client().await else { return false };
            let replicas: Vec<redis::Value> =
                redis::cmd("SENTINEL").arg("REPLICAS").arg("mymaster").query_async(&mut conn).await.unwrap_or_default();
            let peers: Vec<redis::Value> = redis::cmd("SENTINEL")
                .arg("SENTINELS")
                .arg("mymaster")
                .query_async(&mut conn)
                .await
                .unwrap_or_default();
            if replicas.len() != 2 || peers.len() != 2 {
                return false;
            }
        }
        true
    }

    /// The port of the master the sentinels name now.
    pub async fn master_port(&self) -> u16 {
        for _ in 0..200 {
            if let Some(mut conn) = self.sentinels[0].try_client().await
                && let Ok((_, port)) = redis::cmd("SENTINEL")
                    .arg("GET-MASTER-ADDR-BY-NAME")
                    .arg("mymaster")
                    .query_async::<(String, u16)>(&mut conn)
                    .await
            {
                return port;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("no sentinel names the master");
    }

    /// The server on `port`.
    pub fn server(&self, port: u16) -> &RedisServer {
        self.servers.iter().find(|s| s.port == port).expect("server")
    }

    /// `SENTINEL FAILOVER` with the old master still alive; returns the new
    /// master's port once it has taken the role and the sentinels agree.
    pub async fn failover(&self) -> u16 {
        let old = self.master_port().await;
        let mut conn = self.sentinels[0].client().await;
        let _: () =
            redis::cmd("SENTINEL").arg("FAILOVER").arg("mymaster").query_async(&mut conn).await.expect("FAILOVER");
        for _ in 0..800 {
            let new = self.master_port().await;
            if new != old && self.is_master(new).await && !self.is_master(old).await {
                return new;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("sentinel failover did not complete");
    }

    async fn is_master(&self, port: u16) -> bool {
        // Sentinel kills client connections while it reconfigures.
        let Some(mut conn) = self.server(port).try_client().await else { return false };
        let role: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await.unwrap_or_default();
        matches!(role.first(), Some(redis::Value::BulkString(kind)) if kind == b"master")
    }
}

/// One `redis-server --sentinel`.
struct SentinelProcess {
    port: u16,
    dir: tempfile::TempDir,
    child: Child,
}

impl SentinelProcess {
    fn start(master_port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let conf = dir.path().join("sentinel.conf");
        let text = format!(
            "port {port}\nbind 127.0.0.1\ndir {dir}\nlogfile {log}\n\
             sentinel monitor mymaster 127.0.0.1 {master_port} 2\n\
             sentinel down-after-milliseconds mymaster {NODE_TIMEOUT_MS}\n\
             sentinel failover-timeout mymaster 5000\nsentinel parallel-syncs mymaster 2\n",
            dir = dir.path().display(),
            log = dir.path().join("sentinel.log").display(),
        );
        std::fs::write(&conf, text).expect("sentinel.conf");
        let child = Command::new("redis-server")
            .arg(&conf)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server must be installed (see .ci/run)");
        Self { port, dir, child }
    }

    async fn try_client(&self) -> Option<MultiplexedConnection> {
        let client = redis::Client::open(format!("redis://127.0.0.1:{}", self.port)).ok()?;
        client.get_multiplexed_async_connection().await.ok()
    }

    async fn client(&self) -> MultiplexedConnection {
        self.try_client().await.expect("sentinel answers")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("sentinel.log")
    }
}

impl Drop for SentinelProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
            eprintln!("--- sentinel log (port {}) ---\n{log}", self.port);
        }
    }
}
