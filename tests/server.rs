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

/// One HTTP/2 frame: length, type, flags, stream id, payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u32).to_be_bytes();
    let mut frame = vec![len[1], len[2], len[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// A Health/Check's request headers, HPACK-encoded. The first block enters
/// the four non-pseudo fields in the connection's dynamic table; later ones
/// name them by index (six bytes), so a burst of a thousand fits in the
/// server's first receive window.
fn health_check_headers(first: bool) -> Vec<u8> {
    let mut block = vec![0x83, 0x86]; // :method POST, :scheme http
    if !first {
        // Dynamic entries, newest first from 62: te, content-type,
        // :authority, :path.
        block.extend([0x80 | 65, 0x80 | 64, 0x80 | 63, 0x80 | 62]);
        return block;
    }
    let mut indexed = |name_index: u8, name: &str, value: &str| {
        block.push(0x40 | name_index); // literal with incremental indexing
        if name_index == 0 {
            block.push(name.len() as u8);
            block.extend_from_slice(name.as_bytes());
        }
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    };
    indexed(4, "", "/grpc.health.v1.Health/Check"); // :path
    indexed(1, "", "localhost"); // :authority
    indexed(0, "content-type", "application/grpc");
    indexed(0, "te", "trailers");
    block
}

/// Writes, in one go, `resets` Health/Check calls each reset at once, then
/// one call that is not; `Ok` once that call is answered, or the error code
/// of the server's GOAWAY. This single-threaded test runtime keeps the server
/// from reading until the whole burst is in its socket, so the server reads
/// it as a stalled instance does when it resumes: each caller's request and
/// the reset its deadline sent, all at once.
async fn burst_of_resets(server: &TestServer, resets: u32) -> Result<(), u32> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const DATA: u8 = 0x0;
    const HEADERS: u8 = 0x1;
    const RST_STREAM: u8 = 0x3;
    const SETTINGS: u8 = 0x4;
    const GOAWAY: u8 = 0x7;
    const END_STREAM: u8 = 0x1;
    const ACK: u8 = 0x1;
    const END_HEADERS: u8 = 0x4;
    const CANCEL: u32 = 0x8;

    let mut burst = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    burst.extend(h2_frame(SETTINGS, 0, 0, &[]));
    for i in 0..resets {
        let stream = 2 * i + 1;
        burst.extend(h2_frame(HEADERS, END_HEADERS, stream, &health_check_headers(i == 0)));
        burst.extend(h2_frame(RST_STREAM, 0, stream, &CANCEL.to_be_bytes()));
    }
    let last = 2 * resets + 1;
    burst.extend(h2_frame(HEADERS, END_HEADERS, last, &health_check_headers(resets == 0)));
    burst.extend(h2_frame(DATA, END_STREAM, last, &[0, 0, 0, 0, 0])); // an empty message
    // Room for the whole burst, so the write never waits for the server to
    // read (which would let it take up streams before their resets arrive).
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_send_buffer_size(1 << 20).unwrap();
    let mut socket = socket.connect(server.addr).await.unwrap();
    socket.write_all(&burst).await.unwrap();

    let answered = async {
        loop {
            let mut head = [0u8; 9];
            socket.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            socket.read_exact(&mut payload).await.unwrap();
            match kind {
                // Acknowledged; a server that already closed is caught by
                // its GOAWAY, read next.
                SETTINGS if flags & ACK == 0 => {
                    let _ = socket.write_all(&h2_frame(SETTINGS, ACK, 0, &[])).await;
                }
                GOAWAY => return Err(u32::from_be_bytes([payload[4], payload[5], payload[6], payload[7]])),
                // The trailers (grpc-status) end the answer.
                HEADERS if stream == last && flags & END_STREAM != 0 => return Ok(()),
                _ => {}
            }
        }
    };
    tokio::time::timeout(std::time::Duration::from_secs(10), answered).await.expect("an answer or a GOAWAY")
}

#[tokio::test]
async fn calls_reset_before_the_server_reads_them_keep_the_connection_up_to_the_bound() {
    // h2's default bound (20) closed the connection with ENHANCE_YOUR_CALM,
    // failing every call on it RESOURCE_EXHAUSTED, whenever an instance
    // resumed from a pause (seen in the torture harness's instance pause).
    let redis = RedisServer::start().await;
    let server = TestServer::start(&redis).await;
    let bound = cachecoord::server::MAX_PENDING_RESET_STREAMS as u32;
    assert_eq!(burst_of_resets(&server, bound).await, Ok(()));
    // One past it is a rapid-reset flood: the connection is closed.
    const ENHANCE_YOUR_CALM: u32 = 0xb;
    assert_eq!(burst_of_resets(&server, bound + 1).await, Err(ENHANCE_YOUR_CALM));
}
