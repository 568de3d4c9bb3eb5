// The www/ pages in Debian's chromium (playwright-core), served by a real wshd.
//
// Env: CHROMIUM (default /usr/bin/chromium); WSHD_BIN / WSHD_TARGET_DIR as in tests/node.
// A missing browser fails the run.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import crypto from 'node:crypto';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import net from 'node:net';
import { spawn } from 'node:child_process';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { chromium } from 'playwright-core';
import { startWshd, configToml, REPO_ROOT } from '../node/lib/wshd.mjs';

const HERE = path.dirname(fileURLToPath(import.meta.url));
const WWW = path.join(REPO_ROOT, 'www');
const ARTIFACTS = path.join(HERE, 'artifacts');
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const WAIT = 15000;

let site;      // serves www/ (and the handlers with the default config)
let guarded;   // /origin_check allowing only the origin of `site`
let context;
let profileDir;
const pageErrors = [];

before(async () => {
  if (!fs.existsSync(CHROMIUM)) {
    throw new Error(`browser not found at ${CHROMIUM}: apt-get install -y chromium (or set CHROMIUM)`);
  }
  site = await startWshd({ docRoot: WWW });
  guarded = await startWshd({
    config: configToml({ allowedOrigins: [site.httpUrl], subprotocols: ['chat.v2', 'chat.v1'] }),
  });
  profileDir = fs.mkdtempSync(path.join(os.tmpdir(), 'wshd-chromium-'));
  context = await chromium.launchPersistentContext(profileDir, {
    executablePath: CHROMIUM,
    headless: true,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync'],
    viewport: { width: 1100, height: 900 },
    timeout: 60000,
  });
});

after(async () => {
  if (context) await context.close().catch(() => {});
  if (site) await site.stop();
  if (guarded) await guarded.stop();
  if (profileDir) fs.rmSync(profileDir, { recursive: true, force: true });
});

async function newPage() {
  const page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(String(err)));
  return page;
}

function assertNoPageErrors() {
  assert.deepEqual(pageErrors, [], 'JavaScript errors in the pages');
}

const logEntries = (page, dir) => page.locator(`#log li[data-dir="${dir}"] .body`);

async function openConsole(route = '/echo') {
  const page = await newPage();
  const resp = await page.goto(`${site.httpUrl}/index.html`);
  assert.equal(resp.status(), 200);
  if (route !== '/echo') await page.fill('#route', route);
  return page;
}

async function connectConsole(page) {
  await page.click('#connect');
  await page.locator('#ready-state').filter({ hasText: '1 OPEN' }).waitFor({ timeout: WAIT });
}

async function sendFromConsole(page, mode, text) {
  await page.selectOption('#send-mode', mode);
  await page.fill('#message', text);
  await page.click('#send');
}

