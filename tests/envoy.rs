//! envoy.service.ratelimit.v3.RateLimitService through a real gRPC client,
//! against Redis time: the semantics of envoyproxy/ratelimit, exactness under
//! concurrency, all-or-nothing, shared counters with RateLimitService.Check,
//! faults, bad input, reload and reflection.

mod common;

use std::{
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use cachecoord::proto::{Algorithm, CheckRequest, Limit};
use common::{RedisServer, TestServer, ms};
use deadpool_redis::redis::{self, AsyncCommands, aio::MultiplexedConnection};
use envoy_types::pb::{
    envoy::{
        extensions::common::ratelimit::v3::{
            RateLimitDescriptor,
            rate_limit_descriptor::{Entry, RateLimitOverride},
        },
        service::ratelimit::v3::{
            RateLimitRequest, RateLimitResponse,
            rate_limit_response::{Code, DescriptorStatus, rate_limit::Unit},
            rate_limit_service_client::RateLimitServiceClient,
        },
    },
    google::protobuf::UInt64Value,
};
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const MONTH_MS: u64 = 30 * 24 * 3600 * 1000;

const CONFIG: &str = r#"
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: month, requests_per_unit: 5}
  - key: path
    value: /login
    rate_limit: {unit: month, requests_per_unit: 2, name: login}
  - key: path
    value: /api/*
    rate_limit: {unit: month, requests_per_unit: 3}
    descriptors:
      - key: user
        rate_limit: {unit: month, requests_per_unit: 4}
  - key: path
    rate_limit: {unit: month, requests_per_unit: 10}
  - key: user
    rate_limit: {unit: month, requests_per_unit: 2, name: per_user}
  - key: vip
    rate_limit: {unit: month, requests_per_unit: 1000, replaces: [{name: per_user}]}
  - key: internal
    rate_limit: {unlimited: true}
  - key: canary
    shadow_mode: true
    rate_limit: {unit: month, requests_per_unit: 2}
  - key: hot
    rate_limit: {unit: month, requests_per_unit: 100}
  - key: clock
    rate_limit: {unit: minute, requests_per_unit: 10}
"#;

/// A Redis, a config directory and the service serving it.
struct Rls {
    redis: RedisServer,
    server: TestServer,
    /// The config file (in its own temp dir).
    file: PathBuf,
    _dir: tempfile::TempDir,
}

impl Rls {
    async fn start(config: &str, flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("edge.yaml");
        std::fs::write(&file, config).expect("write config");
        let redis = RedisServer::start().await;
        let path = file.to_str().expect("utf-8 path").to_string();
        let mut args = vec!["--rls-config", path.as_str()];
        args.extend_from_slice(flags);
        let server = TestServer::start_with(&redis, &args).await;
        Self { redis, server, file, _dir: dir }
    }

    fn client(&self) -> RateLimitServiceClient<Channel> {
        RateLimitServiceClient::new(self.server.channel.clone())
    }

    /// The Redis hash of a descriptor's fixed window.
    fn state_key(&self, counter: &str) -> String {
        format!("{}:rl:f:{counter}", self.server.prefix)
    }

    /// Hits counted on `counter` in its current window (0 when none).
    async fn counted(&self, counter: &str) -> u64 {
        let mut conn = self.redis.client().await;
        let n: Option<u64> = conn.hget(self.state_key(counter), "n").await.expect("HGET");
        n.unwrap_or(0)
    }
}

fn descriptor(entries: &[(&str, &str)]) -> RateLimitDescriptor {
    RateLimitDescriptor {
        entries: entries.iter().map(|(k, v)| Entry { key: k.to_string(), value: v.to_string() }).collect(),
        ..Default::default()
    }
}

fn with_hits(entries: &[(&str, &str)], hits: u64) -> RateLimitDescriptor {
    RateLimitDescriptor { hits_addend: Some(UInt64Value { value: hits }), ..descriptor(entries) }
}

fn request(domain: &str, descriptors: Vec<RateLimitDescriptor>) -> RateLimitRequest {
    RateLimitRequest { domain: domain.into(), descriptors, hits_addend: 0 }
}

async fn ask(client: &mut RateLimitServiceClient<Channel>, request: RateLimitRequest) -> RateLimitResponse {
    client.should_rate_limit(request).await.expect("ShouldRateLimit").into_inner()
}

async fn one(client: &mut RateLimitServiceClient<Channel>, entries: &[(&str, &str)]) -> DescriptorStatus {
    let response = ask(client, request("edge", vec![descriptor(entries)])).await;
    assert_eq!(response.statuses.len(), 1);
    response.statuses.into_iter().next().expect("one status")
}

/// (requests per unit, name) of the limit that applied, if any.
fn applied(status: &DescriptorStatus) -> Option<(u32, String)> {
    status.current_limit.as_ref().map(|l| (l.requests_per_unit, l.name.clone()))
}

fn is_ok(code: i32) -> bool {
    code == Code::Ok as i32
}

fn is_over(code: i32) -> bool {
    code == Code::OverLimit as i32
}

/// Redis's clock, in Unix ms.
async fn redis_now(conn: &mut MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.expect("TIME");
    seconds * 1000 + micros / 1000
}

#[tokio::test]
async fn the_most_specific_match_wins_and_a_limit_applies_at_the_last_entry() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    // Exact value, wildcard value, and the key alone (any value).
    assert_eq!(applied(&one(&mut client, &[("path", "/login")]).await), Some((2, "login".into())));
    assert_eq!(applied(&one(&mut client, &[("path", "/api/v1/users")]).await), Some((3, String::new())));
    assert_eq!(applied(&one(&mut client, &[("path", "/about")]).await), Some((10, String::new())));
    // Nested: the child's limit, for the two-entry descriptor only.
    assert_eq!(applied(&one(&mut client, &[("path", "/api/v1"), ("user", "7")]).await), Some((4, String::new())));
    // /login has no children: a longer descriptor matches nothing.
    assert_eq!(applied(&one(&mut client, &[("path", "/login"), ("user", "7")]).await), None);
    // Unmatched keys and unknown domains: OK, no limit, nothing stored.
    let status = one(&mut client, &[("country", "fr")]).await;
    assert!(is_ok(status.code) && status.current_limit.is_none() && status.duration_until_reset.is_none());
    let response = ask(&mut client, request("other", vec![descriptor(&[("path", "/login")])])).await;
    assert!(is_ok(response.overall_code) && response.statuses[0].current_limit.is_none());
    let status = one(&mut client, &[("path", "/login")]).await;
    assert_eq!(status.current_limit.expect("limit").unit, Unit::Month as i32);
    assert_eq!(rls.counted("rls:edge:path=/login").await, 2);
    assert_eq!(rls.counted("rls:edge:path=/api/v1:user=7").await, 1);
}

#[tokio::test]
async fn every_status_field_is_filled_against_redis_time() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let mut conn = rls.redis.client().await;
    const MINUTE: u64 = 60_000;
    // Stay clear of a minute boundary so the bracket is one window.
    for _ in 0..1000 {
        if MINUTE - redis_now(&mut conn).await % MINUTE > 2_000 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = redis_now(&mut conn).await;
    let status = one(&mut client, &[("clock", "a")]).await;
    let after = redis_now(&mut conn).await;
    assert!(is_ok(status.code));
    assert_eq!(status.limit_remaining, 9);
    let limit = status.current_limit.expect("current_limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (10, Unit::Minute as i32));
    let reset = status.duration_until_reset.expect("duration_until_reset");
    let reset_ms = reset.seconds as u64 * 1000 + reset.nanos as u64 / 1_000_000;
    let window_end = (before / MINUTE + 1) * MINUTE;
    assert!(
        (window_end - after..=window_end - before).contains(&reset_ms),
        "reset {reset_ms} ms, window ends {window_end}, now in [{before}, {after}]"
    );
    // The counter expires when its window ends.
    let pttl: i64 = redis::cmd("PTTL").arg(rls.state_key("rls:edge:clock=a")).query_async(&mut conn).await.unwrap();
    assert!(pttl > 0 && pttl as u64 <= window_end - before, "{pttl}");
}

#[tokio::test]
async fn a_request_over_any_limit_consumes_none_of_its_limits() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let both =
        || request("edge", vec![descriptor(&[("path", "/login")]), descriptor(&[("remote_address", "1.1.1.1")])]);
    for remaining in [1, 0] {
        let response = ask(&mut client, both()).await;
        assert!(is_ok(response.overall_code));
        assert_eq!(response.statuses[0].limit_remaining, remaining);
    }
    let response = ask(&mut client, both()).await;
    assert!(is_over(response.overall_code));
    assert!(is_over(response.statuses[0].code));
    assert!(is_ok(response.statuses[1].code));
    assert_eq!(response.statuses[1].limit_remaining, 3, "reported before this request: it was not consumed");
    assert_eq!(rls.counted("rls:edge:path=/login").await, 2);
    assert_eq!(rls.counted("rls:edge:remote_address=1.1.1.1").await, 2);
}

#[tokio::test]
async fn one_script_call_per_request_and_none_without_a_limit() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    one(&mut client, &[("hot", "warm-up")]).await; // loads the function
    let before = rls.redis.calls("fcall").await;
    let three = request(
        "edge",
        vec![descriptor(&[("hot", "a")]), descriptor(&[("path", "/login")]), descriptor(&[("remote_address", "a")])],
    );
    ask(&mut client, three).await;
    assert_eq!(rls.redis.calls("fcall").await, before + 1);
    ask(&mut client, request("edge", vec![descriptor(&[("country", "fr")]), descriptor(&[("internal", "x")])])).await;
    assert_eq!(rls.redis.calls("fcall").await, before + 1);
}

#[tokio::test]
async fn hits_addend_per_request_and_per_descriptor_and_zero_only_checks() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let addr = [("remote_address", "2.2.2.2")];
    let mut three = request("edge", vec![descriptor(&addr)]);
    three.hits_addend = 3;
    assert_eq!(ask(&mut client, three).await.statuses[0].limit_remaining, 2);
    // 0: check only, nothing taken.
    let check = || request("edge", vec![with_hits(&addr, 0)]);
    let response = ask(&mut client, check()).await;
    assert!(is_ok(response.overall_code));
    assert_eq!(response.statuses[0].limit_remaining, 2);
    assert_eq!(rls.counted("rls:edge:remote_address=2.2.2.2").await, 3);
    // More hits than remain: over, nothing taken.
    let response = ask(&mut client, request("edge", vec![with_hits(&addr, 3)])).await;
    assert!(is_over(response.overall_code));
    // The descriptor's hits_addend wins over the request's.
    let mut per_descriptor = request("edge", vec![with_hits(&addr, 2)]);
    per_descriptor.hits_addend = 100;
    let response = ask(&mut client, per_descriptor).await;
    assert!(is_ok(response.overall_code));
    assert_eq!(response.statuses[0].limit_remaining, 0);
    // Checking an exhausted limit: over, and still nothing taken.
    assert!(is_over(ask(&mut client, check()).await.overall_code));
    assert_eq!(rls.counted("rls:edge:remote_address=2.2.2.2").await, 5);
}

#[tokio::test]
async fn unlimited_replaces_and_the_request_override() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let status = one(&mut client, &[("internal", "x")]).await;
    assert!(is_ok(status.code) && status.current_limit.is_none());
    assert_eq!(status.limit_remaining, u32::MAX);
    assert_eq!(rls.counted("rls:edge:internal=x").await, 0);

    // per_user alone applies; next to vip's limit (which replaces it) it does not.
    assert_eq!(applied(&one(&mut client, &[("user", "u1")]).await), Some((2, "per_user".into())));
    let both = request("edge", vec![descriptor(&[("user", "u1")]), descriptor(&[("vip", "yes")])]);
    let response = ask(&mut client, both).await;
    assert_eq!(applied(&response.statuses[0]), None);
    assert_eq!(applied(&response.statuses[1]), Some((1000, String::new())));
    assert_eq!(rls.counted("rls:edge:user=u1").await, 1, "a replaced limit is not counted");

    // The request's own limit replaces the configured one (same counter).
    let mut overridden = descriptor(&[("remote_address", "3.3.3.3")]);
    overridden.limit = Some(RateLimitOverride { requests_per_unit: 1, unit: 3 /* HOUR */ });
    let response = ask(&mut client, request("edge", vec![overridden.clone()])).await;
    let limit = response.statuses[0].current_limit.clone().expect("limit");
    assert_eq!((limit.requests_per_unit, limit.unit), (1, Unit::Hour as i32));
    assert!(is_over(ask(&mut client, request("edge", vec![overridden.clone()])).await.overall_code));
    // Not for a domain without config, as in envoyproxy/ratelimit.
    let response = ask(&mut client, request("nowhere", vec![overridden])).await;
    assert!(is_ok(response.overall_code) && response.statuses[0].current_limit.is_none());
}

