// permessage-deflate (RFC 7692) between wshd and the Node `ws` client.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import net from 'node:net';
import { startWshd, configToml } from '../lib/wshd.mjs';
import { openWs, nextMessage, closed } from '../lib/client.mjs';

const T = { timeout: 120000 }; // per test, so no runner flag is needed
let server;

before(async () => {
  // This file's own routes: the echo and chat handlers with compression on
  // (the default /echo and /chat have it off).
  const config = configToml() + [
    '',
    '[[route]]', 'path = "/echo_deflate"', 'handler = "echo"', 'compression = "on"', '',
    '[[route]]', 'path = "/chat_deflate"', 'handler = "chat"', 'compression = "on"', '',
  ].join('\n');
  server = await startWshd({ config });
});

after(async () => {
  if (server) {
    await server.stop();
    if (process.env.WSHD_TEST_VERBOSE) console.log(server.log());
    server = null;
  }
});

/**
 * Connect with `perMessageDeflate` (true: ws's defaults, which only
 * compress outgoing messages of 1024 bytes or more).  ws.rawSocket is the
 * TCP socket, through ws's documented createConnection option, so a test can
 * count the bytes that arrived on the wire.
 */
function connect(route, perMessageDeflate = true) {
  let rawSocket;
  const createConnection = (opts) => {
    rawSocket = net.connect(opts);
    return rawSocket;
  };
  return openWs(server.wsUrl(route), [], { perMessageDeflate, createConnection }).then((ws) => {
    ws.rawSocket = rawSocket;
    return ws;
  });
}

/** Send `data` and wait for its echo; returns the echo and the bytes read off the socket meanwhile. */
async function echo(ws, data, timeoutMs = 30000) {
  const before = ws.rawSocket.bytesRead;
  ws.send(data);
  const m = await nextMessage(ws, timeoutMs);
  return { ...m, wire: ws.rawSocket.bytesRead - before };
}

async function closeCleanly(ws) {
  ws.close(1000);
  const c = await closed(ws);
  assert.equal(c.code, 1000);
}

const JSON_TEXT = JSON.stringify(Array.from({ length: 3000 }, (_, i) => ({ id: i, name: `user${i}`, role: 'member' })));

test('deflate: negotiated on a route with compression = "on", with no context takeover both ways', T, async () => {
  const ws = await connect('/echo_deflate');
  assert.equal(ws.extensions, 'permessage-deflate');
  // wshd answers with both, so an idle connection holds no zlib state.
  const answer = ws.upgradeHeaders['sec-websocket-extensions'];
  assert.match(answer, /^permessage-deflate(;|$)/);
  assert.match(answer, /server_no_context_takeover/);
  assert.match(answer, /client_no_context_takeover/);
  await closeCleanly(ws);
});

test('deflate: messages above the client\'s threshold echo, and the replies come compressed', T, async () => {
  const ws = await connect('/echo_deflate');
  assert.ok(JSON_TEXT.length > 100000);
  for (let i = 0; i < 3; i++) { // more than once: no state may carry over
    const m = await echo(ws, JSON_TEXT);
    assert.equal(m.isBinary, false);
    assert.equal(m.data.toString('utf8'), JSON_TEXT);
    // Compressed, the reply is a small fraction of the text; uncompressed
    // it could not be smaller than the text.
    assert.ok(m.wire < JSON_TEXT.length / 4, `${m.wire} bytes on the wire for ${JSON_TEXT.length}`);
  }
  const bin = Buffer.alloc(256 * 1024);
  for (let i = 0; i < bin.length; i++) bin[i] = 'wshd binary '.charCodeAt(i % 12) ^ (i % 7 === 0 ? 0xff : 0);
  const b = await echo(ws, bin);
  assert.equal(b.isBinary, true);
  assert.ok(Buffer.from(b.data).equals(bin), 'echoed bytes differ');
  assert.ok(b.wire < bin.length / 4, `${b.wire} bytes on the wire for ${bin.length}`);
  await closeCleanly(ws);
});

test('deflate: messages below the client\'s threshold (sent uncompressed) echo', T, async () => {
  const ws = await connect('/echo_deflate');
  for (const text of ['', 'hi', 'héllo wörld ✓', 'a'.repeat(100), '{"k":1},'.repeat(120)]) {
    assert.ok(Buffer.byteLength(text) < 1024);
    const m = await echo(ws, text);
    assert.equal(m.isBinary, false);
    assert.equal(m.data.toString('utf8'), text);
  }
  const m = await echo(ws, Buffer.from([0, 1, 2, 0xff]));
  assert.equal(m.isBinary, true);
  assert.deepEqual(Buffer.from(m.data), Buffer.from([0, 1, 2, 0xff]));
  await closeCleanly(ws);
});

test('deflate: with threshold 0 the client compresses everything, even empty messages, and they echo', T, async () => {
  const ws = await connect('/echo_deflate', { threshold: 0 });
  assert.equal(ws.extensions, 'permessage-deflate');
  for (const data of ['', 'x', 'héllo ✓', Buffer.alloc(0), Buffer.from([0xff]), 'y'.repeat(5000)]) {
    const m = await echo(ws, data);
    assert.equal(m.isBinary, Buffer.isBuffer(data));
    assert.ok(Buffer.from(m.data).equals(Buffer.from(data)), `echo of ${JSON.stringify(String(data).slice(0, 20))}`);
  }
  // A compressed message in fragments: RSV1 on the first frame only.
  ws.send(JSON_TEXT.slice(0, 5000), { fin: false });
  ws.send(JSON_TEXT.slice(5000, 5001), { fin: false });
  ws.send(JSON_TEXT.slice(5001), { fin: true });
  const m = await nextMessage(ws, 30000);
  assert.equal(m.data.toString('utf8'), JSON_TEXT);
  await closeCleanly(ws);
});

test('deflate: the size limit counts inflated bytes (a zip bomb closes with 1009)', T, async () => {
  const ws = await connect('/echo_deflate');
  // 2 MiB of zeros deflate to about 2 KB; the limit is 1 MiB inflated.
  ws.send(Buffer.alloc(2 * 1024 * 1024));
  const c = await closed(ws, 30000);
  assert.equal(c.code, 1009);
});

test('deflate: not negotiated where compression is off, nor when the client does not offer it', T, async () => {
  for (const [route, offer] of [['/echo', true], ['/chat', true], ['/echo_deflate', false]]) {
    const ws = await connect(route, offer);
    assert.equal(ws.extensions, '', `${route} offer=${offer}`);
    const m = await echo(ws, JSON_TEXT);
    assert.equal(m.data.toString('utf8'), JSON_TEXT);
    assert.ok(m.wire >= JSON_TEXT.length, 'uncompressed on the wire');
    await closeCleanly(ws);
  }
});

test('deflate: one chat room, members with and without compression all get each message', T, async () => {
  const room = '?room=node-deflate-mix';
  const members = [
    await connect(`/chat_deflate${room}`),
    await connect(`/chat_deflate${room}`, { threshold: 0 }),
    await connect(`/chat${room}`),
  ];
  assert.deepEqual(members.map((ws) => ws.extensions !== ''), [true, true, false]);
  for (const [i, sender] of members.entries()) {
    const msg = `${i}:${JSON_TEXT}`;
    sender.send(msg);
    const got = await Promise.all(members.map((ws) => nextMessage(ws, 30000)));
    assert.deepEqual(got.map((m) => m.data.toString('utf8') === msg), [true, true, true]);
  }
  for (const ws of members) await closeCleanly(ws);
});