test('console: echo text and binary, then Goodbye closes with 1000', async () => {
  const page = await openConsole();
  assert.equal(await page.inputValue('#url'), site.wsUrl('/echo'));
  await connectConsole(page);
  assert.equal(await page.textContent('#protocol'), '(none)');

  await sendFromConsole(page, 'text', 'hello from chromium');
  await logEntries(page, 'received').filter({ hasText: 'text (19 bytes): hello from chromium' }).waitFor({ timeout: WAIT });

  await sendFromConsole(page, 'hex', 'de ad be ef 00');
  await logEntries(page, 'received').filter({ hasText: 'binary (5 bytes): de ad be ef 00' }).waitFor({ timeout: WAIT });

  await sendFromConsole(page, 'utf8', 'AB');
  await logEntries(page, 'received').filter({ hasText: 'binary (2 bytes): 41 42' }).waitFor({ timeout: WAIT });

  // Bad hex is refused by the page, not sent.
  const sentBefore = await logEntries(page, 'sent').count();
  await sendFromConsole(page, 'hex', 'xyz');
  await page.locator('#log li.error').filter({ hasText: 'not sent' }).waitFor({ timeout: WAIT });
  assert.equal(await logEntries(page, 'sent').count(), sentBefore);

  // A payload that would be markup stays text.
  const markup = '<img src=x onerror="window.__xss=1"><b>bold</b>';
  await sendFromConsole(page, 'text', markup);
  await logEntries(page, 'received').filter({ hasText: markup }).waitFor({ timeout: WAIT });
  assert.equal(await page.locator('#log img, #log b').count(), 0);
  assert.equal(await page.evaluate(() => window.__xss), undefined);
  // Updated live: it drops back to 0 once the browser has written everything.
  await page.locator('#buffered-amount').filter({ hasText: /^0$/ }).waitFor({ timeout: WAIT });

  await sendFromConsole(page, 'text', 'Goodbye');
  await page.locator('#close-code-shown').filter({ hasText: /^1000$/ }).waitFor({ timeout: WAIT });
  assert.equal(await page.textContent('#close-was-clean'), 'true');
  assert.match(await page.textContent('#ready-state'), /3 CLOSED/);
  await logEntries(page, 'event').filter({ hasText: 'close code=1000' }).waitFor({ timeout: WAIT });
  assertNoPageErrors();
  await page.close();
});

test('console: a client close with code 4000 and a reason', async () => {
  const page = await openConsole();
  await connectConsole(page);
  // A code the browser may not send is refused by the page, and the connection stays open.
  await page.fill('#close-code', '999');
  await page.click('#close');
  await page.locator('#log li.error').filter({ hasText: 'close refused by the browser' }).waitFor({ timeout: WAIT });
  assert.match(await page.textContent('#ready-state'), /1 OPEN/);
  await page.fill('#close-code', '4000');
  await page.fill('#close-reason', 'done here');
  await page.click('#close');
  await page.locator('#ready-state').filter({ hasText: '3 CLOSED' }).waitFor({ timeout: WAIT });
  assert.equal(await page.textContent('#close-code-shown'), '4000');
  assert.equal(await page.textContent('#close-was-clean'), 'true');
  assertNoPageErrors();
  await page.close();
});

test('chat page: a message fans out to two pages', async () => {
  const alice = await newPage();
  const bob = await newPage();
  await alice.goto(`${site.httpUrl}/chat.html?name=alice`);
  await bob.goto(`${site.httpUrl}/chat.html?name=bob`);
  for (const p of [alice, bob]) {
    await p.locator('#status[data-state="open"]').waitFor({ timeout: WAIT });
  }
  await alice.fill('#text', 'hi bob <i>not markup</i>');
  await alice.press('#text', 'Enter');
  for (const p of [alice, bob]) {
    const line = p.locator('#messages li').filter({ hasText: 'hi bob <i>not markup</i>' });
    await line.waitFor({ timeout: WAIT });
    assert.equal(await line.locator('.name').textContent(), 'alice:');
    assert.equal(await p.locator('#messages i').count(), 0);
  }
  await bob.fill('#text', 'hello alice');
  await bob.click('#send');
  await alice.locator('#messages li').filter({ hasText: 'bob:hello alice' }).waitFor({ timeout: WAIT });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  await alice.screenshot({ path: path.join(ARTIFACTS, 'chat.png') });
  assertNoPageErrors();
  await alice.close();
  await bob.close();
});

