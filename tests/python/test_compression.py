"""permessage-deflate (RFC 7692) with real clients: pywebsocket3's own
echo_client.py and the Python `websockets` client.

The server's config (conftest.py) turns compression on for /echo_deflate and
/chat_deflate; /echo and /chat have it off.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys

import pytest
from websockets.exceptions import ConnectionClosed
from websockets.extensions.permessage_deflate import ClientPerMessageDeflateFactory
from websockets.frames import Opcode

from conftest import MAX_MESSAGE_SIZE
from test_wshd import async_test, connect, recv

TIMEOUT = 30  # seconds for any single wait

# Compressible payloads, well above any sensible "too small to compress"
# threshold, so the server's echo must come back compressed.
JSON_TEXT = "[" + ",".join(f'{{"id":{i},"name":"user{i}","role":"member"}}' for i in range(600)) + "]"
BINARY = b"wshd binary \x00\x01\x02\xff " * 16_000  # 256 KB


def random_letters(n: int) -> bytes:
    """Compressible (4 bits a byte) without repeats inside a small window."""
    return bytes(b"abcdefghijklmnop"[x & 15] for x in os.urandom(n))


def watch_compressed(ws) -> list[bool]:
    """For each data frame the client receives from now on, whether it came
    compressed (RSV1 set).  The negotiated extension sees every incoming
    frame before the client inflates it, so wrap its decode."""
    (ext,) = ws.protocol.extensions
    seen: list[bool] = []
    decode = ext.decode

    def watching(frame, *, max_size=None):
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            seen.append(frame.rsv1)
        return decode(frame, max_size=max_size)

    ext.decode = watching
    return seen


# --- pywebsocket3's echo_client.py ---------------------------------------------


def run_echo_client(example, wshd, route, messages, *extra):
    """Run echo_client.py as a user would; returns the finished process.
    Its debug log (stderr) shows the server's handshake headers and, for each
    compressed message it receives, an "Incoming compression ratio" line."""
    assert not any("," in m for m in messages), "echo_client splits -m on commas"
    return subprocess.run(
        [
            sys.executable, str(example / "echo_client.py"),
            "-s", wshd.host, "-p", str(wshd.port), "-r", route,
            "-m", ",".join(messages), "-k", str(TIMEOUT), "--log-level", "debug", *extra,
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, encoding="utf-8", timeout=TIMEOUT * 2,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )


def server_extensions_header(stderr: str):
    """The Sec-WebSocket-Extensions values from echo_client's log of the
    server's handshake headers (None when the header is absent)."""
    m = re.search(r"Server's opening handshake headers: (\{.*\})", stderr)
    assert m, f"no handshake headers in the client's log:\n{stderr[-3000:]}"
    m = re.search(r"'sec-websocket-extensions': \[([^\]]*)\]", m.group(1))
    return m.group(1) if m else None


ECHO_CLIENT_MESSAGES = ["Hello", "wshd " * 2000, "héllo wörld ✓", "<>", "Goodbye"]


def expected_echo_client_stdout(messages):
    lines = []
    for m in messages:
        lines += [f"Send: {m}", f"Recv: {m}"]
    # "Goodbye" makes the echo handler close: echo_client then prints this.
    return lines + ["Recv close", "Send ack"]


def test_pywebsocket3_echo_client_with_permessage_deflate(wshd, pywebsocket3_example):
    proc = run_echo_client(pywebsocket3_example, wshd, "/echo_deflate", ECHO_CLIENT_MESSAGES,
                           "--use-permessage-deflate")
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}\n{wshd.log()[-2000:]}"
    assert proc.stdout.splitlines() == expected_echo_client_stdout(ECHO_CLIENT_MESSAGES)
    header = server_extensions_header(proc.stderr)
    assert header is not None and header.strip("'").startswith("permessage-deflate"), header
    # At least the 10 KB message came back compressed.
    assert proc.stderr.count("Incoming compression ratio") >= 1, proc.stderr[-3000:]


def test_pywebsocket3_echo_client_without_the_flag(wshd, pywebsocket3_example):
    proc = run_echo_client(pywebsocket3_example, wshd, "/echo_deflate", ECHO_CLIENT_MESSAGES)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr[-3000:]}"
    assert proc.stdout.splitlines() == expected_echo_client_stdout(ECHO_CLIENT_MESSAGES)
    # Not offered, so not answered (echo_client refuses an unrequested extension).
    assert server_extensions_header(proc.stderr) is None
    assert "Incoming compression ratio" not in proc.stderr


def test_pywebsocket3_echo_client_flag_on_a_route_without_compression(wshd, pywebsocket3_example):
    # echo_client insists: an offer the server declines fails the handshake.
    proc = run_echo_client(pywebsocket3_example, wshd, "/echo", ["Hello"], "--use-permessage-deflate")
    assert proc.returncode != 0
    assert "Requested permessage-deflate, but the server rejected it" in proc.stderr, proc.stderr[-3000:]
    assert server_extensions_header(proc.stderr) is None


# --- websockets ------------------------------------------------------------------


