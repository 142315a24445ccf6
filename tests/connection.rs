//! The connection layer on its own: concurrent calls share writes, and
//! every reply reaches the call that sent its command.

mod common;

use cachecoord::{config::Config, store::Redis};
use clap::Parser;
use common::RedisServer;
use deadpool_redis::redis;

/// `total_reads_processed` from INFO stats: how many times Redis read from
/// its clients' sockets.
async fn reads(server: &RedisServer) -> u64 {
    let mut conn = server.client().await;
    let info: String = redis::cmd("INFO").arg("stats").query_async(&mut conn).await.expect("INFO");
    info.lines()
        .find_map(|line| line.strip_prefix("total_reads_processed:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("total_reads_processed")
}

/// 64 tasks, each counting its own key up 20 times, one call after the
/// other, all on one shared connection: every reply is the count its own
/// call made (a reply handed to the wrong call, lost or doubled would show),
/// and the commands travel in shared writes, so Redis reads its socket far
/// fewer times than it runs commands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_calls_share_writes_and_each_gets_its_own_reply() {
    const TASKS: u64 = 64;
    const CALLS: u64 = 20;
    let server = RedisServer::start().await;
    let url = server.url();
    let config =
        Config::try_parse_from(["cachecoord", "--redis-url", &url, "--redis-connections", "1"]).expect("config");
    let redis = Redis::new(&config).expect("handle");
    let _: String = redis.query(&redis::cmd("PING")).await.expect("connected");

    let before = reads(&server).await;
    let tasks: Vec<_> = (0..TASKS)
        .map(|task| {
            let redis = redis.clone();
            tokio::spawn(async move {
                let mut incr = redis::cmd("INCR");
                incr.arg(format!("count:{task}"));
                for expected in 1..=CALLS {
                    let count: u64 = redis.query(&incr).await.expect("INCR");
                    assert_eq!(count, expected, "task {task}");
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("task");
    }
    // Less one read for the INFO that measured `before`.
    let reads = reads(&server).await - before - 1;
    let commands = TASKS * CALLS;
    println!("{commands} commands in {reads} reads");
    assert!(reads * 8 <= commands, "{commands} commands took {reads} reads");
}
