#!/usr/bin/env bash
# Operator's smoke check with grpcurl and no .proto files at hand (reflection
# only): list services, describe one, Cache Set/Get, RateLimit Check, Envoy's
# ShouldRateLimit (from an envoyproxy/ratelimit YAML config), Health Check.
# Starts its own redis-server and the given cachecoord binary on free ports.
# Usage: scripts/grpcurl-smoke.sh [path/to/cachecoord]
set -euo pipefail

bin=${1:-target/debug/cachecoord}
work=$(mktemp -d)
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
redis_port=$(free_port)
grpc_port=$(free_port)
addr=127.0.0.1:$grpc_port

cleanup() {
  [ -n "${svc_pid:-}" ] && kill "$svc_pid" 2>/dev/null || true
  redis-cli -p "$redis_port" shutdown nosave >/dev/null 2>&1 || true
  rm -rf "$work"
}
trap cleanup EXIT

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" --daemonize yes \
  --logfile "$work/redis.log" >/dev/null
cat >"$work/rls.yaml" <<'YAML'
domain: edge
descriptors:
  - key: remote_address
    rate_limit: {unit: minute, requests_per_unit: 1}
YAML
"$bin" --listen "$addr" --redis-url "redis://127.0.0.1:$redis_port" --rls-config "$work/rls.yaml" \
  >"$work/service.log" 2>&1 &
svc_pid=$!

fail() { echo "grpcurl smoke: $*" >&2; cat "$work/service.log" >&2; exit 1; }
expect() { # expect NAME PATTERN OUTPUT
  grep -q -- "$2" <<<"$3" || fail "$1: expected '$2' in: $3"
  echo "ok  $1"
}

for _ in $(seq 100); do
  out=$(grpcurl -plaintext "$addr" grpc.health.v1.Health/Check 2>/dev/null || true)
  grep -q SERVING <<<"$out" && break
  sleep 0.1
done

expect "Health/Check" '"status": "SERVING"' "$(grpcurl -plaintext "$addr" grpc.health.v1.Health/Check)"
expect "Health/Check per service" '"status": "SERVING"' \
  "$(grpcurl -plaintext -d '{"service":"cachecoord.v1.CacheService"}' "$addr" grpc.health.v1.Health/Check)"
services=$(grpcurl -plaintext "$addr" list)
for svc in CacheService SessionService RateLimitService LockService StatsService; do
  expect "list $svc" "cachecoord.v1.$svc" "$services"
done
expect "list envoy.service.ratelimit.v3.RateLimitService" "envoy.service.ratelimit.v3.RateLimitService" "$services"
expect "describe" "rpc Fetch" "$(grpcurl -plaintext "$addr" describe cachecoord.v1.CacheService)"
expect "describe message" "fill_timeout" "$(grpcurl -plaintext "$addr" describe cachecoord.v1.FetchRequest)"
expect "Cache/Set" '"stored": true' \
  "$(grpcurl -plaintext -d '{"key":"smoke","value":"aGVsbG8=","ttl":"60s"}' "$addr" cachecoord.v1.CacheService/Set)"
expect "Cache/Get" '"value": "aGVsbG8="' \
  "$(grpcurl -plaintext -d '{"key":"smoke"}' "$addr" cachecoord.v1.CacheService/Get)"
bad=$(grpcurl -plaintext -d '{"key":""}' "$addr" cachecoord.v1.CacheService/Get 2>&1 || true)
expect "Cache/Get invalid" "InvalidArgument" "$bad"
expect "Stats/Increment" '"3"' \
  "$(grpcurl -plaintext -d '{"deltas":[{"name":"smoke","amount":"3"}]}' "$addr" cachecoord.v1.StatsService/Increment)"
week=$(grpcurl -plaintext -d "{\"name\":\"smoke\",\"granularity\":\"GRANULARITY_DAY\",
  \"start\":\"$(date -u -d '6 days ago' +%FT%TZ)\",\"end\":\"$(date -u +%FT%TZ)\"}" \
  "$addr" cachecoord.v1.StatsService/GetSeries)
expect "Stats/GetSeries last 7 days" '"total": "3"' "$week"
[ "$(grep -c '"start"' <<<"$week")" = 7 ] || fail "Stats/GetSeries: expected 7 day buckets in: $week"
rl='{"limits":[{"key":"smoke","limit":1,"period":"60s","algorithm":"ALGORITHM_TOKEN_BUCKET"}]}'
expect "RateLimit/Check" '"allowed": true' "$(grpcurl -plaintext -d "$rl" "$addr" cachecoord.v1.RateLimitService/Check)"
expect "RateLimit/Check denied" '"retryAfter": "[56][0-9.]*s"' \
  "$(grpcurl -plaintext -d "$rl" "$addr" cachecoord.v1.RateLimitService/Check)"
rls='{"domain":"edge","descriptors":[{"entries":[{"key":"remote_address","value":"203.0.113.7"}]}]}'
expect "Envoy ShouldRateLimit" '"overallCode": "OK"' \
  "$(grpcurl -plaintext -d "$rls" "$addr" envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit)"
expect "Envoy ShouldRateLimit over the limit" '"overallCode": "OVER_LIMIT"' \
  "$(grpcurl -plaintext -d "$rls" "$addr" envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit)"
created=$(grpcurl -plaintext -d '{"user_id":"smoke","data":{"role":"admin"},"ttl":"60s"}' "$addr" \
  cachecoord.v1.SessionService/CreateSession)
expect "Session/CreateSession" '"role": "admin"' "$created"
sid=$(grep -o '"sessionId": "[^"]*"' <<<"$created" | cut -d'"' -f4)
expect "Session/GetSession" '"found": true' \
  "$(grpcurl -plaintext -d '{"session_id":"'"$sid"'","touch":true}' "$addr" cachecoord.v1.SessionService/GetSession)"
lock=$(grpcurl -plaintext -d '{"name":"smoke","ttl":"30s","owner":"smoke"}' "$addr" cachecoord.v1.LockService/Acquire)
expect "Lock/Acquire" '"acquired": true' "$lock"
lease=$(sed -n 's/.*"leaseId": "\([^"]*\)".*/\1/p' <<<"$lock")
expect "Lock/Inspect" '"owner": "smoke"' \
  "$(grpcurl -plaintext -d '{"name":"smoke"}' "$addr" cachecoord.v1.LockService/Inspect)"
expect "Lock/Release" '"released": true' \
  "$(grpcurl -plaintext -d "{\"name\":\"smoke\",\"lease_id\":\"$lease\"}" "$addr" cachecoord.v1.LockService/Release)"
expect "Lock/Hold" 'HOLD_EVENT_ACQUIRED' \
  "$(echo '{"name":"smoke","ttl":"30s"}' | grpcurl -plaintext -d @ "$addr" cachecoord.v1.LockService/Hold)"
echo "grpcurl smoke: all checks passed"
