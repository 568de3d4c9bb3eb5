// Node `ws` peer for the wshd benchmarks: /echo returns every message as it
// came (text stays text, binary stays binary); /chat broadcasts every message
// to every /chat connection, the sender included. /echo-deflate echoes like
// /echo with permessage-deflate on, as `ws` ships it (`perMessageDeflate:
// true`: context takeover unless the client asks otherwise, zlib's default
// level, messages under 1 KiB sent uncompressed). Other paths get 404.
//
//   node ws-echo.mjs --host 127.0.0.1 --port 0 --addr-file /tmp/ws.addr
//
// Writes `host:port` to --addr-file (via a rename) once listening, so the
// runner can wait for the file instead of sleeping. Compression only on
// /echo-deflate.

import { createServer } from 'node:http';
import { renameSync, writeFileSync } from 'node:fs';
import { parseArgs } from 'node:util';
import { WebSocketServer } from 'ws';

const { values: options } = parseArgs({
  options: {
    host: { type: 'string', default: '127.0.0.1' },
    port: { type: 'string', default: '0' },
    'addr-file': { type: 'string' },
  },
});

const echo = new WebSocketServer({ noServer: true, perMessageDeflate: false });
const chat = new WebSocketServer({ noServer: true, perMessageDeflate: false, clientTracking: true });
const echoDeflate = new WebSocketServer({ noServer: true, perMessageDeflate: true });
const routes = { '/echo': echo, '/chat': chat, '/echo-deflate': echoDeflate };

for (const server of [echo, echoDeflate]) {
  server.on('connection', (socket) => {
    socket.on('message', (data, isBinary) => socket.send(data, { binary: isBinary }));
  });
}

chat.on('connection', (socket) => {
  socket.on('message', (data, isBinary) => {
    for (const client of chat.clients) {
      client.send(data, { binary: isBinary });
    }
  });
});

const server = createServer((request, response) => {
  response.writeHead(404).end();
});

server.on('upgrade', (request, socket, head) => {
  const path = new URL(request.url, 'http://localhost').pathname;
  const route = routes[path];
  if (!route) {
    socket.end('HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n');
    return;
  }
  route.handleUpgrade(request, socket, head, (ws) => route.emit('connection', ws, request));
});

server.listen({ host: options.host, port: Number(options.port), backlog: 1024 }, () => {
  const { address, port } = server.address();
  const bound = `${address}:${port}`;
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
