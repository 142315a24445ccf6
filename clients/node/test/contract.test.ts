// The contract from TypeScript against the real binary: Cache Set/Get, a Fetch/Fill,
// a RateLimit Check, a lock Acquire/Release with its fencing token, and the error codes.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { after, before, test } from "node:test";

import {
  Algorithm,
  Code,
  ConnectError,
  FetchOutcome,
  createCachecoordClient,
  durationFromMs,
  durationMs,
  type CachecoordClient,
} from "../src/index.js";
import { startStack, type Stack } from "./harness.js";

let stack: Stack;
let cc: CachecoordClient;
const ns = `node:${randomUUID()}:`;
const bytes = (s: string) => new TextEncoder().encode(s);

before(async () => {
  stack = await startStack();
  cc = createCachecoordClient(stack.baseUrl, { timeoutMs: 10_000 });
});

after(async () => {
  await stack?.stop();
});

test("cache Set then Get returns the value and its remaining TTL", async () => {
  const set = await cc.cache.set({ key: ns + "user:42", value: bytes("hello"), ttl: durationFromMs(60_000) });
  assert.equal(set.stored, true);
  const got = await cc.cache.get({ key: ns + "user:42" });
  assert.equal(got.found, true);
  assert.deepEqual(got.value, bytes("hello"));
  assert.ok(got.ttl && durationMs(got.ttl) > 0 && durationMs(got.ttl) <= 60_000);
  const miss = await cc.cache.get({ key: ns + "nothing" });
  assert.equal(miss.found, false);
});

test("Fetch gives one caller the fill lease; a waiting Fetch gets the value it fills", async () => {
  const key = ns + "report:7";
  const filler = await cc.cache.fetch({ key, fillTimeout: durationFromMs(10_000) });
  assert.equal(filler.outcome, FetchOutcome.FILL);
  assert.ok(filler.fillToken);
  // A second caller waits server-side for the fill.
  const waiter = cc.cache.fetch({ key, maxWait: durationFromMs(10_000) });
  const filled = await cc.cache.fill({ key, fillToken: filler.fillToken, value: bytes("{\"n\":7}") });
  assert.equal(filled.stored, true);
  const hit = await waiter;
  assert.equal(hit.outcome, FetchOutcome.HIT);
  assert.deepEqual(hit.value, bytes("{\"n\":7}"));
});

test("RateLimit Check admits its allowance, then denies with retry_after", async () => {
  const limits = [{ key: ns + "api", limit: 2n, period: durationFromMs(60_000), algorithm: Algorithm.FIXED_WINDOW }];
  assert.equal((await cc.rateLimit.check({ limits })).allowed, true);
  const second = await cc.rateLimit.check({ limits });
  assert.equal(second.allowed, true);
  assert.equal(second.statuses[0]?.remaining, 0n);
  const denied = await cc.rateLimit.check({ limits });
  assert.equal(denied.allowed, false);
  assert.ok(denied.retryAfter && durationMs(denied.retryAfter) > 0);
});

test("lock Acquire and Release; fencing tokens increase", async () => {
  const name = ns + "device:123:update";
  const first = await cc.locks.acquire({ name, ttl: durationFromMs(30_000), owner: "node-test" });
  assert.equal(first.acquired, true);
  assert.equal(typeof first.fencingToken, "bigint");
  assert.ok(first.fencingToken > 0n);
  const busy = await cc.locks.acquire({ name });
  assert.equal(busy.acquired, false);
  const info = await cc.locks.inspect({ name });
  assert.equal(info.owner, "node-test");
  assert.equal(info.fencingToken, first.fencingToken);
  assert.equal((await cc.locks.release({ name, leaseId: "not-the-lease" })).released, false);
  assert.equal((await cc.locks.release({ name, leaseId: first.leaseId })).released, true);
  const second = await cc.locks.acquire({ name, ttl: durationFromMs(30_000) });
  assert.equal(second.acquired, true);
  assert.ok(second.fencingToken > first.fencingToken);
  await cc.locks.release({ name, leaseId: second.leaseId });
});

test("errors carry the gRPC code: INVALID_ARGUMENT names the field; a deadline is DEADLINE_EXCEEDED", async () => {
  await assert.rejects(cc.cache.get({ key: "" }), (err: unknown) => {
    assert.ok(err instanceof ConnectError);
    assert.equal(err.code, Code.InvalidArgument);
    assert.match(err.rawMessage, /key/);
    return true;
  });
  const name = ns + "held";
  const held = await cc.locks.acquire({ name, ttl: durationFromMs(30_000) });
  assert.equal(held.acquired, true);
  // Waits for the lock up to 30 s, but the call's own deadline is 300 ms: the service
  // answers "not acquired" just before it, or the deadline strikes first.
  const started = Date.now();
  const answer = await cc.locks
    .acquire({ name, wait: durationFromMs(30_000) }, { timeoutMs: 300 })
    .catch((err: unknown) => err);
  if (answer instanceof ConnectError) {
    assert.equal(answer.code, Code.DeadlineExceeded);
  } else {
    assert.equal((answer as { acquired: boolean }).acquired, false);
  }
  assert.ok(Date.now() - started < 10_000, "the per-call deadline was not applied");
  await cc.locks.release({ name, leaseId: held.leaseId });
});