#[tokio::test]
async fn shadow_mode_answers_ok_but_counts_and_reports() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let remaining: Vec<(bool, u32)> = {
        let mut out = Vec::new();
        for _ in 0..4 {
            let status = one(&mut client, &[("canary", "c")]).await;
            out.push((is_ok(status.code), status.limit_remaining));
        }
        out
    };
    assert_eq!(remaining, vec![(true, 1), (true, 0), (true, 0), (true, 0)]);
    assert_eq!(rls.counted("rls:edge:canary=c").await, 2, "counted up to its limit, like an enforced one");
    // A shadow limit over its count does not hold back the request's other limits.
    let response =
        ask(&mut client, request("edge", vec![descriptor(&[("canary", "c")]), descriptor(&[("path", "/x")])])).await;
    assert!(is_ok(response.overall_code));
    assert_eq!(rls.counted("rls:edge:path=/x").await, 1);
}

#[tokio::test]
async fn counters_are_shared_with_rate_limit_service_check() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut envoy = rls.client();
    let mut backend = rls.server.rate_limit();
    let addr = [("remote_address", "9.9.9.9")];
    one(&mut envoy, &addr).await;
    one(&mut envoy, &addr).await;
    // The back end names the edge's limit by its key, limit and window.
    let limit = Limit {
        key: "rls:edge:remote_address=9.9.9.9".into(),
        limit: 5,
        period: ms(MONTH_MS),
        algorithm: Algorithm::FixedWindow.into(),
        burst: None,
    };
    let peek = CheckRequest { limits: vec![limit.clone()], cost: None, peek: true };
    assert_eq!(backend.check(peek).await.unwrap().into_inner().statuses[0].remaining, 3);
    let take = CheckRequest { limits: vec![limit], cost: Some(3), peek: false };
    assert!(backend.check(take).await.unwrap().into_inner().allowed);
    assert!(is_over(one(&mut envoy, &addr).await.code));
}

