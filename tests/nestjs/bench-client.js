// Throughput of a NestJS ClientProxy against a server: `count` requests with `concurrency` in
// flight. Prints {"requests":..,"seconds":..,"per_second":..,"lost":..}. With BENCH_REPLY_TIMEOUT_MS
// set, a reply that does not come within it counts as lost and ends the run (NestJS's MQTT client
// loses replies under load and then hangs on that pattern, nestjs-wire-brokers.md §3.5):
// `requests` is then the number answered before.
//   node bench-client.js <port> <count> <concurrency>                       (TCP)
//   node bench-client.js <transport> <address> <count> <concurrency> [extra] (see transports.js)
'use strict';
const { ClientProxyFactory } = require('@nestjs/microservices');
const { clientOptions } = require('./transports');
const { lastValueFrom, timeout } = require('rxjs');

async function main() {
  const args = process.argv.slice(2);
  const [transport, address, countText, concurrencyText, extra] =
    args.length === 3 ? ['tcp', args[0], args[1], args[2]] : args;
  const [count, concurrency] = [Number(countText), Number(concurrencyText)];
  const client = ClientProxyFactory.create(clientOptions(transport, address, extra));
  if (client.subscribeToResponseOf) client.subscribeToResponseOf('echo');
  await client.connect();
  const replyTimeout = Number(process.env.BENCH_REPLY_TIMEOUT_MS || 0);
  const call = (i) => {
    const reply = client.send('echo', i);
    return lastValueFrom(replyTimeout > 0 ? reply.pipe(timeout(replyTimeout)) : reply);
  };
  let [next, answered, lost] = [0, 0, 0];
  try {
    for (let i = 0; i < 200; i++) await call(i); // warm up
  } catch (error) {
    if (error.name !== 'TimeoutError') throw error;
    process.stdout.write(JSON.stringify({ requests: 0, seconds: 0, per_second: 0, lost: 1 }) + '\n');
    process.exit(0);
  }
  const start = process.hrtime.bigint();
  const worker = async () => {
    while (next < count && lost === 0) {
      const i = next++;
      let answer;
      try {
        answer = await call(i);
      } catch (error) {
        if (error.name !== 'TimeoutError') throw error;
        lost++;
        return;
      }
      if (answer !== i) throw new Error(`wrong answer ${answer} for ${i}`);
      answered++;
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  process.stdout.write(JSON.stringify({ requests: answered, seconds, per_second: answered / seconds, lost }) + '\n');
  // A client that lost a reply may never finish closing.
  if (lost > 0) process.exit(0);
  await client.close();
}
main().catch((e) => { console.error(e); process.exit(1); });
