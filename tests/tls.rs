//! TLS: on the gRPC port (server certificates, client certificates, reload
//! without dropping connections), to Redis (`rediss://` with a CA and a
//! client certificate), and the health check binary over TLS. Every
//! certificate is made here with rcgen.

mod common;

use std::{
    sync::{Arc, Mutex},
    time::Duration,
};

use cachecoord::proto::{GetRequest, SetRequest};
use common::{
    RedisServer, TestServer,
    certs::{Ca, Files, Leaf, Use},
};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

/// A server certificate from `ca` written as server.pem/server.key, plus
/// the CA as ca.pem.
fn server_files(ca: &Ca) -> Files {
    let files = Files::new();
    files.write("ca.pem", &ca.pem);
    files.write_leaf("server", &ca.leaf("cachecoord-server", Use::Server));
    files
}

/// The `--tls-*` flags for the files of `server_files`.
fn tls_flags(files: &Files, extra: &[&str]) -> Vec<String> {
    let mut flags = vec![
        "--tls-cert".to_string(),
        files.path("server.pem").display().to_string(),
        "--tls-key".to_string(),
        files.path("server.key").display().to_string(),
    ];
    if !extra.contains(&"--tls-reload-poll") {
        flags.extend(["--tls-reload-poll".to_string(), "50ms".to_string()]);
    }
    flags.extend(extra.iter().map(|s| s.to_string()));
    flags
}

async fn start(redis: &RedisServer, flags: &[String]) -> TestServer {
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    TestServer::start_unchecked(redis, &flags).await
}

/// A TLS channel to `server` trusting `ca`, with `identity` as client
/// certificate.
async fn connect(server: &TestServer, ca: &str, identity: Option<&Leaf>) -> Result<Channel, String> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)).domain_name("localhost");
    if let Some(leaf) = identity {
        tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
    }
    let endpoint = Channel::from_shared(format!("https://{}", server.addr)).expect("uri");
    let endpoint = endpoint.tls_config(tls).map_err(|e| format!("{e:?}"))?.timeout(Duration::from_secs(10));
    endpoint.connect().await.map_err(|e| format!("{e:?}"))
}

/// The overall health over `channel`, or why the call failed.
async fn health(channel: Channel) -> Result<ServingStatus, String> {
    let request = HealthCheckRequest { service: String::new() };
    let response = HealthClient::new(channel).check(request).await.map_err(|status| format!("{status:?}"))?;
    Ok(response.into_inner().status())
}

/// Connects and asks for health in one go: `Err` if either step fails.
async fn try_health(server: &TestServer, ca: &str, identity: Option<&Leaf>) -> Result<ServingStatus, String> {
    health(connect(server, ca, identity).await?).await
}

/// Waits (bounded) until the server answers SERVING over TLS.
async fn wait_serving(server: &TestServer, ca: &str, identity: Option<&Leaf>) {
    let wait = async {
        loop {
            if try_health(server, ca, identity).await == Ok(ServingStatus::Serving) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), wait).await.expect("server never SERVING over TLS");
}

#[tokio::test]
async fn a_client_trusting_the_ca_gets_answers_and_plaintext_is_refused() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("test CA");
    let files = server_files(&ca);
    let server = start(&redis, &tls_flags(&files, &[])).await;
    wait_serving(&server, &ca.pem, None).await;

    let channel = connect(&server, &ca.pem, None).await.expect("TLS connect");
    let mut cache = cachecoord::proto::cache_service_client::CacheServiceClient::new(channel);
    let set = SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() };
    cache.set(set).await.expect("Set over TLS");
    let got = cache.get(GetRequest { key: "k".into() }).await.expect("Get over TLS").into_inner();
    assert!(got.found);
    assert_eq!(got.value, b"v");

    // A plaintext client gets no gRPC answer from the TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.addr)).expect("uri").connect_lazy();
    let refused = health(plain).await;
    assert!(refused.is_err(), "plaintext answered: {refused:?}");
}

#[tokio::test]
async fn a_client_trusting_another_ca_refuses_the_server() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("test CA");
    let files = server_files(&ca);
    let server = start(&redis, &tls_flags(&files, &[])).await;
    wait_serving(&server, &ca.pem, None).await;

    let other = Ca::new("other CA");
    let refused = try_health(&server, &other.pem, None).await;
    let err = refused.expect_err("a server signed by another CA was trusted");
    assert!(err.contains("UnknownIssuer") || err.contains("invalid peer certificate"), "{err}");
}