#[tokio::test]
async fn sixty_four_callers_on_a_limit_of_100_get_exactly_100() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut conn = rls.redis.client().await;
    let before = redis_now(&mut conn).await;
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = rls.client();
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..10 {
                    if is_ok(one(&mut client, &[("hot", "h")]).await.code) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += task.await.expect("caller");
    }
    let after = redis_now(&mut conn).await;
    if before / MONTH_MS == after / MONTH_MS {
        assert_eq!(ok, 100, "640 requests from 64 callers on a limit of 100");
    } else {
        assert!(ok <= 200, "two windows admit at most twice the limit: {ok}");
    }
}

#[tokio::test]
async fn redis_down_is_unavailable_not_an_answer() {
    let mut rls = Rls::start(CONFIG, &["--redis-timeout", "300ms"]).await;
    let mut client = rls.client();
    one(&mut client, &[("hot", "h")]).await;
    rls.redis.stop();
    let started = Instant::now();
    let status =
        client.should_rate_limit(request("edge", vec![descriptor(&[("hot", "h")])])).await.expect_err("redis is down");
    assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "{:?}", started.elapsed());
    // A request no limit applies to needs no Redis.
    assert!(is_ok(one(&mut client, &[("country", "fr")]).await.code));
}

#[tokio::test]
async fn bad_requests_are_invalid_argument_naming_the_field() {
    let rls = Rls::start(CONFIG, &[]).await;
    let mut client = rls.client();
    let cases = [
        (request("", vec![descriptor(&[("a", "b")])]), "domain"),
        (request("edge", vec![]), "descriptors"),
        (request("edge", vec![descriptor(&[])]), "descriptors[0].entries"),
        (request("edge", vec![descriptor(&[("a", "b")]), descriptor(&[("", "b")])]), "descriptors[1].entries[0].key"),
        (
            request("edge", vec![RateLimitDescriptor { is_negative_hits: true, ..with_hits(&[("a", "b")], 1) }]),
            "descriptors[0].is_negative_hits",
        ),
        (request("edge", vec![with_hits(&[("a", "b")], (1 << 53) + 1)]), "descriptors[0].hits_addend"),
        (
            request(
                "edge",
                vec![RateLimitDescriptor {
                    limit: Some(RateLimitOverride { requests_per_unit: 1, unit: 0 }),
                    ..descriptor(&[("a", "b")])
                }],
            ),
            "descriptors[0].limit.unit",
        ),
    ];
    for (request, field) in cases {
        common::assert_invalid(client.should_rate_limit(request).await, field);
    }
    // The boundary: 2^53 hits is accepted.
    assert!(is_over(ask(&mut client, request("edge", vec![with_hits(&[("hot", "b")], 1 << 53)])).await.overall_code));
    // At most 200 descriptors (--rate-limit-max-limits: one check script).
    let descriptors =
        |n: usize| -> Vec<RateLimitDescriptor> { (0..n).map(|i| descriptor(&[("a", &format!("b{i}"))])).collect() };
    assert_eq!(ask(&mut client, request("edge", descriptors(200))).await.statuses.len(), 200);
    common::assert_invalid(
        client.should_rate_limit(request("edge", descriptors(201))).await,
        "descriptors: must have at most 200 items (--rate-limit-max-limits)",
    );
}

