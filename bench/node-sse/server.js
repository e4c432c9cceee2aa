// A minimal SSE chat hub on Node 20 and better-sse: the baseline that
// `baby-discord bench fanout --receivers sse-peer` measures against.
//
//   GET  /rooms/ROOM/events     an event stream of ROOM's messages
//   POST /rooms/ROOM/messages   the body (text) is sent to ROOM's streams
//
// One better-sse channel per room. Each message goes out as an SSE event
// whose data is the posted text, verbatim. Listens on 127.0.0.1:$PORT
// (default 18080); `PORT=0` picks a free port. The address is printed as
// `listening http=127.0.0.1:PORT`.
"use strict";

const http = require("node:http");
const { createSession, createChannel } = require("better-sse");

const MAX_BODY = 64 * 1024;
const rooms = new Map();

function channel(room) {
  let c = rooms.get(room);
  if (!c) {
    c = createChannel();
    rooms.set(room, c);
  }
  return c;
}

const server = http.createServer(async (req, res) => {
  const match = /^\/rooms\/([a-z0-9_-]{1,32})\/(events|messages)$/.exec(req.url);
  if (match && match[2] === "events" && req.method === "GET") {
    // The text is sent as it is, not as a JSON string.
    const session = await createSession(req, res, { serializer: String });
    channel(match[1]).register(session);
  } else if (match && match[2] === "messages" && req.method === "POST") {
    const chunks = [];
    let size = 0;
    for await (const chunk of req) {
      size += chunk.length;
      if (size > MAX_BODY) {
        res.writeHead(413).end();
        return;
      }
      chunks.push(chunk);
    }
    channel(match[1]).broadcast(Buffer.concat(chunks).toString("utf8"), "message");
    res.writeHead(204).end();
  } else {
    res.writeHead(404, { "content-type": "text/plain" }).end("not found\n");
  }
});

server.listen(Number(process.env.PORT ?? 18080), "127.0.0.1", () => {
  const { address, port } = server.address();
  console.log(`listening http=${address}:${port}`);
});

for (const signal of ["SIGINT", "SIGTERM"]) {
  process.on(signal, () => process.exit(0));
}
