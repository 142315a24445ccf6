//! Every service on every topology: one server, Redis Cluster, Sentinel.

mod common;

use common::{
    TestServer,
    cluster::{RedisCluster, RedisSentinel},
};

#[tokio::test]
async fn harness_smoke() {
    let cluster = RedisCluster::start().await;
    let server = TestServer::start(&cluster).await;
    server
        .cache()
        .set(cachecoord::proto::SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let got = server.cache().get(cachecoord::proto::GetRequest { key: "k".into() }).await.unwrap().into_inner();
    assert!(got.found);
    let sentinel = RedisSentinel::start().await;
    let server = TestServer::start(&sentinel).await;
    server
        .cache()
        .set(cachecoord::proto::SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() })
        .await
        .unwrap();
    let got = server.cache().get(cachecoord::proto::GetRequest { key: "k".into() }).await.unwrap().into_inner();
    assert!(got.found);
}