test('chat page: a reload of chat between two pages does not split the room', async () => {
  // A server of its own: this one gets a new chat version mid-test.
  const server = await startWshd({ docRoot: WWW });
  const alice = await newPage();
  const bob = await newPage();
  try {
    await alice.goto(`${server.httpUrl}/chat.html?name=alice`);
    await alice.locator('#status[data-state="open"]').waitFor({ timeout: WAIT });
    // A new libchat_wsh.so (same code, another hash) is installed the way an
    // operator would: written aside, renamed into place.
    const so = path.join(server.handlerDir, 'libchat_wsh.so');
    const tmp = path.join(server.handlerDir, '.libchat_wsh.so.new');
    fs.writeFileSync(tmp, Buffer.concat([fs.readFileSync(so), Buffer.alloc(64, 7)]));
    fs.renameSync(tmp, so);
    const deadline = Date.now() + WAIT;
    while (!server.log().includes('swapped')) {
      assert.ok(Date.now() < deadline, `chat was never reloaded:\n${server.log()}`);
      await new Promise((r) => setTimeout(r, 20));
    }
    // Bob joins through the new version; alice is still on the old one.
    await bob.goto(`${server.httpUrl}/chat.html?name=bob`);
    await bob.locator('#status[data-state="open"]').waitFor({ timeout: WAIT });
    await alice.fill('#text', 'from the old version');
    await alice.press('#text', 'Enter');
    await bob.locator('#messages li').filter({ hasText: 'alice:from the old version' }).waitFor({ timeout: WAIT });
    await bob.fill('#text', 'from the new version');
    await bob.press('#text', 'Enter');
    await alice.locator('#messages li').filter({ hasText: 'bob:from the new version' }).waitFor({ timeout: WAIT });
    // Alice's page saw bob join, as a join event.
    await alice.locator('#messages li.notice').filter({ hasText: 'joined (2 in the room)' }).waitFor({ timeout: WAIT });
    assertNoPageErrors();
  } finally {
    await alice.close();
    await bob.close();
    await server.stop();
  }
});

/** A free loopback port (bound, read, released). */
function freePort() {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const { port } = srv.address();
      srv.close(() => resolve(port));
    });
  });
}

