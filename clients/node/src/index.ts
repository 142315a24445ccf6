/**
 * cachecoord for TypeScript on Node: the contract's services as Connect clients speaking
 * gRPC over HTTP/2.
 *
 * The messages, enums and service descriptors under `./gen` are generated from
 * `proto/cachecoord/v1` by `buf generate` with protoc-gen-es (see buf.gen.yaml); this file
 * only wires them to one transport. Every RPC is `await client.<service>.<method>(request,
 * { timeoutMs, signal })`; aborting the signal cancels the call on the server too.
 * Expected outcomes (a miss, a denial, a lock not acquired) are response fields; errors are
 * `ConnectError`s whose `code` is the gRPC status (`Code.InvalidArgument`, `Code.Unavailable`,
 * `Code.DeadlineExceeded`, ...).
 */
import { createClient, type Client, type Interceptor } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";

import { CacheService } from "./gen/cachecoord/v1/cache_pb.js";
import { LockService } from "./gen/cachecoord/v1/lock_pb.js";
import { RateLimitService } from "./gen/cachecoord/v1/rate_limit_pb.js";
import { SessionService } from "./gen/cachecoord/v1/session_pb.js";
import { StatsService } from "./gen/cachecoord/v1/stats_pb.js";

export * from "./gen/cachecoord/v1/cache_pb.js";
export * from "./gen/cachecoord/v1/lock_pb.js";
export * from "./gen/cachecoord/v1/rate_limit_pb.js";
export * from "./gen/cachecoord/v1/session_pb.js";
export * from "./gen/cachecoord/v1/stats_pb.js";
export { Code, ConnectError } from "@connectrpc/connect";
export { durationFromMs, durationMs, timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";

export interface CachecoordOptions {
  /** Deadline of a call that sets no `timeoutMs` of its own, in milliseconds. Default 5000. */
  timeoutMs?: number;
  /** Interceptors, e.g. one that adds an `authorization` header. */
  interceptors?: Interceptor[];
}

/** One typed client per service of the contract, sharing one HTTP/2 connection. */
export interface CachecoordClient {
  cache: Client<typeof CacheService>;
  sessions: Client<typeof SessionService>;
  rateLimit: Client<typeof RateLimitService>;
  locks: Client<typeof LockService>;
  stats: Client<typeof StatsService>;
}

/**
 * `createCachecoordClient("http://cachecoord:50051")`: plaintext HTTP/2 (h2c);
 * an `https://` URL uses TLS.
 */
export function createCachecoordClient(baseUrl: string, options: CachecoordOptions = {}): CachecoordClient {
  const transport = createGrpcTransport({
    baseUrl,
    defaultTimeoutMs: options.timeoutMs ?? 5000,
    interceptors: options.interceptors ?? [],
  });
  return {
    cache: createClient(CacheService, transport),
    sessions: createClient(SessionService, transport),
    rateLimit: createClient(RateLimitService, transport),
    locks: createClient(LockService, transport),
    stats: createClient(StatsService, transport),
  };
}
