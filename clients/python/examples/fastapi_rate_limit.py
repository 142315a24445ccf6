"""A FastAPI app using cachecoord_client.fastapi: per-IP and per-user rate limits answering
429 with Retry-After and RateLimit-* headers, server-side sessions in a cookie, and
revoked-token checks.

    pip install './clients/python[fastapi]' uvicorn
    CACHECOORD=localhost:50051 uvicorn examples.fastapi_rate_limit:app
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from datetime import timedelta
from typing import AsyncIterator, Dict

from fastapi import Depends, FastAPI

from cachecoord_client import AsyncClient
from cachecoord_client.fastapi import (
    Rate,
    RateLimit,
    RevocationCheck,
    ServerSession,
    SessionMiddleware,
    Tokens,
    cookie,
    current_session,
    header,
)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # grpc.aio channels belong to the running loop: create the client inside it.
    async with AsyncClient(os.environ.get("CACHECOORD", "localhost:50051"), timeout=0.5) as client:
        app.state.cachecoord = client
        yield


app = FastAPI(lifespan=lifespan)
app.add_middleware(SessionMiddleware, ttl=timedelta(hours=24))

per_ip = RateLimit(Rate(100, 60), fail_open=True)  # keyed by client_ip; limiter down: let it pass
per_key = RateLimit(Rate(10, 1, "token_bucket", burst=20), Rate(50_000, 86_400), key=header("x-api-key"))
not_revoked = RevocationCheck(refresh=cookie("refresh_token"))


@app.get("/api/items", dependencies=[Depends(per_ip), Depends(per_key)])
async def items() -> Dict[str, list]:
    return {"items": []}


@app.post("/login")
async def login(user_id: str, session: ServerSession = Depends(current_session)) -> Dict[str, str]:
    # (check the password first) A new session id on every login: no session fixation.
    await session.login(user_id)
    return {"user": user_id}


@app.post("/cart/{item}")
async def add_to_cart(item: str, session: ServerSession = Depends(current_session)) -> Dict[str, int]:
    session["last_item"] = item  # saved with a merge as the response starts
    return {"items": 1}


@app.get("/me")
async def me(tokens: Tokens = Depends(not_revoked)) -> Dict[str, bool]:
    return {"refresh_checked": tokens.refresh is not None}