/** Resolves once something accepts connections on `port`. */
async function waitPort(port, what) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    const ok = await new Promise((resolve) => {
      const s = net.connect(port, '127.0.0.1');
      s.once('connect', () => { s.destroy(); resolve(true); });
      s.once('error', () => resolve(false));
    });
    if (ok) return;
    assert.ok(Date.now() < deadline, `${what} never listened on ${port}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

async function waitLog(server, needle) {
  const deadline = Date.now() + WAIT;
  while (!server.log().includes(needle)) {
    assert.ok(Date.now() < deadline, `log never showed ${needle}:\n${server.log()}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/**
 * Sends `text` from `from` until `to` shows it: the first tries may go out
 * before `to`'s node has subscribed to the room's Redis channel (cross-node
 * delivery is at most once, with no replay).
 */
async function sendUntilSeen(from, to, text, seenAs) {
  const deadline = Date.now() + WAIT;
  for (;;) {
    await from.fill('#text', text);
    await from.press('#text', 'Enter');
    const line = to.locator('#messages li').filter({ hasText: seenAs });
    try {
      await line.first().waitFor({ timeout: 300 });
      return;
    } catch {
      assert.ok(Date.now() < deadline, `${seenAs} never reached the other node`);
    }
  }
}

test('chat page: two pages on two wshd nodes sharing one Redis chat with each other', async () => {
  // A Redis of its own on a free port, stopped by PID.
  const port = await freePort();
  const redis = spawn('redis-server', ['--port', String(port), '--bind', '127.0.0.1', '--save', '',
    '--appendonly', 'no'], { stdio: 'ignore' });
  const nodes = [];
  const pages = [];
  try {
    await waitPort(port, 'redis-server');
    for (const id of ['b1', 'b2']) {
      const config = configToml() + `\n[cluster]\nredis = "redis://127.0.0.1:${port}"\nnode_id = "${id}"\n`;
      const node = await startWshd({ config, docRoot: WWW });
      nodes.push(node);
      await waitLog(node, 'cross-node delivery is up');
    }
    const [alice, bob] = [await newPage(), await newPage()];
    pages.push(alice, bob);
    await alice.goto(`${nodes[0].httpUrl}/chat.html?name=alice&room=cluster`);
    await bob.goto(`${nodes[1].httpUrl}/chat.html?name=bob&room=cluster`);
    for (const p of pages) {
      await p.locator('#status[data-state="open"]').waitFor({ timeout: WAIT });
    }
    assert.notEqual(nodes[0].port, nodes[1].port);
    await sendUntilSeen(alice, bob, 'hi bob, from node 1', 'alice:hi bob, from node 1');
    await sendUntilSeen(bob, alice, 'hello alice, from node 2', 'bob:hello alice, from node 2');
    fs.mkdirSync(ARTIFACTS, { recursive: true });
    await bob.screenshot({ path: path.join(ARTIFACTS, 'chat-cluster.png') });
    assertNoPageErrors();
  } finally {
    for (const p of pages) await p.close();
    for (const n of nodes) await n.stop();
    redis.kill('SIGKILL');
  }
});

test('console: /origin_check with an unsupported subprotocol shows error and close 1006', async () => {
  const page = await openConsole('/origin_check');
  // The page's origin (site) is allowed by `guarded`; only the subprotocol is wrong.
  await page.fill('#url', guarded.wsUrl('/origin_check'));
  await page.fill('#protocols', 'chat.v1, chat.v2');
  await connectConsole(page);
  assert.equal(await page.textContent('#protocol'), 'chat.v2');
  await page.click('#disconnect');
  await page.locator('#ready-state').filter({ hasText: '3 CLOSED' }).waitFor({ timeout: WAIT });

  await page.click('#clear-log');
  await page.fill('#protocols', 'chat.v9');
  await page.click('#connect');
  await page.locator('#close-code-shown').filter({ hasText: /^1006$/ }).waitFor({ timeout: WAIT });
  assert.equal(await page.textContent('#close-was-clean'), 'false');
  await logEntries(page, 'event').filter({ hasText: /^error/ }).waitFor({ timeout: WAIT });
  await logEntries(page, 'event').filter({ hasText: 'close code=1006' }).waitFor({ timeout: WAIT });
  assertNoPageErrors();
  await page.close();
});

test('console: a malformed URL is reported, not thrown', async () => {
  const page = await openConsole();
  await page.fill('#url', 'ftp://127.0.0.1/echo');
  await page.click('#connect');
  await page.locator('#log li.error').filter({ hasText: 'cannot connect' }).waitFor({ timeout: WAIT });
  assertNoPageErrors();
  await page.close();
});

test('console: opened from file:// it proposes a local URL', async () => {
  const page = await newPage();
  await page.goto(pathToFileURL(path.join(WWW, 'index.html')).href);
  assert.match(await page.inputValue('#url'), /^ws:\/\/127\.0\.0\.1:\d+\/echo$/);
  await page.fill('#route', '/chat');
  assert.match(await page.inputValue('#url'), /^ws:\/\/127\.0\.0\.1:\d+\/chat$/);
  assertNoPageErrors();
  await page.close();
});

test('console: screenshot after a session', async () => {
  const page = await openConsole();
  await page.fill('#protocols', '');
  await connectConsole(page);
  await sendFromConsole(page, 'text', 'Hello, wshd!');
  await logEntries(page, 'received').filter({ hasText: 'Hello, wshd!' }).waitFor({ timeout: WAIT });
  await sendFromConsole(page, 'hex', '00 01 02 fe ff');
  await logEntries(page, 'received').filter({ hasText: '00 01 02 fe ff' }).waitFor({ timeout: WAIT });
  await sendFromConsole(page, 'text', 'Goodbye');
  await page.locator('#close-code-shown').filter({ hasText: /^1000$/ }).waitFor({ timeout: WAIT });
  fs.mkdirSync(ARTIFACTS, { recursive: true });
  const file = path.join(ARTIFACTS, 'console.png');
  await page.screenshot({ path: file, fullPage: true });
  assert.ok(fs.statSync(file).size > 1000, 'screenshot is suspiciously small');
  assertNoPageErrors();
  await page.close();
});

// --- wss:// -----------------------------------------------------------------

test('wss: a page served over https echoes through wss://', async () => {
  // Its own wshd (TLS, certificate made at test time) and its own browser
  // profile: only this profile ignores certificate errors.
  const tls = await startWshd({ docRoot: WWW, tls: true });
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wshd-chromium-tls-'));
  let ctx;
  try {
    ctx = await chromium.launchPersistentContext(dir, {
      executablePath: CHROMIUM,
      headless: true,
      args: ['--headless', '--no-sandbox', '--disable-gpu', '--no-first-run', '--disable-background-networking',
        '--disable-component-update', '--disable-sync', '--ignore-certificate-errors'],
      timeout: 60000,
    });
    const page = await ctx.newPage();
    const resp = await page.goto(`https://localhost:${tls.port}/index.html`);
    assert.equal(resp.status(), 200);
    const echoed = await page.evaluate(async (url) => {
      const ws = new WebSocket(url);
      await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error('ws error')); });
      const got = new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
      ws.send('hello over wss from chromium');
      const data = await got;
      ws.close(1000);
      return data;
    }, `wss://localhost:${tls.port}/echo`);
    assert.equal(echoed, 'hello over wss from chromium');
  } finally {
    if (ctx) await ctx.close().catch(() => {});
    await tls.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});

