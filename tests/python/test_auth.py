"""`[route.auth]` (JWT) with the Python `websockets` client, the way a
browser-like client sends a token: in the query string. Tokens are made
here with the standard library (HS256), as an auth service would."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from conftest import _from_root, _stop, launch_wshd

SECRET = b"python-suite-shared-secret-at-least-32-bytes"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hs256(claims: dict, secret: bytes = SECRET) -> str:
    head = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    body = b64url(json.dumps(claims).encode())
    sig = hmac.new(secret, f"{head}.{body}".encode(), hashlib.sha256).digest()
    return f"{head}.{body}.{b64url(sig)}"


@pytest.fixture(scope="module")
def secure():
    target_dir = _from_root(os.environ.get("WSHD_TARGET_DIR", "target/debug"))
    tmp = Path(tempfile.mkdtemp(prefix="wshd-py-auth-"))
    proc = None
    try:
        handlers = tmp / "handlers"
        handlers.mkdir()
        shutil.copy2(target_dir / "libecho_wsh.so", handlers / "libecho_wsh.so")
        (tmp / "jwt.secret").write_bytes(SECRET + b"\n")
        (tmp / "wshd.toml").write_text(
            '[[route]]\npath = "/secure"\nhandler = "echo"\n'
            '[route.auth]\njwt_hs256_secret_file = "jwt.secret"\nleeway = "0s"\n'
        )
        proc, host, port, log_path = launch_wshd(tmp, handlers, "--config", str(tmp / "wshd.toml"))
        yield {"base": f"ws://{host}:{port}", "log": log_path}
    finally:
        if proc is not None:
            _stop(proc)
        shutil.rmtree(tmp, ignore_errors=True)


async def status_of(url: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with ws_connect(url, ping_interval=None, open_timeout=10):
            pass
    return info.value.response.status_code


def test_tokens_in_the_query_admit_refuse_and_refresh(secure):
    async def body():
        base = secure["base"] + "/secure"
        now = int(time.time())
        assert await status_of(base) == 401
        assert await status_of(base + "?token=" + hs256({"sub": "ana", "exp": now - 10})) == 401
        forged = hs256({"sub": "ana", "exp": now + 600}, b"x" * 40)
        assert await status_of(base + "?token=" + forged) == 401

        good = hs256({"sub": "ana", "exp": now + 2})
        async with ws_connect(base + "?token=" + good, ping_interval=None) as ws:
            await ws.send("hello")
            assert await asyncio.wait_for(ws.recv(), 10) == "hello"
            fresh = hs256({"sub": "ana", "exp": now + 3600})
            await ws.send(json.dumps({"wshd": "refresh", "token": fresh}, separators=(",", ":")))
            answer = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert answer == {"wshd": "refreshed", "exp": now + 3600}
            # Past the first token's exp the connection still serves.
            await asyncio.sleep(max(0, now + 3 - time.time()))
            await ws.send("later")
            assert await asyncio.wait_for(ws.recv(), 10) == "later"

        # Without a refresh: closed with 4001 when the token runs out.
        short = hs256({"sub": "ana", "exp": int(time.time()) + 1})
        async with ws_connect(base + "?token=" + short, ping_interval=None) as ws:
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(ws.recv(), 10)
            assert ws.close_code == 4001 and ws.close_reason == "token expired"

        log = secure["log"].read_text(errors="replace")
        assert good.split(".")[2] not in log and forged.split(".")[2] not in log

    asyncio.run(asyncio.wait_for(body(), 60))