@async_test
async def test_websockets_negotiates_and_echoes_compressed(wshd):
    # websockets offers permessage-deflate by default.
    async with connect(wshd, "/echo_deflate") as ws:
        (ext,) = ws.protocol.extensions
        assert ext.name == "permessage-deflate"
        # wshd always answers with both no-context-takeover parameters, so a
        # connection holds no zlib state between messages.
        assert ext.remote_no_context_takeover and ext.local_no_context_takeover
        compressed = watch_compressed(ws)
        for _ in range(3):  # more than once: no state may carry over
            await ws.send(JSON_TEXT)
            assert await recv(ws) == JSON_TEXT
        await ws.send(BINARY)
        assert await recv(ws) == BINARY
        await ws.send(bytes(100_000))
        assert await recv(ws) == bytes(100_000)
        assert compressed == [True] * 5
        # Incompressible: whether the reply is compressed is the server's
        # choice, but it must come back intact.
        noise = os.urandom(100_000)
        await ws.send(noise)
        assert await recv(ws) == noise
        # websockets compresses every message, even tiny and empty ones: the
        # server must inflate those too, whatever it does with its replies.
        for small in ["", b"", "é", b"\x00", "hi ✓"]:
            await ws.send(small)
            assert await recv(ws) == small


@async_test
async def test_websockets_compressed_fragments(wshd):
    async def fragments(parts):
        for p in parts:
            yield p
            await asyncio.sleep(0)

    async with connect(wshd, "/echo_deflate") as ws:
        # One compressed message over several frames (RSV1 on the first only).
        parts = [JSON_TEXT[:1000], JSON_TEXT[1000:1001], "", JSON_TEXT[1001:]]
        await ws.send(fragments(parts))
        assert await recv(ws) == JSON_TEXT
        snowman = "☃".encode()
        await ws.send(fragments([b"x" + snowman[:1], snowman[1:] + BINARY]))
        assert await recv(ws) == b"x" + snowman + BINARY


@pytest.mark.parametrize("size", [MAX_MESSAGE_SIZE, MAX_MESSAGE_SIZE + 1])
@async_test
async def test_websockets_max_message_size_counts_inflated_bytes(wshd, size):
    # 1 MiB of zeros deflates to about 1 KB: the limit must see the inflated size.
    payload = bytes(size)
    async with connect(wshd, "/echo_deflate") as ws:
        try:
            await ws.send(payload)
        except ConnectionClosed:
            pass  # the server may close while we are still writing
        if size <= MAX_MESSAGE_SIZE:
            assert await recv(ws) == payload
            return
        with pytest.raises(ConnectionClosed) as info:
            await recv(ws)
    assert info.value.rcvd is not None, "no close frame received"
    assert info.value.rcvd.code == 1009


@async_test
async def test_websockets_server_max_window_bits_is_honoured(wshd):
    # A 4 KiB block of random letters, repeated: a 1 KiB window still
    # compresses it (16 letters, 4 bits each), but a wider one would also
    # find the repeats 4 KiB back.  If the server compressed with a wider
    # window than the 10 bits it accepted, the client's inflater (sized by
    # the answer) would fail on the reply.
    block = random_letters(4096)
    payload = block * 16
    factory = ClientPerMessageDeflateFactory(server_max_window_bits=10)
    async with connect(wshd, "/echo_deflate", compression=None, extensions=[factory]) as ws:
        (ext,) = ws.protocol.extensions
        assert ext.remote_max_window_bits == 10
        compressed = watch_compressed(ws)
        await ws.send(payload)
        assert await recv(ws) == payload
        assert compressed == [True]


@async_test
async def test_websockets_server_max_window_bits_8_is_declined(wshd):
    # zlib cannot compress with a 256-byte window, so wshd declines the offer
    # (server/src/deflate.rs) and the connection goes on uncompressed.
    factory = ClientPerMessageDeflateFactory(server_max_window_bits=8)
    async with connect(wshd, "/echo_deflate", compression=None, extensions=[factory]) as ws:
        assert ws.protocol.extensions == []
        await ws.send(JSON_TEXT)
        assert await recv(ws) == JSON_TEXT


@async_test
async def test_websockets_not_negotiated_where_compression_is_off(wshd):
    for route in ("/echo", "/chat"):
        async with connect(wshd, route) as ws:
            assert ws.protocol.extensions == [], route
            await ws.send(JSON_TEXT)
            assert await recv(ws) == JSON_TEXT


@async_test
async def test_websockets_chat_room_mixes_compressed_and_plain_members(wshd):
    # One room (one topic) reached through a route with compression and one
    # without, and two window sizes: each member must get every publish in
    # the form its own connection negotiated.
    room = "?room=deflate-mix"
    narrow = ClientPerMessageDeflateFactory(server_max_window_bits=9)
    async with (
        connect(wshd, "/chat_deflate" + room) as wide,
        connect(wshd, "/chat_deflate" + room, compression=None, extensions=[narrow]) as small,
        connect(wshd, "/chat" + room) as plain,
    ):
        members = [wide, small, plain]
        assert [len(ws.protocol.extensions) for ws in members] == [1, 1, 0]
        assert small.protocol.extensions[0].remote_max_window_bits == 9
        watched = [watch_compressed(wide), watch_compressed(small)]
        block = random_letters(2048)  # repeats 2 KiB back: beyond a 9-bit window
        for sender, msg in [(wide, JSON_TEXT), (plain, (block * 20).decode()), (small, JSON_TEXT[::-1])]:
            await sender.send(msg)
            got = await asyncio.wait_for(asyncio.gather(*(recv(ws) for ws in members)), TIMEOUT)
            assert got == [msg] * 3
        assert watched == [[True] * 3, [True] * 3]