#[tokio::test]
async fn rate_limit_headers_describe_the_tightest_descriptor() {
    let rls = Rls::start(CONFIG, &["--rls-response-headers", "draft"]).await;
    let mut client = rls.client();
    let response = ask(
        &mut client,
        request(
            "edge",
            vec![descriptor(&[("path", "/about")]), descriptor(&[("path", "/login")]), descriptor(&[("x", "y")])],
        ),
    )
    .await;
    let headers: Vec<(String, String)> =
        response.response_headers_to_add.into_iter().map(|h| (h.key, h.value)).collect();
    assert_eq!(headers[0], ("RateLimit-Limit".into(), "2".into()));
    assert_eq!(headers[1], ("RateLimit-Remaining".into(), "1".into()));
    assert_eq!(headers[2].0, "RateLimit-Reset");
    let reset: u64 = headers[2].1.parse().expect("seconds");
    assert!(reset > 0 && reset <= MONTH_MS / 1000, "{reset}");

    let rls = Rls::start(CONFIG, &["--rls-response-headers", "x"]).await;
    let response = ask(&mut rls.client(), request("edge", vec![descriptor(&[("path", "/login")])])).await;
    assert_eq!(response.response_headers_to_add[0].key, "X-RateLimit-Limit");
    // Off by default.
    let rls = Rls::start(CONFIG, &[]).await;
    assert!(
        ask(&mut rls.client(), request("edge", vec![descriptor(&[("path", "/login")])]))
            .await
            .response_headers_to_add
            .is_empty()
    );
}

