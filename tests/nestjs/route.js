// Reads one JSON pattern per line and prints, per line, the routes NestJS computes for it:
// {"route": <transformPatternToRoute(pattern)>, "incoming": <the route a Nest server dispatches on>}.
// Both come from @nestjs/microservices itself, not from a reimplementation.
'use strict';
const readline = require('readline');
const { transformPatternToRoute } = require('@nestjs/microservices/utils/transform-pattern.utils');
const { ServerTCP } = require('@nestjs/microservices');

const server = new ServerTCP({});
const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  const pattern = JSON.parse(line);
  const route = transformPatternToRoute(pattern);
  const incoming = server.getRouteFromPattern(server.getPatternAsString(pattern));
  const asText = (r) => (typeof r === 'string' ? r : null);
  process.stdout.write(JSON.stringify({ route: asText(route), incoming: asText(incoming) }) + '\n');
});