#[tokio::test]
async fn a_client_refuses_an_expired_server_certificate() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("test CA");
    let files = Files::new();
    files.write_leaf("server", &ca.expired_leaf("expired-server", Use::Server));
    let server = start(&redis, &tls_flags(&files, &[])).await;
    // The server starts (it logs the expiry); clients must refuse it. Wait
    // until the port is up: plain TCP accepts.
    let up = async {
        while tokio::net::TcpStream::connect(server.addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), up).await.expect("port up");
    let err = try_health(&server, &ca.pem, None).await.expect_err("expired certificate accepted");
    assert!(err.contains("Expired"), "{err}");
}

/// mTLS, required: a client without a certificate, or with one from another
/// CA, is refused; one with a certificate of the client CA is served, and
/// its subject reaches the request's extensions.
#[tokio::test]
async fn client_certificates_required() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = server_files(&ca);
    files.write("client-ca.pem", &client_ca.pem);
    let client_ca_path = files.path("client-ca.pem").display().to_string();
    let server = start(&redis, &tls_flags(&files, &["--tls-client-ca", &client_ca_path])).await;
    let client = client_ca.leaf("billing", Use::Client);
    wait_serving(&server, &ca.pem, Some(&client)).await;

    let without = try_health(&server, &ca.pem, None).await;
    assert!(without.is_err(), "served without a client certificate: {without:?}");
    let stranger = Ca::new("stranger CA").leaf("billing", Use::Client);
    let wrong_ca = try_health(&server, &ca.pem, Some(&stranger)).await;
    assert!(wrong_ca.is_err(), "served a client certificate of another CA: {wrong_ca:?}");
    assert_eq!(try_health(&server, &ca.pem, Some(&client)).await, Ok(ServingStatus::Serving));
}

#[tokio::test]
async fn client_certificates_optional() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = server_files(&ca);
    files.write("client-ca.pem", &client_ca.pem);
    let client_ca_path = files.path("client-ca.pem").display().to_string();
    let flags = tls_flags(&files, &["--tls-client-ca", &client_ca_path, "--tls-client-auth", "optional"]);
    let server = start(&redis, &flags).await;
    wait_serving(&server, &ca.pem, None).await;

    let client = client_ca.leaf("billing", Use::Client);
    assert_eq!(try_health(&server, &ca.pem, Some(&client)).await, Ok(ServingStatus::Serving));
    // A certificate shown must still be valid.
    let stranger = Ca::new("stranger CA").leaf("billing", Use::Client);
    assert!(try_health(&server, &ca.pem, Some(&stranger)).await.is_err());
}

/// `tls::client_subject` in a layer (where the auth layer would read it):
/// the verified client certificate's subject, and nothing without one.
#[tokio::test]
async fn the_client_certificate_subject_reaches_the_request() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = server_files(&ca);
    files.write("client-ca.pem", &client_ca.pem);
    let config = cachecoord::tls::TlsConfig {
        tls_cert: Some(files.path("server.pem")),
        tls_key: Some(files.path("server.key")),
        tls_client_ca: Some(files.path("client-ca.pem")),
        tls_client_auth: cachecoord::tls::ClientAuth::Optional,
        tls_reload_poll: Duration::from_secs(1),
        tls_handshake_timeout: Duration::from_secs(10),
    };
    let tls = cachecoord::tls::TlsServer::start(&config).expect("TLS config").expect("TLS on");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    let (_reporter, health_service) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(move |request: tonic::Request<()>| {
                record.lock().expect("lock").push(cachecoord::tls::client_subject(request.extensions()));
                Ok(request)
            }))
            .add_service(health_service)
            .serve_with_incoming(tls.incoming(listener)),
    );
    let server_like = |identity: Option<&Leaf>| {
        let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)).domain_name("localhost");
        if let Some(leaf) = identity {
            tls = tls.identity(Identity::from_pem(&leaf.cert, &leaf.key));
        }
        Channel::from_shared(format!("https://{addr}")).expect("uri").tls_config(tls).expect("tls").connect_lazy()
    };
    let client = client_ca.leaf("billing", Use::Client);
    assert_eq!(health(server_like(Some(&client))).await, Ok(ServingStatus::Serving));
    assert_eq!(health(server_like(None)).await, Ok(ServingStatus::Serving));
    let seen = seen.lock().expect("lock").clone();
    assert_eq!(seen, vec![Some("CN=billing,O=cachecoord tests".to_string()), None]);
}

