// A NestJS ClientProxy calling a service (palisade's, in the tests) on any transport, through the
// cases of the interop suite. Prints one JSON object with every result.
//   node client.js <transport> <address> [extra]     (see transports.js)
'use strict';
const { ClientProxyFactory } = require('@nestjs/microservices');
const { clientOptions } = require('./transports');
const { firstValueFrom, lastValueFrom, toArray, timeout } = require('rxjs');

async function outcome(observable) {
  try {
    return { value: await lastValueFrom(observable) };
  } catch (err) {
    return { error: err instanceof Error ? { errorMessage: err.message } : err };
  }
}

function silentOnUnknown(transport) {
  return transport === 'kafka' || transport === 'redis' || transport === 'mqtt';
}

async function main() {
  const [transport, address, extra] = process.argv.slice(2);
  const client = ClientProxyFactory.create(clientOptions(transport, address, extra));
  if (client.subscribeToResponseOf) {
    // Kafka: the client consumes the reply topic of every pattern it sends to.
    for (const pattern of ['get-user', 'fail', 'crash', 'slow', 'count', 'nothing', 'last-events', 'no-such-pattern']) {
      client.subscribeToResponseOf(pattern);
    }
  }
  await client.connect();
  const unicode = { ms: 0, text: 'héllo wörld ✓ € 日本語 😀🚀 end', nested: { 'ключ': 'значение', emoji: '👍🏽' } };
  const results = {
    getUser: await outcome(client.send('get-user', { id: '42' })),
    missing: await outcome(client.send('get-user', { id: 'missing' })),
    sum: await outcome(client.send({ cmd: 'sum' }, [5, 6])),
    sumReordered: await outcome(client.send({ cmd: 'sum', role: 'math' }, [20, 22])),
    sumRouteString: await outcome(client.send('{"cmd":"sum","role":"math"}', [1, 2])),
    fail: await outcome(client.send('fail', {})),
    crash: await outcome(client.send('crash', {})),
    // Over Kafka nobody consumes an unknown pattern's topic, and on Redis and MQTT NestJS answers
    // an unknown pattern with silence: without a timeout NestJS's client would wait forever.
    unknown: await outcome(silentOnUnknown(transport)
      ? client.send('no-such-pattern', { x: 1 }).pipe(timeout(transport === 'kafka' ? 3000 : 2000))
      : client.send('no-such-pattern', { x: 1 })),
    unicode: await outcome(client.send('slow', unicode)),
    count: await outcome(client.send('count', 3).pipe(toArray())),
    nothing: await outcome(client.send('nothing', {}).pipe(toArray())),
  };
  await firstValueFrom(client.emit('user-created', { id: 'ev-1', name: 'Ann' }), { defaultValue: null });
  // An object pattern is not a Kafka topic: there the emit fails, the same way for every server.
  results.objectEmit = await firstValueFrom(client.emit({ cmd: 'user-created-object' }, { id: 'ev-2' }), { defaultValue: null })
    .then(() => 'sent', (err) => (transport === 'kafka' ? 'refused' : Promise.reject(err)));
  await new Promise((resolve) => setTimeout(resolve, 200));
  results.events = await outcome(client.send('last-events', {}));
  process.stdout.write(JSON.stringify(results) + '\n');
  await client.close();
}
main().catch((e) => { console.error(e); process.exit(1); });
