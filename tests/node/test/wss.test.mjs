// wshd over TLS (wss://) with the Node `ws` client, trusting a certificate
// made at test time with the openssl CLI.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { once } from 'node:events';
import WebSocket from 'ws';
import { startWshd, configToml } from '../lib/wshd.mjs';
import { openWs, nextMessage, closed } from '../lib/client.mjs';

const T = { timeout: 60000 };
let server;

before(async () => {
  // /echo_deflate: compressed frames through the TLS writer too.
  const config = configToml() + '\n[[route]]\npath = "/echo_deflate"\nhandler = "echo"\ncompression = "on"\n';
  server = await startWshd({ tls: true, config });
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

test('wss: permessage-deflate over TLS echoes large compressible messages', T, async () => {
  const ws = await openWs(server.wssUrl('/echo_deflate'), [], { ca: server.certPem, perMessageDeflate: true });
  assert.equal(ws.extensions, 'permessage-deflate');
  const text = JSON.stringify(Array.from({ length: 5000 }, (_, i) => ({ id: i, name: `user${i}` })));
  const bin = Buffer.from('wshd over tls '.repeat(20000));
  for (const data of [text, bin, 'small', text]) {
    ws.send(data);
    const m = await nextMessage(ws, 30000);
    assert.equal(m.isBinary, Buffer.isBuffer(data));
    assert.ok(Buffer.from(m.data).equals(Buffer.from(data)), 'echo differs');
  }
  ws.close(1000);
  assert.equal((await closed(ws)).code, 1000);
});
