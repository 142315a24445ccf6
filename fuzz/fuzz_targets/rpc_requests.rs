//! Every unary RPC's validation and conversion, in-process: the first byte
//! picks the RPC, the rest is decoded as its request message (protobuf, as
//! the wire would carry it) and handed to the real handler. Redis is
//! unreachable, so a request that passes validation ends `UNAVAILABLE`
//! before anything could be written; the only other answer allowed is
//! `INVALID_ARGUMENT` (or OK, for the few that need no Redis). Never
//! `INTERNAL`, never a panic.

#![no_main]

use std::sync::OnceLock;

use cachecoord::{
    api::{Limits, cache::CacheApi, lock::LockApi, rate_limit::RateLimitApi, session::SessionApi, stats::StatsApi},
    calendar::Calendar,
    config::Config,
    keys::Keys,
    proto::{
        self, cache_service_server::CacheService, lock_service_server::LockService,
        rate_limit_service_server::RateLimitService, session_service_server::SessionService,
        stats_service_server::StatsService,
    },
    store::{
        Redis,
        cache::CacheStore,
        lock::LockStore,
        rate_limit::RateLimitStore,
        session::SessionStore,
        stats::{Retention, StatsStore},
    },
};
use clap::Parser;
use libfuzzer_sys::fuzz_target;
use prost::Message;
use tonic::{Code, Request, Response, Status};

struct Apis {
    cache: CacheApi,
    sessions: SessionApi,
    rate_limit: RateLimitApi,
    locks: LockApi,
    stats: StatsApi,
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime"))
}

/// The five services as `server::run` builds them, over a Redis nobody
/// listens on.
fn apis() -> &'static Apis {
    static APIS: OnceLock<Apis> = OnceLock::new();
    APIS.get_or_init(|| {
        let args = ["cachecoord", "--redis-url", "redis://127.0.0.1:1", "--redis-timeout", "200ms"];
        let config = Config::try_parse_from(args).expect("flags");
        let _guard = runtime().enter();
        let redis = Redis::new(&config).expect("redis handle");
        let keys = Keys::new(&config.key_prefix);
        let limits = Limits::from_config(&config);
        let calendar = Calendar::new(jiff::tz::TimeZone::get(&config.stats_time_zone).expect("zone"));
        let retention = Retention {
            minute: config.stats_retention_minute,
            hour: config.stats_retention_hour,
            day: config.stats_retention_day,
        };
        Apis {
            cache: CacheApi::new(
                CacheStore::new(redis.clone(), keys.clone()),
                limits,
                config.cache_default_ttl,
                config.cache_fill_timeout,
            ),
            sessions: SessionApi::new(
                SessionStore::new(
                    redis.clone(),
                    keys.clone(),
                    config.session_max_per_user,
                    config.session_max_data_bytes,
                    config.max_revocation_ttl,
                ),
                limits,
                config.session_default_ttl.min(config.max_ttl),
                config.session_max_data_bytes,
            ),
            rate_limit: RateLimitApi::new(RateLimitStore::new(redis.clone(), keys.clone()), limits, false),
            locks: LockApi::new(
                LockStore::new(redis.clone(), keys.clone(), config.lock_replicas),
                limits,
                config.lock_default_ttl,
            ),
            stats: StatsApi::new(
                StatsStore::new(redis, keys, calendar.clone(), retention, config.stats_active_window_max),
                limits,
                calendar,
                config.stats_max_buckets,
                config.stats_active_window_max,
            ),
        }
    })
}

fn check<T>(rpc: &str, result: Result<Response<T>, Status>) {
    if let Err(status) = result {
        assert!(
            matches!(status.code(), Code::InvalidArgument | Code::Unavailable),
            "{rpc} answered {:?}: {}",
            status.code(),
            status.message()
        );
        if status.code() == Code::InvalidArgument {
            // The message names a field: `field: rule`.
            assert!(status.message().contains(": "), "{rpc}: {:?} names no field", status.message());
        }
    }
}

/// Decodes `bytes` as the request of `$method` and calls it.
macro_rules! call {
    ($api:expr, $trait:ident :: $method:ident, $request:ty, $bytes:expr) => {
        if let Ok(message) = <$request>::decode($bytes) {
            check(stringify!($method), <_ as $trait>::$method($api, Request::new(message)).await);
        }
    };
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, bytes)) = data.split_first() else { return };
    let a = apis();
    runtime().block_on(async {
        match which % 32 {
            0 => call!(&a.cache, CacheService::get, proto::GetRequest, bytes),
            1 => call!(&a.cache, CacheService::get_many, proto::GetManyRequest, bytes),
            2 => call!(&a.cache, CacheService::set, proto::SetRequest, bytes),
            3 => call!(&a.cache, CacheService::set_many, proto::SetManyRequest, bytes),
            4 => call!(&a.cache, CacheService::delete, proto::DeleteRequest, bytes),
            5 => call!(&a.cache, CacheService::touch, proto::TouchRequest, bytes),
            6 => call!(&a.cache, CacheService::fetch, proto::FetchRequest, bytes),
            7 => call!(&a.cache, CacheService::fill, proto::FillRequest, bytes),
            8 => call!(&a.cache, CacheService::abandon_fill, proto::AbandonFillRequest, bytes),
            9 => call!(&a.cache, CacheService::invalidate_tags, proto::InvalidateTagsRequest, bytes),
            10 => call!(&a.sessions, SessionService::create_session, proto::CreateSessionRequest, bytes),
            11 => call!(&a.sessions, SessionService::get_session, proto::GetSessionRequest, bytes),
            12 => call!(&a.sessions, SessionService::touch_session, proto::TouchSessionRequest, bytes),
            13 => call!(&a.sessions, SessionService::update_session, proto::UpdateSessionRequest, bytes),
            14 => call!(&a.sessions, SessionService::delete_session, proto::DeleteSessionRequest, bytes),
            15 => call!(&a.sessions, SessionService::list_user_sessions, proto::ListUserSessionsRequest, bytes),
            16 => call!(&a.sessions, SessionService::delete_user_sessions, proto::DeleteUserSessionsRequest, bytes),
            17 => call!(&a.sessions, SessionService::revoke_token, proto::RevokeTokenRequest, bytes),
            18 => call!(&a.sessions, SessionService::check_tokens, proto::CheckTokensRequest, bytes),
            19 => call!(&a.rate_limit, RateLimitService::check, proto::CheckRequest, bytes),
            20 => call!(&a.rate_limit, RateLimitService::reset_limits, proto::ResetLimitsRequest, bytes),
            21 => call!(&a.locks, LockService::acquire, proto::AcquireRequest, bytes),
            22 => call!(&a.locks, LockService::release, proto::ReleaseRequest, bytes),
            23 => call!(&a.locks, LockService::extend, proto::ExtendRequest, bytes),
            24 => call!(&a.locks, LockService::inspect, proto::InspectRequest, bytes),
            25 => call!(&a.stats, StatsService::increment, proto::IncrementRequest, bytes),
            26 => call!(&a.stats, StatsService::get_series, proto::GetSeriesRequest, bytes),
            27 => call!(&a.stats, StatsService::get_totals, proto::GetTotalsRequest, bytes),
            28 => call!(&a.stats, StatsService::mark_active, proto::MarkActiveRequest, bytes),
            29 => call!(&a.stats, StatsService::count_active, proto::CountActiveRequest, bytes),
            30 => call!(&a.stats, StatsService::add_unique, proto::AddUniqueRequest, bytes),
            _ => call!(&a.stats, StatsService::count_unique, proto::CountUniqueRequest, bytes),
        }
    });
});
