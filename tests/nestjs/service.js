// A NestJS microservice with the handlers of nestjs-wire.md's capture, on any transport.
//   node service.js <transport> <address> [extra]     (see transports.js)
// Prints "ready" once listening.
'use strict';
require('reflect-metadata');
const { Controller, Module } = require('@nestjs/common');
const { NestFactory } = require('@nestjs/core');
const { Ctx, MessagePattern, EventPattern, Payload, RpcException } = require('@nestjs/microservices');
const { timer, map, take } = require('rxjs');
const { serverOptions } = require('./transports');

const events = [];

class UsersController {
  getUser(data) {
    if (data.id === 'missing') {
      throw new RpcException({ code: 'USER_NOT_FOUND', message: `user ${data.id} not found` });
    }
    return { id: data.id, username: `user${data.id}`, email: `user${data.id}@example.com` };
  }
  sum(numbers) { return numbers.reduce((a, b) => a + b, 0); }
  sumMath(numbers) { return numbers.reduce((a, b) => a + b, 0); }
  fail() { throw new RpcException('boom'); }
  crash() { throw new Error('the database password is hunter2'); }
  async slow(data) {
    await new Promise((resolve) => setTimeout(resolve, data.ms || 0));
    return data;
  }
  count(n) { return timer(0, 5).pipe(map((i) => i + 1), take(n)); }
  nothing() { return undefined; }
  echo(x) { return x; }
  userCreated(data) { events.push(data); }
  lastEvents() { return events; }
  headers(data, context) {
    // RabbitMQ: AMQP headers, a plain object on the message's properties.
    const message = context && context.getMessage && context.getMessage();
    if (message && message.properties) return message.properties.headers || null;
    // Kafka: the record's headers, Buffers (a `kafka_` prefix for NestJS's own ones).
    if (message && message.headers) {
      const out = {};
      for (const [key, value] of Object.entries(message.headers)) out[key] = value == null ? null : value.toString();
      return out;
    }
    const headers = context && context.getHeaders && context.getHeaders();
    if (!headers) return null;
    const out = {};
    for (const key of headers.keys()) out[key] = headers.get(key);
    return out;
  }
}

const decorate = (decorator, name) =>
  Reflect.decorate([decorator], UsersController.prototype, name,
    Object.getOwnPropertyDescriptor(UsersController.prototype, name));
decorate(MessagePattern('get-user'), 'getUser');
// Object patterns cannot be Kafka topics: a NestJS Kafka server with one fails in listen().
if (process.argv[2] !== 'kafka') {
  decorate(MessagePattern({ cmd: 'sum' }), 'sum');
  decorate(MessagePattern({ role: 'math', cmd: 'sum' }), 'sumMath');
}
decorate(MessagePattern('fail'), 'fail');
decorate(MessagePattern('crash'), 'crash');
decorate(MessagePattern('slow'), 'slow');
decorate(MessagePattern('count'), 'count');
decorate(MessagePattern('nothing'), 'nothing');
decorate(MessagePattern('echo'), 'echo');
decorate(EventPattern('user-created'), 'userCreated');
decorate(MessagePattern('last-events'), 'lastEvents');
decorate(MessagePattern('headers'), 'headers');
// The context reaches a handler only through NestJS's parameter decorators.
Payload()(UsersController.prototype, 'headers', 0);
Ctx()(UsersController.prototype, 'headers', 1);
Reflect.decorate([Controller()], UsersController);

class AppModule {}
Reflect.decorate([Module({ controllers: [UsersController] })], AppModule);

async function main() {
  const [transport, address, extra] = process.argv.slice(2);
  const options = serverOptions(transport, address, extra);
  const app = await NestFactory.createMicroservice(AppModule, { ...options, logger: ['error', 'warn'] });
  await app.listen();
  process.stdout.write('ready\n');
}
main().catch((e) => { console.error(e); process.exit(1); });
