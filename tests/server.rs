//! Process-level behaviour: reflection, per-service health, placeholders.

mod common;

use common::{RedisServer, TestServer};
use tokio_stream::StreamExt;
use tonic_reflection::pb::{v1, v1alpha};

const SERVICES: [&str; 5] = [
    "cachecoord.v1.CacheService",
    "cachecoord.v1.SessionService",
    "cachecoord.v1.RateLimitService",
    "cachecoord.v1.LockService",
    "cachecoord.v1.StatsService",
];

#[tokio::test]
async fn reflection_v1_lists_every_service() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = v1::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let request = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(String::new())),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let Some(v1::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list answer");
    };
    let names: Vec<_> = list.service.into_iter().map(|s| s.name).collect();
    for service in SERVICES.iter().chain(&["grpc.health.v1.Health"]) {
        assert!(names.iter().any(|n| n == service), "{service} missing from {names:?}");
    }
}

#[tokio::test]
async fn reflection_v1alpha_describes_a_method_file() {
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let mut client = v1alpha::server_reflection_client::ServerReflectionClient::new(server.channel.clone());
    let request = v1alpha::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(
            "cachecoord.v1.CacheService.Fetch".into(),
        )),
    };
    let mut answers = client.server_reflection_info(tokio_stream::iter([request])).await.unwrap().into_inner();
    let answer = answers.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(answer, Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{answer:?}"
    );
}
