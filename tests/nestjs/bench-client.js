// Throughput of a NestJS ClientProxy (TCP) against a server: `count` requests with `concurrency`
// in flight. Prints {"requests":..,"seconds":..,"per_second":..}.
//   node bench-client.js <port> <count> <concurrency>
'use strict';
const { ClientProxyFactory, Transport } = require('@nestjs/microservices');
const { lastValueFrom } = require('rxjs');

async function main() {
  const [port, count, concurrency] = process.argv.slice(2).map(Number);
  const client = ClientProxyFactory.create({ transport: Transport.TCP, options: { host: '127.0.0.1', port } });
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
