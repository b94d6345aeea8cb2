/**
 * The server's hold on slow clients: the connection timeouts reach Node's http.Server, and a stream whose client
 * reads nothing is cancelled after --stream-stall-timeout (`stallBound`). The scenarios of bench/soak (test/soak.test.ts)
 * run them over real sockets.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { PassThrough } from 'node:stream';
import type { FastifyReply } from 'fastify';
import { DEFAULT_CONNECTION_TIMEOUTS } from '../src/server/app.ts';
import { stallBound } from '../src/server/routes/common.ts';
import { build } from './helpers/app.ts';

test('connection timeouts: the options, or the defaults, are the http.Server\'s', async () => {
  const s = await build({ options: { connection: { headersTimeoutMs: 2000, requestTimeoutMs: 5000, keepAliveTimeoutMs: 3000 } } });
  assert.equal(s.app.server.headersTimeout, 2000);
  assert.equal(s.app.server.requestTimeout, 5000);
  assert.equal(s.app.server.keepAliveTimeout, 3000);
  await s.app.close();
  const d = await build();
  assert.equal(d.app.server.headersTimeout, DEFAULT_CONNECTION_TIMEOUTS.headersTimeoutMs);
  assert.equal(d.app.server.requestTimeout, DEFAULT_CONNECTION_TIMEOUTS.requestTimeoutMs);
  assert.equal(d.app.server.keepAliveTimeout, DEFAULT_CONNECTION_TIMEOUTS.keepAliveTimeoutMs);
  await d.app.close();
});

/** A reply whose raw response records destroy() (which closes the connection and, through `submit`, cancels). */
function fakeReply(): { reply: FastifyReply; raw: EventEmitter & { destroyed: boolean; destroy(): void }; warnings: string[] } {
  const raw = Object.assign(new EventEmitter(), {
    destroyed: false,
    destroy() {
      raw.destroyed = true;
      raw.emit('close');
    },
  });
  const warnings: string[] = [];
  const reply = { raw, log: { warn: (m: string) => warnings.push(m) } } as unknown as FastifyReply;
  return { reply, raw, warnings };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

test('stallBound: a stream the client stops reading is destroyed after the bound; one that drains is not', async () => {
  const stalled = fakeReply();
  const accepted = stallBound(new PassThrough(), stalled.reply, 50);
  accepted(true);
  await sleep(80);
  assert.equal(stalled.raw.destroyed, false, 'accepted writes start no timer');
  accepted(false);
  await sleep(100);
  assert.equal(stalled.raw.destroyed, true, 'destroyed after 50 ms of backpressure');
  assert.match(stalled.warnings[0]!, /read nothing for 50 ms/);

  const draining = fakeReply();
  const body = new PassThrough();
  const acceptedToo = stallBound(body, draining.reply, 50);
  acceptedToo(false);
  await sleep(20);
  body.emit('drain');
  await sleep(80);
  assert.equal(draining.raw.destroyed, false, 'a drain stops the timer');

  const finished = fakeReply();
  const acceptedFin = stallBound(new PassThrough(), finished.reply, 50);
  acceptedFin(false);
  finished.raw.emit('finish');
  await sleep(80);
  assert.equal(finished.raw.destroyed, false, 'a finished response stops the timer');

  const unbounded = fakeReply();
  stallBound(new PassThrough(), unbounded.reply, 0)(false);
  await sleep(80);
  assert.equal(unbounded.raw.destroyed, false, '0: no bound');
});
