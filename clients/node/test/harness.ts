// Starts a throwaway redis-server and the real cachecoord binary on free ports, as the
// Python suite's conftest does. The binary is $CACHECOORD_BIN or target/release/cachecoord.
import { spawn, type ChildProcess } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const repoRoot = resolve(fileURLToPath(import.meta.url), "../../../../..");

export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const server = createServer();
    server.once("error", fail);
    server.listen(0, "127.0.0.1", () => {
      const address = server.address();
      server.close(() => (typeof address === "object" && address ? ok(address.port) : fail(new Error("no port"))));
    });
  });
}

function accepts(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const socket = connect(port, "127.0.0.1");
    socket.once("connect", () => (socket.destroy(), ok(true)));
    socket.once("error", () => ok(false));
  });
}

/** Waits (bounded) until the port accepts connections: there is no event to wait on. */
async function untilListening(port: number, what: string, proc: ChildProcess): Promise<void> {
  const deadline = Date.now() + 30_000;
  while (!(await accepts(port))) {
    if (proc.exitCode !== null) throw new Error(`${what} exited with ${proc.exitCode}`);
    if (Date.now() > deadline) throw new Error(`${what} did not start listening`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

export interface Stack {
  baseUrl: string;
  stop(): Promise<void>;
}

export async function startStack(): Promise<Stack> {
  const dir = mkdtempSync(join(tmpdir(), "cc-node-"));
  const redisPort = await freePort();
  const redis = spawn(
    "redis-server",
    ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir],
    { stdio: "ignore" },
  );
  await untilListening(redisPort, "redis-server", redis);
  const port = await freePort();
  const binary = process.env.CACHECOORD_BIN ?? join(repoRoot, "target", "release", "cachecoord");
  const server = spawn(binary, ["--listen", `127.0.0.1:${port}`, "--redis-url", `redis://127.0.0.1:${redisPort}`], {
    stdio: ["ignore", "ignore", "inherit"],
  });
  await untilListening(port, "cachecoord", server);
  const stopped = (p: ChildProcess) => new Promise<void>((r) => (p.exitCode !== null ? r() : p.once("exit", () => r())));
  return {
    baseUrl: `http://127.0.0.1:${port}`,
    async stop() {
      server.kill("SIGTERM");
      await stopped(server);
      redis.kill("SIGKILL");
      await stopped(redis);
      rmSync(dir, { recursive: true, force: true });
    },
  };
}