/// New certificate files take effect for new connections, while a
/// connection opened before keeps working; a broken file changes nothing.
#[tokio::test]
async fn reloaded_certificates_serve_new_connections_and_keep_open_ones() {
    let redis = RedisServer::start().await;
    let old_ca = Ca::new("old CA");
    let files = server_files(&old_ca);
    let server = start(&redis, &tls_flags(&files, &[])).await;
    wait_serving(&server, &old_ca.pem, None).await;
    let open = connect(&server, &old_ca.pem, None).await.expect("connect");
    assert_eq!(health(open.clone()).await, Ok(ServingStatus::Serving));

    // A key that does not match the certificate: the reload fails and the
    // old certificate stays.
    let new_ca = Ca::new("new CA");
    let new_leaf = new_ca.leaf("cachecoord-server-2", Use::Server);
    files.write("server.pem", &new_leaf.cert);
    assert_eq!(try_health(&server, &old_ca.pem, None).await, Ok(ServingStatus::Serving));

    // The matching key arrives: new connections get the new certificate.
    files.write("server.key", &new_leaf.key);
    let reloaded = async {
        while try_health(&server, &new_ca.pem, None).await != Ok(ServingStatus::Serving) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reloaded).await.expect("new certificate never served");
    assert!(try_health(&server, &old_ca.pem, None).await.is_err(), "the old certificate is still served");
    // The connection from before the reload is still open and answering.
    assert_eq!(health(open.clone()).await, Ok(ServingStatus::Serving));
    let mut cache = cachecoord::proto::cache_service_client::CacheServiceClient::new(open);
    let set = SetRequest { key: "k".into(), value: b"v".to_vec(), ..Default::default() };
    cache.set(set).await.expect("Set on the connection opened before the reload");
}