/// Asks (check only: nothing consumed) until `entries` are limited to
/// `want` requests per unit; panics after 10 s.
async fn wait_for_limit(
    client: &mut RateLimitServiceClient<Channel>,
    domain: &str,
    entries: &[(&str, &str)],
    want: Option<u32>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let response = ask(client, request(domain, vec![with_hits(entries, 0)])).await;
        let got = response.statuses[0].current_limit.as_ref().map(|l| l.requests_per_unit);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "limit stayed {got:?}, wanted {want:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn write(path: &Path, text: &str) {
    // Write then rename, as config deployers do, so a poll never reads half a file.
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

#[tokio::test]
async fn a_changed_file_is_reloaded_and_a_bad_one_keeps_the_rules_in_force() {
    let rls = Rls::start(CONFIG, &["--rls-config-poll", "50ms"]).await;
    let mut client = rls.client();
    let addr = [("remote_address", "4.4.4.4")];
    wait_for_limit(&mut client, "edge", &addr, Some(5)).await;
    write(&rls.file, &CONFIG.replace("requests_per_unit: 5}", "requests_per_unit: 7}"));
    wait_for_limit(&mut client, "edge", &addr, Some(7)).await;

    write(&rls.file, "domain: edge\ndescriptors:\n  - key: remote_address\n    rate_limt: {}\n");
    // Twenty polls later, the last good rules are still in force.
    let until = Instant::now() + Duration::from_millis(1000);
    while Instant::now() < until {
        wait_for_limit(&mut client, "edge", &addr, Some(7)).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    write(
        &rls.file,
        "domain: edge\ndescriptors:\n  - key: remote_address\n    rate_limit: {unit: hour, requests_per_unit: 9}\n",
    );
    wait_for_limit(&mut client, "edge", &addr, Some(9)).await;
}

#[tokio::test]
async fn a_directory_is_every_yaml_file_in_it_and_new_files_are_picked_up() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("edge.yaml"), CONFIG).unwrap();
    std::fs::write(dir.path().join("notes.txt"), "not: config").unwrap();
    let redis = RedisServer::start().await;
    let path = dir.path().to_str().unwrap().to_string();
    let server = TestServer::start_with(&redis, &["--rls-config", &path, "--rls-config-poll", "50ms"]).await;
    let mut client = RateLimitServiceClient::new(server.channel.clone());
    wait_for_limit(&mut client, "edge", &[("path", "/login")], Some(2)).await;
    wait_for_limit(&mut client, "api", &[("k", "v")], None).await;
    write(
        &dir.path().join("api.yml"),
        "domain: api\ndescriptors: [{key: k, rate_limit: {unit: day, requests_per_unit: 42}}]\n",
    );
    wait_for_limit(&mut client, "api", &[("k", "v")], Some(42)).await;
}

