"""wshd against the Python `websockets` client (asyncio API)."""

from __future__ import annotations

import asyncio
import functools
import http.client
import os

import pytest
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from conftest import ALLOWED_ORIGIN, DOC_FILE_BODY, DOC_HTML_BODY, MAX_MESSAGE_SIZE

TIMEOUT = 30  # seconds for any single wait


def async_test(fn):
    """Run an async test body in a fresh event loop, bounded in time."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        async def bounded():
            return await asyncio.wait_for(fn(*args, **kwargs), TIMEOUT * 2)

        return asyncio.run(bounded())

    return wrapper


def connect(wshd, route, **kwargs):
    kwargs.setdefault("ping_interval", None)
    kwargs.setdefault("max_size", 4 * MAX_MESSAGE_SIZE)
    kwargs.setdefault("open_timeout", TIMEOUT)
    return ws_connect(wshd.ws_url(route), **kwargs)


async def recv(ws):
    return await asyncio.wait_for(ws.recv(), TIMEOUT)


async def wait_closed(ws):
    await asyncio.wait_for(ws.wait_closed(), TIMEOUT)
    return ws.close_code, ws.close_reason


async def handshake_status(wshd, route, **kwargs):
    with pytest.raises(InvalidStatus) as info:
        async with connect(wshd, route, **kwargs):
            pass
    return info.value.response.status_code


# --- /echo -----------------------------------------------------------------


@async_test
async def test_echo_text_and_binary(wshd):
    async with connect(wshd, "/echo") as ws:
        await ws.send("héllo wörld ✓")
        assert await recv(ws) == "héllo wörld ✓"
        payload = bytes([0, 1, 2, 0x7F, 0x80, 0xFE, 0xFF])
        await ws.send(payload)
        assert await recv(ws) == payload
        await ws.send("")
        assert await recv(ws) == ""
        await ws.send(b"")
        assert await recv(ws) == b""


@pytest.mark.parametrize("size", [1, 125, 126, 65535, 65536, MAX_MESSAGE_SIZE - 1, MAX_MESSAGE_SIZE])
@async_test
async def test_echo_sizes_up_to_max(wshd, size):
    data = os.urandom(size)
    text = "é" * (size // 2) + "a" * (size % 2)  # exactly `size` UTF-8 bytes
    assert len(text.encode()) == size
    async with connect(wshd, "/echo") as ws:
        await ws.send(data)
        assert await recv(ws) == data
        await ws.send(text)
        assert await recv(ws) == text


@pytest.mark.parametrize("kind", ["binary", "text"])
@async_test
async def test_over_max_closes_1009(wshd, kind):
    payload = b"a" * (MAX_MESSAGE_SIZE + 1)
    async with connect(wshd, "/echo") as ws:
        try:
            await ws.send(payload if kind == "binary" else payload.decode())
        except ConnectionClosed:
            pass  # the server may close while we are still writing
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None, "no close frame received"
    assert info.value.rcvd.code == 1009


async def _fragments(parts):
    for p in parts:
        yield p
        await asyncio.sleep(0)


@async_test
async def test_fragmented_messages(wshd):
    async with connect(wshd, "/echo") as ws:
        await ws.send(_fragments(["Hel", "lo, ", "", "fragments ✓"]))
        assert await recv(ws) == "Hello, fragments ✓"
        await ws.send(_fragments([b"\x01\x02", b"\x03", b"\x04\x05"]))
        assert await recv(ws) == b"\x01\x02\x03\x04\x05"
        # A multi-byte character split across two frames.
        snowman = "☃".encode()
        await ws.send(_fragments([b"x" + snowman[:1], snowman[1:] + b"y"]))
        assert await recv(ws) == b"x" + snowman + b"y"


@async_test
async def test_fragments_over_max_close_1009(wshd):
    half = b"b" * (MAX_MESSAGE_SIZE // 2)
    async with connect(wshd, "/echo") as ws:
        try:
            await ws.send(_fragments([half, half, b"c"]))
        except ConnectionClosed:
            pass
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None and info.value.rcvd.code == 1009


@async_test
async def test_ping_pong(wshd):
    async with connect(wshd, "/echo") as ws:
        for payload in (b"", b"ping-42", bytes(range(125))):
            waiter = await ws.ping(payload)
            latency = await asyncio.wait_for(waiter, TIMEOUT)
            assert latency >= 0
        # Still usable after pings.
        await ws.send("after ping")
        assert await recv(ws) == "after ping"


@async_test
async def test_server_initiated_close_goodbye(wshd):
    async with connect(wshd, "/echo") as ws:
        await ws.send("Goodbye")
        assert await recv(ws) == "Goodbye"
        with pytest.raises(ConnectionClosedOK) as info:
            await recv(ws)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1000
        # The server spoke first.
        assert info.value.rcvd_then_sent is True
    assert ws.close_code == 1000


@async_test
async def test_client_initiated_close_4000(wshd):
    async with connect(wshd, "/echo") as ws:
        await ws.send("before close")
        assert await recv(ws) == "before close"
        await ws.close(4000, "client is done")
        code, _reason = await wait_closed(ws)
    assert ws.protocol.close_sent.code == 4000
    assert ws.protocol.close_sent.reason == "client is done"
    # RFC 6455 5.5.1: the reply typically echoes the status code received.
    assert code == 4000


# --- /chat -----------------------------------------------------------------


@async_test
async def test_chat_fan_out_to_three(wshd):
    async with connect(wshd, "/chat") as a, connect(wshd, "/chat") as b, connect(wshd, "/chat") as c:
        clients = [a, b, c]
        for i, sender in enumerate(clients):
            msg = f"message {i} from client {i}"
            await sender.send(msg)
            got = await asyncio.gather(*(recv(ws) for ws in clients))
            assert got == [msg, msg, msg]
        await b.send(b"\x00binary\xff")
        got = await asyncio.gather(*(recv(ws) for ws in clients))
        assert got == [b"\x00binary\xff"] * 3


# --- /origin_check ---------------------------------------------------------


@pytest.mark.parametrize(
    "offer, expected",
    [
        (["chat.v1", "chat.v2"], "chat.v2"),
        (["chat.v2", "chat.v1"], "chat.v2"),
        (["x.other", "chat.v1"], "chat.v1"),
        (["chat.v1"], "chat.v1"),
    ],
)
@async_test
async def test_subprotocol_negotiation(wshd, offer, expected):
    async with connect(wshd, "/origin_check", origin=ALLOWED_ORIGIN, subprotocols=offer) as ws:
        assert ws.subprotocol == expected
        await ws.send("still works")
        await ws.close()


@async_test
async def test_subprotocol_no_match_400(wshd):
    status = await handshake_status(wshd, "/origin_check", origin=ALLOWED_ORIGIN, subprotocols=["chat.v3"])
    assert status == 400


@pytest.mark.parametrize("origin", ["http://evil.example", "http://allowed.example.evil", None])
@async_test
async def test_origin_rejected_403(wshd, origin):
    kwargs = {"subprotocols": ["chat.v1"]}
    if origin is not None:
        kwargs["origin"] = origin
    assert await handshake_status(wshd, "/origin_check", **kwargs) == 403


# --- HTTP side -------------------------------------------------------------


@async_test
async def test_unknown_route_404(wshd):
    assert await handshake_status(wshd, "/no-such-route") == 404


def _http(wshd, method, path, with_headers=False):
    conn = http.client.HTTPConnection(wshd.host, wshd.port, timeout=TIMEOUT)
    try:
        conn.request(method, path)
        resp = conn.getresponse()
        result = (resp.status, resp.read())
        return result + (resp.headers,) if with_headers else result
    finally:
        conn.close()


def test_plain_get_on_handler_path_426(wshd):
    status, _ = _http(wshd, "GET", "/echo")
    assert status == 426


def test_static_files(wshd):
    assert _http(wshd, "GET", "/hello.txt") == (200, DOC_FILE_BODY)
    assert _http(wshd, "HEAD", "/hello.txt") == (200, b"")
    assert _http(wshd, "GET", "/missing.txt")[0] == 404


def test_static_html_content_type(wshd):
    status, body, headers = _http(wshd, "GET", "/page.html", with_headers=True)
    assert status == 200
    assert body == DOC_HTML_BODY
    assert headers.get("Content-Type", "").startswith("text/html")


@pytest.mark.parametrize(
    "path",
    ["/escape.toml", "/../wshd.toml", "/%2e%2e/wshd.toml", "/..%2fwshd.toml", "/sub/../../wshd.toml", "/%2E%2E%2Fwshd.toml"],
)
def test_static_paths_outside_the_root_are_404(wshd, path):
    # wshd.toml sits in the parent of the doc root (see conftest).
    assert (wshd.tmp / "wshd.toml").exists()
    status, body = _http(wshd, "GET", path)
    assert status == 404
    assert b"max_message_size" not in body


# --- TLS ---------------------------------------------------------------------


@async_test
async def test_wss_echo(wshd_tls):
    import ssl

    ctx = ssl.create_default_context(cafile=str(wshd_tls.cert))
    async with ws_connect(wshd_tls.wss_url("/echo"), ssl=ctx, open_timeout=TIMEOUT) as ws:
        assert ws.transport.get_extra_info("ssl_object").selected_alpn_protocol() in (None, "http/1.1")
        await ws.send("hello over wss")
        assert await recv(ws) == "hello over wss"
        big = os.urandom(200_000)
        await ws.send(big)
        assert await recv(ws) == big
