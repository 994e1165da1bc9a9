// NestJS microservice and client options per transport, shared by service.js, client.js and
// bench-client.js, so that adding a transport to the interop tests is one case here.
//   <transport> <address> [extra]
//   tcp    <port>
//   nats   <url> [queue]
//   redis  <url>                  (redis://127.0.0.1:6379)
//   mqtt   <url> [shared-group]   (mqtt://127.0.0.1:1883; with a group, handlers subscribe $share/<group>/…)
//   rmq    <url> [queue[:wildcards]] (amqp://guest:guest@127.0.0.1:5672/vhost)
//   kafka  <host:port> [group]
'use strict';
const { Transport } = require('@nestjs/microservices');

function hostAndPort(url) {
  const parsed = new URL(url);
  return { host: parsed.hostname, port: Number(parsed.port) };
}

function options(transport, address, extra, side) {
  switch (transport) {
    case 'tcp':
      return { transport: Transport.TCP, options: { host: '127.0.0.1', port: Number(address) } };
    case 'nats':
      return { transport: Transport.NATS, options: { servers: [address], queue: (side === 'server' && extra) || undefined } };
    case 'redis':
      return { transport: Transport.REDIS, options: { ...hostAndPort(address), retryAttempts: 3, retryDelay: 200 } };
    case 'mqtt':
      return { transport: Transport.MQTT, options: { url: address } };
    case 'rmq': {
      // extra: <queue>[:wildcards] (the exchange mode of §4.3: a topic exchange named after the queue)
      const [queue, mode] = (extra || 'palisade_interop').split(':');
      return {
        transport: Transport.RMQ,
        options: { urls: [address], queue, queueOptions: { durable: false }, ...(mode === 'wildcards' ? { wildcards: true } : {}) },
      };
    }
    case 'kafka':
      return {
        transport: Transport.KAFKA,
        options: {
          client: { brokers: [address], clientId: `palisade-interop-${process.pid}` },
          // A short session: a broker holds a group join for up to half of it (Tansu does).
          consumer: {
            groupId: extra || `palisade-interop-${process.pid}`,
            maxWaitTimeInMs: 100,
            sessionTimeout: 3000,
            heartbeatInterval: 500,
            rebalanceTimeout: 3000,
          },
          subscribe: { fromBeginning: false },
        },
      };
    default:
      throw new Error(`unknown transport ${transport}`);
  }
}

module.exports = {
  serverOptions: (transport, address, extra) => options(transport, address, extra, 'server'),
  clientOptions: (transport, address, extra) => options(transport, address, extra, 'client'),
};
