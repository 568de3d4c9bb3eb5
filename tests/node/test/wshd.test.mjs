// wshd against the Node `ws` client.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { once } from 'node:events';
import WebSocket from 'ws';
import { startWshd, configToml, MAX_MESSAGE_SIZE } from '../lib/wshd.mjs';
import { openWs, nextMessage, closed } from '../lib/client.mjs';

const ALLOWED = 'http://allowed.example';
const T = { timeout: 120000 }; // per test, so no runner flag is needed
let server;
let docRoot;

before(async () => {
  docRoot = fs.mkdtempSync(path.join(os.tmpdir(), 'wshd-node-doc-'));
  fs.writeFileSync(path.join(docRoot, 'hello.txt'), 'hello from the doc root\n');
  server = await startWshd({ config: configToml({ allowedOrigins: [ALLOWED] }), docRoot });
});

after(async () => {
  if (server) {
    await server.stop();
    if (process.env.WSHD_TEST_VERBOSE) console.log(server.log());
    server = null;
  }
  if (docRoot) fs.rmSync(docRoot, { recursive: true, force: true });
});

// --- helpers -------------------------------------------------------------

/** Connect to a route of the suite's server (see openWs). */
function connect(route, protocols = [], opts = {}) {
  return openWs(server.wsUrl(route), protocols, opts);
}

/** The HTTP status of a handshake that must fail. */
function handshakeStatus(route, protocols = [], opts = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(server.wsUrl(route), protocols, opts);
    ws.once('unexpected-response', (req, res) => {
      resolve(res.statusCode);
      res.resume();
      req.destroy();
    });
    ws.once('open', () => { ws.terminate(); reject(new Error('handshake unexpectedly succeeded')); });
    ws.on('error', (err) => {
      // After unexpected-response ws may emit an error for the aborted request; ignore it then.
      if (!/aborted|socket hang up/i.test(String(err))) reject(err);
    });
  });
}

