// Starts a real wshd for a test file and stops it afterwards.
//
// Used by tests/node and tests/browser.  Only Node built-ins here.
//
//   WSHD_BIN         the server binary   (default target/debug/wshd)
//   WSHD_TARGET_DIR  where the handler .so files are (default target/debug)
// Relative values are taken from the repository root.

import { spawn, execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

export const REPO_ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
export const HANDLERS = ['libecho_wsh.so', 'libchat_wsh.so', 'liborigin_check_wsh.so'];
export const MAX_MESSAGE_SIZE = 1024 * 1024;

function fromRoot(p) {
  return path.isAbsolute(p) ? p : path.join(REPO_ROOT, p);
}

/** The config file text: one place to follow the server's config format. */
export function configToml({ maxMessageSize = '1MiB', allowedOrigins = ['http://allowed.example'],
  subprotocols = ['chat.v2', 'chat.v1'] } = {}) {
  const list = (xs) => '[' + xs.map((x) => JSON.stringify(x)).join(', ') + ']';
  return [
    '[limits]',
    `max_message_size = ${JSON.stringify(maxMessageSize)}`,
    '',
    '[[route]]',
    'path = "/origin_check"',
    'handler = "origin_check"',
    '[route.config]',
    `allowed_origins = ${list(allowedOrigins)}`,
    `subprotocols = ${list(subprotocols)}`,
    '',
  ].join('\n');
}

/**
 * A self-signed certificate for localhost and 127.0.0.1, made now with the
 * openssl CLI in `dir`.  Returns { certPath, keyPath, certPem }.
 */
export function makeCert(dir) {
  const certPath = path.join(dir, 'cert.pem');
  const keyPath = path.join(dir, 'key.pem');
  execFileSync('openssl', ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1',
    '-nodes', '-keyout', keyPath, '-out', certPath, '-days', '2', '-subj', '/CN=localhost',
    '-addext', 'subjectAltName=DNS:localhost,IP:127.0.0.1'], { stdio: 'ignore' });
  return { certPath, keyPath, certPem: fs.readFileSync(certPath, 'utf8') };
}

const running = new Set();
process.on('exit', () => {
  for (const child of running) {
    try { child.kill('SIGKILL'); } catch { /* already gone */ }
  }
});

/**
 * Start wshd.  Resolves to { port, host, httpUrl, wsUrl(route), stop(), log(), handlerDir }.
 * Options: config (TOML text, default configToml()), docRoot, timeoutMs, tls
 * (serve wss:// with a certificate made by makeCert; the result then also
 * has certPem and wssUrl(route), which names localhost as the certificate
 * does).
 */
export async function startWshd({ config = configToml(), docRoot = null, timeoutMs = 30000, tls = false } = {}) {
  const bin = fromRoot(process.env.WSHD_BIN || 'target/debug/wshd');
  const targetDir = fromRoot(process.env.WSHD_TARGET_DIR || 'target/debug');
  if (!fs.existsSync(bin)) throw new Error(`wshd binary not found: ${bin} (build it, or set WSHD_BIN)`);

  const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'wshd-test-'));
  const handlerDir = path.join(tmp, 'handlers');
  fs.mkdirSync(handlerDir);
  for (const so of HANDLERS) {
    const src = path.join(targetDir, so);
    if (!fs.existsSync(src)) {
      fs.rmSync(tmp, { recursive: true, force: true });
      throw new Error(`handler not found: ${src} (build the handlers, or set WSHD_TARGET_DIR)`);
    }
    fs.copyFileSync(src, path.join(handlerDir, so));
  }
  const configPath = path.join(tmp, 'wshd.toml');
  fs.writeFileSync(configPath, config);
  const addrFile = path.join(tmp, 'addr');

  const args = ['-H', '127.0.0.1', '-p', '0', '-w', handlerDir, '--config', configPath,
    '--addr-file', addrFile, '--log-level', 'info'];
  if (docRoot) args.push('-d', docRoot);
  const cert = tls ? makeCert(tmp) : null;
  if (cert) args.push('--tls-cert', cert.certPath, '--tls-key', cert.keyPath);

  let output = '';
  const child = spawn(bin, args, { stdio: ['ignore', 'pipe', 'pipe'] });
  running.add(child);
  const keep = (chunk) => {
    output += chunk;
    if (output.length > 1 << 20) output = output.slice(-(1 << 19));
  };
  child.stdout.setEncoding('utf8').on('data', keep);
  child.stderr.setEncoding('utf8').on('data', keep);
  let exited = null;
  const exitPromise = new Promise((resolve) => {
    child.on('exit', (code, signal) => {
      exited = { code, signal };
      running.delete(child);
      resolve(exited);
    });
    child.on('error', (err) => {
      exited = { code: null, signal: null, error: err };
      running.delete(child);
      resolve(exited);
    });
  });

  async function stop() {
    if (!exited) {
      child.kill('SIGTERM');
      const t = setTimeout(() => { if (!exited) child.kill('SIGKILL'); }, 5000);
      await exitPromise;
      clearTimeout(t);
    }
    fs.rmSync(tmp, { recursive: true, force: true });
    return exited;
  }

  // Wait for the address file (poll; a partly written file has no newline yet).
  const deadline = Date.now() + timeoutMs;
  let addr = null;
  while (!addr) {
    if (exited) {
      await stop();
      throw new Error(`wshd exited before listening (${JSON.stringify(exited)}); output:\n${output}`);
    }
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`wshd did not write ${addrFile} within ${timeoutMs} ms; output:\n${output}`);
    }
    try {
      const text = fs.readFileSync(addrFile, 'utf8');
      if (text.endsWith('\n')) addr = text.trim();
    } catch { /* not there yet */ }
    if (!addr) await new Promise((r) => setTimeout(r, 20));
  }
  const m = /^(.*):(\d+)$/.exec(addr);
  if (!m) {
    await stop();
    throw new Error(`unexpected address file content: ${JSON.stringify(addr)}`);
  }
  const host = m[1].replace(/^\[|\]$/g, '');
  const port = Number(m[2]);
  const hostPort = host.includes(':') ? `[${host}]:${port}` : `${host}:${port}`;
  return {
    host,
    port,
    httpUrl: `http://${hostPort}`,
    wsUrl: (route) => `ws://${hostPort}${route}`,
    wssUrl: (route) => `wss://localhost:${port}${route}`,
    certPem: cert ? cert.certPem : null,
    stop,
    log: () => output,
    exited: () => exited,
    handlerDir,
  };
}