#[cfg(unix)]
#[tokio::test]
async fn sighup_reloads_the_config() {
    let rls = Rls::start(CONFIG, &["--rls-config-poll", "0s"]).await;
    let mut client = rls.client();
    let addr = [("remote_address", "5.5.5.5")];
    wait_for_limit(&mut client, "edge", &addr, Some(5)).await;
    write(&rls.file, &CONFIG.replace("requests_per_unit: 5}", "requests_per_unit: 8}"));
    let status =
        std::process::Command::new("kill").args(["-HUP", &std::process::id().to_string()]).status().expect("kill -HUP");
    assert!(status.success());
    wait_for_limit(&mut client, "edge", &addr, Some(8)).await;
}

#[tokio::test]
async fn a_bad_config_stops_start_up_naming_file_and_line() {
    use clap::Parser;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.yaml");
    std::fs::write(&file, "domain: d\ndescriptors:\n  - key: k\n    value: v\n  - key: k\n    value: v\n").unwrap();
    let config =
        cachecoord::config::Config::try_parse_from(["cachecoord", "--rls-config", file.to_str().unwrap()]).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = cachecoord::server::run(config, listener, std::future::pending()).await.expect_err("bad config");
    let text = err.to_string();
    assert!(text.contains("bad.yaml:5: duplicate descriptor `k=v`"), "{text}");
}

