// Node `ws` client helpers shared by the tests in test/.

import WebSocket from 'ws';

/**
 * Connect to `url`; resolves once open, rejects on an error or a non-101
 * answer.  Messages are queued from the start (read them with nextMessage)
 * so none is missed between awaits; ws.upgradeHeaders are the 101's headers.
 */
export function openWs(url, protocols = [], opts = {}) {
  return new Promise((resolve, reject) => {
    const ws = new WebSocket(url, protocols, opts);
    ws.inbox = [];
    ws.waiters = [];
    ws.on('message', (data, isBinary) => {
      const m = { data, isBinary };
      const w = ws.waiters.shift();
      if (w) w(m); else ws.inbox.push(m);
    });
    ws.closedPromise = new Promise((r) => ws.once('close', (code, reason) => r({ code, reason: reason.toString() })));
    // The 101's headers, for what ws.extensions (names only) does not show.
    ws.once('upgrade', (res) => { ws.upgradeHeaders = res.headers; });
    ws.errors = [];
    ws.on('error', (err) => { ws.errors.push(err); reject(err); });
    ws.once('open', () => resolve(ws));
    ws.once('unexpected-response', (req, res) => {
      reject(new Error(`unexpected HTTP ${res.statusCode}`));
      req.destroy();
    });
  });
}

export function nextMessage(ws, timeoutMs = 10000) {
  if (ws.inbox.length) return Promise.resolve(ws.inbox.shift());
  return new Promise((resolve, reject) => {
    const t = setTimeout(() => reject(new Error('no message within timeout')), timeoutMs);
    ws.waiters.push((m) => { clearTimeout(t); resolve(m); });
  });
}

export function closed(ws, timeoutMs = 10000) {
  return Promise.race([
    ws.closedPromise,
    new Promise((_, reject) => setTimeout(() => reject(new Error('no close within timeout')), timeoutMs).unref()),
  ]);
}