/// rediss:// against a redis-server with TLS, a CA of the test's own and
/// client certificates required.
#[tokio::test]
async fn redis_over_tls_with_a_client_certificate() {
    let ca = Ca::new("redis CA");
    let files = Files::new();
    files.write("ca.pem", &ca.pem);
    files.write_leaf("redis", &ca.leaf("redis", Use::Server));
    files.write_leaf("client", &ca.leaf("cachecoord", Use::Client));
    let (redis, tls_port) = RedisServer::start_tls(&files).await;
    let url = format!("rediss://127.0.0.1:{tls_port}");
    let path = |name: &str| files.path(name).display().to_string();
    let flags = [
        "--redis-url".to_string(),
        url,
        "--redis-tls-ca".to_string(),
        path("ca.pem"),
        "--redis-tls-cert".to_string(),
        path("client.pem"),
        "--redis-tls-key".to_string(),
        path("client.key"),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start_with(&redis, &flags).await;
    let set = SetRequest { key: "k".into(), value: b"over tls".to_vec(), ..Default::default() };
    server.cache().set(set).await.expect("Set through rediss://");
    let got = server.cache().get(GetRequest { key: "k".into() }).await.expect("Get").into_inner();
    assert_eq!(got.value, b"over tls");
    // It really went to this Redis (read back over its plain port).
    let mut conn = redis.client().await;
    let stored: Vec<u8> =
        deadpool_redis::redis::cmd("GET").arg(server.cache_key("k")).query_async(&mut conn).await.expect("GET");
    assert!(!stored.is_empty());
}

/// rediss:// to a Redis whose certificate another CA signed: never
/// SERVING, calls are UNAVAILABLE.
#[tokio::test]
async fn redis_over_tls_with_the_wrong_ca_is_unavailable() {
    let ca = Ca::new("redis CA");
    let files = Files::new();
    files.write("ca.pem", &ca.pem);
    files.write_leaf("redis", &ca.leaf("redis", Use::Server));
    files.write_leaf("client", &ca.leaf("cachecoord", Use::Client));
    files.write("other-ca.pem", &Ca::new("other CA").pem);
    let (redis, tls_port) = RedisServer::start_tls(&files).await;
    let path = |name: &str| files.path(name).display().to_string();
    let flags = [
        "--redis-url".to_string(),
        format!("rediss://127.0.0.1:{tls_port}"),
        "--redis-tls-ca".to_string(),
        path("other-ca.pem"),
        "--redis-tls-cert".to_string(),
        path("client.pem"),
        "--redis-tls-key".to_string(),
        path("client.key"),
        "--redis-timeout".to_string(),
        "500ms".to_string(),
    ];
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let server = TestServer::start_unchecked(&redis, &flags).await;
    let status = server.cache().get(GetRequest { key: "k".into() }).await.expect_err("served without Redis");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert_eq!(server.health_status("").await, ServingStatus::NotServing);
    // What the health probe logs when it turns NOT_SERVING: the reason.
    let args = [&["cachecoord"][..], &flags].concat();
    let config = <cachecoord::config::Config as clap::Parser>::try_parse_from(args).expect("flags");
    let reason = cachecoord::store::Redis::new(&config).expect("redis").ping(Duration::from_secs(2)).await;
    let reason = reason.expect_err("PING answered through the wrong CA");
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

/// SIGHUP reloads at once, with polling off.
#[tokio::test]
async fn sighup_reloads_the_certificates() {
    let redis = RedisServer::start().await;
    let old_ca = Ca::new("old CA");
    let files = server_files(&old_ca);
    let flags = tls_flags(&files, &["--tls-reload-poll", "0s"]);
    let server = start(&redis, &flags).await;
    wait_serving(&server, &old_ca.pem, None).await;

    let new_ca = Ca::new("new CA");
    files.write_leaf("server", &new_ca.leaf("cachecoord-server-2", Use::Server));
    // Polling is off: only a SIGHUP (to this process, where the server
    // runs; its handler is installed) makes the new files count.
    let reloaded = async {
        loop {
            let pid = std::process::id().to_string();
            let sent =
                tokio::task::spawn_blocking(move || std::process::Command::new("kill").args(["-HUP", &pid]).status());
            assert!(sent.await.expect("join").expect("kill").success());
            if try_health(&server, &new_ca.pem, None).await == Ok(ServingStatus::Serving) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(10), reloaded).await.expect("SIGHUP never reloaded");
}

/// `cachecoord-healthcheck` over TLS: with the CA, with the server's own
/// certificate pinned (as in the container), with a client certificate;
/// and failing against the wrong CA.
#[tokio::test]
async fn the_healthcheck_binary_speaks_tls() {
    let redis = RedisServer::start().await;
    let ca = Ca::new("server CA");
    let client_ca = Ca::new("client CA");
    let files = server_files(&ca);
    files.write("client-ca.pem", &client_ca.pem);
    files.write_leaf("client", &client_ca.leaf("healthcheck", Use::Client));
    files.write("other-ca.pem", &Ca::new("other CA").pem);
    let client_ca_path = files.path("client-ca.pem").display().to_string();
    let flags = tls_flags(&files, &["--tls-client-ca", &client_ca_path, "--tls-client-auth", "optional"]);
    let server = start(&redis, &flags).await;
    wait_serving(&server, &ca.pem, None).await;

    // Off the runtime's thread: the server under test runs on it.
    let run = async |args: Vec<String>, envs: Vec<(&'static str, String)>| {
        let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_cachecoord-healthcheck"));
        command.args(args).env_remove("CACHECOORD_TLS_CERT").env_remove("CACHECOORD_LISTEN");
        for (name, value) in envs {
            command.env(name, value);
        }
        tokio::task::spawn_blocking(move || command.output()).await.expect("join").expect("run healthcheck")
    };
    let path = |name: &str| files.path(name).display().to_string();
    let https = format!("https://localhost:{}", server.addr.port());

    let with_ca = run(vec![https.clone(), "--tls-ca".into(), path("ca.pem")], vec![]).await;
    assert!(with_ca.status.success(), "{}", String::from_utf8_lossy(&with_ca.stderr));

    // In a container: the server's own variables, no flags at all.
    let pinned = run(
        vec![],
        vec![
            ("CACHECOORD_LISTEN", format!("0.0.0.0:{}", server.addr.port())),
            ("CACHECOORD_TLS_CERT", path("server.pem")),
        ],
    )
    .await;
    assert!(pinned.status.success(), "{}", String::from_utf8_lossy(&pinned.stderr));

    let with_client_cert = run(
        vec![https.clone()],
        vec![
            ("CACHECOORD_HEALTHCHECK_TLS_CA", path("ca.pem")),
            ("CACHECOORD_HEALTHCHECK_TLS_CERT", path("client.pem")),
            ("CACHECOORD_HEALTHCHECK_TLS_KEY", path("client.key")),
        ],
    )
    .await;
    assert!(with_client_cert.status.success(), "{}", String::from_utf8_lossy(&with_client_cert.stderr));

    let wrong_ca = run(vec![https.clone(), "--tls-ca".into(), path("other-ca.pem")], vec![]).await;
    assert!(!wrong_ca.status.success());
    let stderr = String::from_utf8_lossy(&wrong_ca.stderr);
    assert!(stderr.contains("UnknownIssuer") || stderr.contains("invalid peer certificate"), "{stderr}");

    let plaintext = run(vec![format!("http://127.0.0.1:{}", server.addr.port())], vec![]).await;
    assert!(!plaintext.status.success());
}
