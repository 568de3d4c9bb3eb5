// wshd over TLS (wss://) with the Node `ws` client, trusting a certificate
// made at test time with the openssl CLI.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import WebSocket from 'ws';
import { startWshd } from '../lib/wshd.mjs';

const T = { timeout: 60000 };
let server;

before(async () => {
  server = await startWshd({ tls: true });
});

after(async () => {
  if (server) await server.stop();
});

test('wss: echo over TLS, the certificate verified against the test CA', T, async () => {
  const ws = new WebSocket(server.wssUrl('/echo'), { ca: server.certPem });
  await once(ws, 'open');
  const got = once(ws, 'message');
  ws.send('hello over wss');
  const [data, isBinary] = await got;
  assert.equal(isBinary, false);
  assert.equal(data.toString('utf8'), 'hello over wss');
  const big = Buffer.alloc(300000, 7);
  const got2 = once(ws, 'message');
  ws.send(big);
  const [data2] = await got2;
  assert.deepEqual(Buffer.from(data2), big);
  ws.close(1000);
  const [code] = await once(ws, 'close');
  assert.equal(code, 1000);
});
