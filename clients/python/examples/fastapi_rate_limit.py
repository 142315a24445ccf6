"""FastAPI dependency that rate-limits each caller through cachecoord and answers 429 with
Retry-After. An example only: FastAPI is not a dependency of the package.

    pip install ./clients/python fastapi uvicorn
    CACHECOORD=localhost:50051 uvicorn examples.fastapi_rate_limit:app
"""

from __future__ import annotations

import os
from fastapi import Depends, FastAPI, HTTPException, Request, Response

from cachecoord_client import AsyncClient, Unavailable

app = FastAPI()
client: AsyncClient


@app.on_event("startup")
async def startup() -> None:
    global client
    # grpc.aio channels belong to the running loop: create the client inside it.
    client = AsyncClient(os.environ.get("CACHECOORD", "localhost:50051"), timeout=0.5)


@app.on_event("shutdown")
async def shutdown() -> None:
    await client.close()


def rate_limited(limit: int, per_seconds: float):
    """A dependency allowing `limit` requests per `per_seconds` per client address."""

    async def dependency(request: Request, response: Response) -> None:
        caller = request.client.host if request.client else "unknown"
        key = f"{{{caller}}}:{request.url.path}"  # one hash tag per caller (Redis Cluster)
        try:
            result = await client.rate_limit.check(key, limit, per_seconds)
        except Unavailable:
            return  # fail open when the limiter is down; choose fail closed for logins
        response.headers["X-RateLimit-Remaining"] = str(result.remaining)
        if not result.allowed:
            raise HTTPException(
                status_code=429,
                detail="Too Many Requests",
                headers={"Retry-After": str(result.retry_after_seconds)},
            )

    return dependency


@app.get("/api/items", dependencies=[Depends(rate_limited(100, 60))])
async def items() -> dict:
    return {"items": []}