/**
 * A TCP relay to `port` that counts the bytes each way, per connection:
 * what the compression tests read to see the extension in effect on the wire.
 * Resolves to { port, conns: [{ up, down }], close() }.
 */
function countingRelay(port) {
  const conns = [];
  const sockets = new Set();
  const relay = net.createServer((client) => {
    const c = { up: 0, down: 0 };
    conns.push(c);
    const upstream = net.connect(port, '127.0.0.1');
    for (const s of [client, upstream]) {
      sockets.add(s);
      s.once('close', () => sockets.delete(s));
      s.on('error', () => { client.destroy(); upstream.destroy(); });
    }
    client.on('data', (d) => { c.up += d.length; });
    upstream.on('data', (d) => { c.down += d.length; });
    client.pipe(upstream);
    upstream.pipe(client);
  });
  return new Promise((resolve, reject) => {
    relay.once('error', reject);
    relay.listen(0, '127.0.0.1', () => resolve({
      port: relay.address().port,
      conns,
      close: () => new Promise((r) => {
        for (const s of sockets) s.destroy();
        relay.close(() => r());
      }),
    }));
  });
}

test('permessage-deflate: Chromium negotiates it where compression = "on", compresses both ways, and not elsewhere', async () => {
  const config = configToml() + '\n[[route]]\npath = "/echo_deflate"\nhandler = "echo"\ncompression = "on"\n';
  const server = await startWshd({ config, docRoot: WWW });
  const relay = await countingRelay(server.port);
  try {
    const page = await newPage();
    await page.goto(`${server.httpUrl}/index.html`);
    // In the page: connect, echo one large compressible text, close cleanly.
    const echoThrough = (url) => page.evaluate(async (url) => {
      const ws = new WebSocket(url);
      await new Promise((resolve, reject) => { ws.onopen = resolve; ws.onerror = () => reject(new Error('ws error')); });
      const text = JSON.stringify(Array.from({ length: 6000 }, (_, i) => ({ id: i, name: `user${i}`, role: 'member' })));
      const echo = new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
      ws.send(text);
      const back = await echo;
      const closed = new Promise((resolve) => { ws.onclose = (e) => resolve(e.code); });
      ws.close(1000);
      return { extensions: ws.extensions, same: back === text, length: text.length, closeCode: await closed };
    }, url);
    const relayed = (route) => `ws://127.0.0.1:${relay.port}${route}`;

    const on = await echoThrough(relayed('/echo_deflate'));
    assert.match(on.extensions, /^permessage-deflate/, `extensions: ${on.extensions}`);
    assert.ok(on.same, 'the compressed echo came back unchanged');
    assert.equal(on.closeCode, 1000);
    assert.ok(on.length > 200000);
    // The text crossed the wire compressed both ways: Chromium's message
    // and wshd's echo are each a fraction of it.
    const [c1] = relay.conns;
    assert.ok(c1.up < on.length / 4 && c1.down < on.length / 4,
      `bytes on the wire up ${c1.up}, down ${c1.down} for a ${on.length}-byte text`);

    const off = await echoThrough(relayed('/echo'));
    assert.equal(off.extensions, '', 'no extension where compression is off');
    assert.ok(off.same, 'the plain echo came back unchanged');
    const c2 = relay.conns[1];
    assert.ok(c2.up >= off.length && c2.down >= off.length, `up ${c2.up}, down ${c2.down}: uncompressed`);
    assert.equal(relay.conns.length, 2);
    await page.close();
  } finally {
    await relay.close();
    await server.stop();
  }
  assertNoPageErrors();
});

