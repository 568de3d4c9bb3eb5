// uWebSockets.js peer for the wshd benchmarks (issue #28), from npm as
// `@trufflesuite/uws-js-unofficial` (the official builds are not on the npm
// registry), pinned in package-lock.json under the name uWebSockets.js.
//
//   /echo   returns every message as it came (text stays text, binary stays
//           binary), compression off;
//   /chat   every connection subscribes to one topic, and every message is
//           published to it with uWS's native pub/sub (`app.publish`), so the
//           sender gets its own copy, as on the other peers' /chat.
// Other paths get 404.
//
//   node uws-echo.mjs --host 127.0.0.1 --port 0 --addr-file /tmp/uws.addr
//
// Writes `host:port` to --addr-file (via a rename) once listening, so the
// runner waits for the file instead of sleeping.

import { renameSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { createRequire } from 'node:module';

const require = createRequire(import.meta.url);
const uWS = require('uWebSockets.js');

const { values: options } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'addr-file': { type: 'string' },
  },
});

const TOPIC = 'chat';
const app = uWS.App();

app.ws('/echo', {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  idleTimeout: 0,
  message: (ws, message, isBinary) => {
    ws.send(message, isBinary);
  },
});

app.ws('/chat', {
  compression: uWS.DISABLED,
  maxPayloadLength: 16 * 1024 * 1024,
  idleTimeout: 0,
  // Fan-out rows send to subscribers that read slowly: keep the queue
  // unbounded like the other peers rather than dropping them.
  maxBackpressure: 0,
  open: (ws) => {
    ws.subscribe(TOPIC);
  },
  message: (ws, message, isBinary) => {
    app.publish(TOPIC, message, isBinary);
  },
});

app.any('/*', (res) => {
  res.writeStatus('404 Not Found').end();
});

app.listen(options.host, Number(options.port), (token) => {
  if (!token) {
    console.error(`uws-echo: cannot listen on ${options.host}:${options.port}`);
    process.exit(1);
  }
  const bound = `${options.host}:${uWS.us_socket_local_port(token)}`;
  if (options['addr-file']) {
    const partial = `${options['addr-file']}.partial`;
    writeFileSync(partial, bound);
    renameSync(partial, options['addr-file']);
  }
  console.log(`listening on ${bound}`);
});

for (const signal of ['SIGINT', 'SIGTERM']) {
  process.on(signal, () => process.exit(0));
}
