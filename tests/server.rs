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

/// A GetRequest whose `key` may hold bytes that are not UTF-8.
#[derive(Clone, PartialEq, prost::Message)]
struct RawGet {
    #[prost(bytes = "vec", tag = "1")]
    key: Vec<u8>,
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_invalid_argument_not_internal() {
    // Found by the gRPC-level fuzzer: tonic-prost answers INTERNAL.
    let redis = common::RedisServer::start().await;
    let server = common::TestServer::start(&redis).await;
    let mut grpc = tonic::client::Grpc::new(server.channel.clone());
    grpc.ready().await.unwrap();
    let path = http::uri::PathAndQuery::from_static("/cachecoord.v1.CacheService/Get");
    let codec = tonic_prost::ProstCodec::<RawGet, cachecoord::proto::GetResponse>::default();
    let request = tonic::Request::new(RawGet { key: vec![b'k', 0xff, 0xfe] });
    let status = grpc.unary(request, path, codec).await.expect_err("not UTF-8");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("request: "), "{:?}", status.message());
    // A valid request on the same connection still works.
    let get = cachecoord::proto::GetRequest { key: "k".into() };
    assert!(!server.cache().get(get).await.unwrap().into_inner().found);
}