function httpRequest(method, urlPath, headers = {}) {
  return new Promise((resolve, reject) => {
    const req = http.request(`${server.httpUrl}${urlPath}`, { method, headers }, (res) => {
      let body = '';
      res.setEncoding('utf8').on('data', (c) => { body += c; });
      res.on('end', () => resolve({ status: res.statusCode, headers: res.headers, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

async function closeQuietly(ws) {
  if (ws.readyState === WebSocket.OPEN) {
    ws.close(1000);
    await closed(ws).catch(() => ws.terminate());
  }
}

// --- /echo ---------------------------------------------------------------

test('echo: text and binary round trip', T, async () => {
  const ws = await connect('/echo');
  ws.send('héllo wörld ✓');
  let m = await nextMessage(ws);
  assert.equal(m.isBinary, false);
  assert.equal(m.data.toString('utf8'), 'héllo wörld ✓');

  const bytes = Buffer.from([0, 1, 2, 0xfe, 0xff, 0x80, 0x7f]);
  ws.send(bytes);
  m = await nextMessage(ws);
  assert.equal(m.isBinary, true);
  assert.deepEqual(Buffer.from(m.data), bytes);

  ws.send('');
  m = await nextMessage(ws);
  assert.equal(m.isBinary, false);
  assert.equal(m.data.length, 0);
  await closeQuietly(ws);
});

test('echo: a message of exactly the configured maximum is echoed', T, async () => {
  const ws = await connect('/echo');
  const big = Buffer.alloc(MAX_MESSAGE_SIZE);
  for (let i = 0; i < big.length; i++) big[i] = (i * 31 + 7) & 0xff;
  ws.send(big);
  const m = await nextMessage(ws, 30000);
  assert.equal(m.isBinary, true);
  assert.equal(m.data.length, MAX_MESSAGE_SIZE);
  assert.ok(Buffer.from(m.data).equals(big), 'echoed bytes differ');

  const text = 'x'.repeat(MAX_MESSAGE_SIZE);
  ws.send(text);
  const t = await nextMessage(ws, 30000);
  assert.equal(t.isBinary, false);
  assert.equal(t.data.length, MAX_MESSAGE_SIZE);
  await closeQuietly(ws);
});

test('echo: one byte over the maximum closes with 1009', T, async () => {
  const ws = await connect('/echo');
  ws.send(Buffer.alloc(MAX_MESSAGE_SIZE + 1, 0x61));
  const c = await closed(ws, 30000);
  assert.equal(c.code, 1009);
});

test('echo: a fragmented message is reassembled', T, async () => {
  const ws = await connect('/echo');
  ws.send('Hel', { fin: false });
  ws.send('lo, ', { fin: false });
  ws.send('fragments', { fin: true });
  let m = await nextMessage(ws);
  assert.equal(m.isBinary, false);
  assert.equal(m.data.toString(), 'Hello, fragments');

  ws.send(Buffer.from([1, 2]), { binary: true, fin: false });
  ws.send(Buffer.from([3]), { binary: true, fin: false });
  ws.send(Buffer.from([4, 5]), { binary: true, fin: true });
  m = await nextMessage(ws);
  assert.equal(m.isBinary, true);
  assert.deepEqual([...m.data], [1, 2, 3, 4, 5]);
  await closeQuietly(ws);
});

test('echo: fragments adding up to more than the maximum close with 1009', T, async () => {
  const ws = await connect('/echo');
  const half = Buffer.alloc(MAX_MESSAGE_SIZE / 2, 0x62);
  ws.send(half, { binary: true, fin: false });
  ws.send(half, { binary: true, fin: false });
  ws.send(Buffer.from([0x63]), { binary: true, fin: true });
  const c = await closed(ws, 30000);
  assert.equal(c.code, 1009);
});

test('echo: ping is answered with a pong carrying the same payload', T, async () => {
  const ws = await connect('/echo');
  const pong = once(ws, 'pong');
  ws.ping(Buffer.from('ping-42'));
  const [data] = await pong;
  assert.equal(data.toString(), 'ping-42');
  await closeQuietly(ws);
});

test('echo: "Goodbye" is echoed, then the server closes with 1000', T, async () => {
  const ws = await connect('/echo');
  ws.send('Goodbye');
  const m = await nextMessage(ws);
  assert.equal(m.data.toString(), 'Goodbye');
  const c = await closed(ws);
  assert.equal(c.code, 1000);
});

test('echo: a client close 4000 with a reason gets the server\'s close reply', T, async () => {
  const ws = await connect('/echo');
  ws.close(4000, 'client says bye');
  const c = await closed(ws);
  // RFC 6455 5.5.1: the reply typically echoes the status code received.
  assert.equal(c.code, 4000);
});

// --- /chat ---------------------------------------------------------------

test('chat: a message reaches every connection, sender included', T, async () => {
  const a = await connect('/chat');
  const b = await connect('/chat');
  a.send('hi from a');
  const [ma, mb] = await Promise.all([nextMessage(a), nextMessage(b)]);
  assert.equal(ma.data.toString(), 'hi from a');
  assert.equal(mb.data.toString(), 'hi from a');
  await Promise.all([closeQuietly(a), closeQuietly(b)]);
});

// --- /origin_check -------------------------------------------------------

test('origin_check: the server\'s preferred offered subprotocol is chosen', T, async () => {
  let ws = await connect('/origin_check', ['chat.v1', 'chat.v2'], { origin: ALLOWED });
  assert.equal(ws.protocol, 'chat.v2');
  await closeQuietly(ws);

  ws = await connect('/origin_check', ['x.unknown', 'chat.v1'], { origin: ALLOWED });
  assert.equal(ws.protocol, 'chat.v1');
  await closeQuietly(ws);
});

test('origin_check: an offer with no supported subprotocol is refused with 400', T, async () => {
  assert.equal(await handshakeStatus('/origin_check', ['chat.v3'], { origin: ALLOWED }), 400);
});

test('origin_check: a disallowed or missing Origin is refused with 403', T, async () => {
  assert.equal(await handshakeStatus('/origin_check', ['chat.v1'], { origin: 'http://evil.example' }), 403);
  assert.equal(await handshakeStatus('/origin_check', ['chat.v1']), 403);
});

// --- HTTP side -----------------------------------------------------------

test('http: unknown WebSocket path is 404', T, async () => {
  assert.equal(await handshakeStatus('/no-such-route'), 404);
});

test('http: a plain GET on a handler path is 426', T, async () => {
  const r = await httpRequest('GET', '/echo');
  assert.equal(r.status, 426);
});

test('http: static files from the doc root; 404 for a missing one', T, async () => {
  const r = await httpRequest('GET', '/hello.txt');
  assert.equal(r.status, 200);
  assert.equal(r.body, 'hello from the doc root\n');
  const h = await httpRequest('HEAD', '/hello.txt');
  assert.equal(h.status, 200);
  assert.equal(h.body, '');
  const missing = await httpRequest('GET', '/missing.txt');
  assert.equal(missing.status, 404);
});