/** An HS256 JWT, made the way an auth service would (node:crypto). */
function hs256(claims, secret) {
  const b64 = (b) => Buffer.from(b).toString('base64url');
  const head = b64(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64(JSON.stringify(claims));
  const sig = crypto.createHmac('sha256', secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

test('[route.auth]: a page connects with ?token=, a bad token is refused, and the page refreshes the token in band', async () => {
  const secret = 'browser-suite-shared-secret-of-48-bytes-or-so!!';
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'wshd-auth-'));
  const secretFile = path.join(dir, 'jwt.secret');
  fs.writeFileSync(secretFile, secret);
  const server = await startWshd({
    docRoot: WWW,
    config: `[[route]]\npath = "/secure"\nhandler = "echo"\n[route.auth]\njwt_hs256_secret_file = "${secretFile}"\n`,
  });
  try {
    const page = await newPage();
    assert.equal((await page.goto(`${server.httpUrl}/index.html`)).status(), 200);
    const now = Math.floor(Date.now() / 1000);
    const good = hs256({ sub: 'pat', exp: now + 600 }, secret);
    const forged = hs256({ sub: 'pat', exp: now + 600 }, 'x'.repeat(48));
    const fresh = hs256({ sub: 'pat', exp: now + 7200 }, secret);
    const result = await page.evaluate(async ({ base, good, forged, fresh }) => {
      const open = (url) => new Promise((resolve) => {
        const ws = new WebSocket(url);
        ws.onopen = () => resolve({ ws, open: true });
        ws.onclose = (e) => resolve({ ws, open: false, code: e.code });
      });
      const next = (ws) => new Promise((resolve) => { ws.onmessage = (e) => resolve(e.data); });
      const refused = await open(`${base}?token=${forged}`);
      const missing = await open(base);
      const ok = await open(`${base}?token=${good}`);
      let echoed = null;
      let refreshed = null;
      if (ok.open) {
        const got = next(ok.ws);
        ok.ws.send('hello with a token');
        echoed = await got;
        const answer = next(ok.ws);
        ok.ws.send(JSON.stringify({ wshd: 'refresh', token: fresh }));
        refreshed = JSON.parse(await answer);
        ok.ws.close(1000);
      }
      return {
        refused: [refused.open, refused.code], missing: [missing.open, missing.code],
        open: ok.open, echoed, refreshed,
      };
    }, { base: server.wsUrl('/secure'), good, forged, fresh });
    // A refused handshake is a failed connection to the page (1006).
    assert.deepEqual(result.refused, [false, 1006]);
    assert.deepEqual(result.missing, [false, 1006]);
    assert.equal(result.open, true);
    assert.equal(result.echoed, 'hello with a token');
    assert.deepEqual(result.refreshed, { wshd: 'refreshed', exp: now + 7200 });
    const log = server.log();
    assert.match(log, /handshake refused: 401, bad signature/);
    assert.match(log, /handshake refused: 401, no token/);
    assert.ok(!log.includes(good.split('.')[2]), 'a token reached the log');
    assertNoPageErrors();
  } finally {
    await server.stop();
    fs.rmSync(dir, { recursive: true, force: true });
  }
});
