// Throughput of a NestJS ClientProxy against a server: `count` requests with `concurrency` in
// flight. Prints {"requests":..,"seconds":..,"per_second":..}.
//   node bench-client.js <port> <count> <concurrency>                       (TCP)
//   node bench-client.js <transport> <address> <count> <concurrency> [extra] (see transports.js)
'use strict';
const { ClientProxyFactory } = require('@nestjs/microservices');
const { clientOptions } = require('./transports');
const { lastValueFrom } = require('rxjs');

async function main() {
  const args = process.argv.slice(2);
  const [transport, address, countText, concurrencyText, extra] =
    args.length === 3 ? ['tcp', args[0], args[1], args[2]] : args;
  const [count, concurrency] = [Number(countText), Number(concurrencyText)];
  const client = ClientProxyFactory.create(clientOptions(transport, address, extra));
  if (client.subscribeToResponseOf) client.subscribeToResponseOf('echo');
  await client.connect();
  for (let i = 0; i < 200; i++) await lastValueFrom(client.send('echo', i)); // warm up
  let next = 0;
  const start = process.hrtime.bigint();
  const worker = async () => {
    while (next < count) {
      const i = next++;
      const answer = await lastValueFrom(client.send('echo', i));
      if (answer !== i) throw new Error(`wrong answer ${answer} for ${i}`);
    }
  };
  await Promise.all(Array.from({ length: concurrency }, worker));
  const seconds = Number(process.hrtime.bigint() - start) / 1e9;
  process.stdout.write(JSON.stringify({ requests: count, seconds, per_second: count / seconds }) + '\n');
  await client.close();
}
main().catch((e) => { console.error(e); process.exit(1); });