#[tokio::test]
async fn reflection_and_health_list_envoys_service() {
    use tonic_reflection::pb::v1alpha;
    let rls = Rls::start(CONFIG, &[]).await;
    let name = "envoy.service.ratelimit.v3.RateLimitService";
    let mut reflection = v1alpha::server_reflection_client::ServerReflectionClient::new(rls.server.channel.clone());
    let ask = |message| v1alpha::ServerReflectionRequest { host: String::new(), message_request: Some(message) };
    let requests = [
        ask(v1alpha::server_reflection_request::MessageRequest::ListServices(String::new())),
        ask(v1alpha::server_reflection_request::MessageRequest::FileContainingSymbol(format!(
            "{name}.ShouldRateLimit"
        ))),
    ];
    let mut answers = reflection.server_reflection_info(tokio_stream::iter(requests)).await.unwrap().into_inner();
    let Some(v1alpha::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        answers.next().await.unwrap().unwrap().message_response
    else {
        panic!("not a list answer");
    };
    assert!(list.service.iter().any(|s| s.name == name), "{list:?}");
    let answer = answers.next().await.unwrap().unwrap().message_response;
    assert!(
        matches!(answer, Some(v1alpha::server_reflection_response::MessageResponse::FileDescriptorResponse(ref f)) if !f.file_descriptor_proto.is_empty()),
        "{answer:?}"
    );
    use tonic_health::pb::health_check_response::ServingStatus;
    assert_eq!(rls.server.health_status(name).await, ServingStatus::Serving);

    // Without --rls-config the service is not served.
    let plain = TestServer::start(&rls.redis).await;
    let status = RateLimitServiceClient::new(plain.channel.clone())
        .should_rate_limit(request("edge", vec![descriptor(&[("a", "b")])]))
        .await
        .expect_err("not served");
    assert_eq!(status.code(), tonic::Code::Unimplemented);
}

#[tokio::test]
async fn on_redis_cluster_descriptors_in_other_slots_stay_all_or_nothing_and_exact() {
    let cluster = common::cluster::RedisCluster::start().await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("edge.yaml");
    std::fs::write(&file, CONFIG).unwrap();
    let server = TestServer::start_with(&cluster, &["--rls-config", file.to_str().unwrap()]).await;
    let mut client = RateLimitServiceClient::new(server.channel.clone());
    let (login, addr) = ([("path", "/login")], [("remote_address", "7.7.7.7")]);
    let mut conn = cluster.any().await;
    let slot =
        |counter: &str| redis::cmd("CLUSTER").arg("KEYSLOT").arg(format!("{}:rl:f:{counter}", server.prefix)).clone();
    let a: u16 = slot("rls:edge:path=/login").query_async(&mut conn).await.unwrap();
    let b: u16 = slot("rls:edge:remote_address=7.7.7.7").query_async(&mut conn).await.unwrap();
    assert_ne!(a, b, "the two counters must live in different hash slots for this test");
    let both = || request("edge", vec![descriptor(&login), descriptor(&addr)]);
    assert!(is_ok(ask(&mut client, both()).await.overall_code));
    assert!(is_ok(ask(&mut client, both()).await.overall_code));
    let response = ask(&mut client, both()).await;
    assert!(is_over(response.overall_code));
    assert_eq!(response.statuses[1].limit_remaining, 3, "the other slot's hit was given back");
    let check = ask(&mut client, request("edge", vec![with_hits(&addr, 0)])).await;
    assert_eq!(check.statuses[0].limit_remaining, 3);

    // Exact under concurrency on one counter.
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let mut client = client.clone();
            tokio::spawn(async move {
                let mut ok = 0;
                for _ in 0..10 {
                    if is_ok(one(&mut client, &[("hot", "cluster")]).await.code) {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    let mut ok = 0;
    for task in tasks {
        ok += task.await.expect("caller");
    }
    assert_eq!(ok, 100, "64 callers on a limit of 100 per month");
}
