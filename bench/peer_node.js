// The same hello world on Node: with WORKERS=N, N workers of Node's
// cluster module (round-robin, its default on Linux) on one port; without,
// one plain process (for the peer's own parallel limit).
const cluster = require('node:cluster');
const http = require('node:http');

const port = Number(process.env.PORT);
const workers = Number(process.env.WORKERS || 0);

if (workers > 0 && cluster.isPrimary) {
  for (let i = 0; i < workers; i++) cluster.fork();
} else {
  http.createServer((req, res) => {
    const body = JSON.stringify({hello: 'world', pid: process.pid});
    res.writeHead(200, {'Content-Type': 'application/json',
                        'Content-Length': Buffer.byteLength(body)});
    res.end(body);
  }).listen(port, '127.0.0.1');
}
