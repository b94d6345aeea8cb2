/**
 * openapi.yaml is the document generated from the registered routes (regenerate it with
 * `UPDATE_OPENAPI=1 node --import tsx --test test/openapi.test.ts`), every route is in it and
 * every documented operation is served. The HTTP tests validate each response against it
 * (test/helpers/app.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, writeFileSync } from 'node:fs';
import YAML from 'yaml';
import { registeredRoutes } from '../src/server/app.ts';
import { build, docValidator, OPENAPI_PATH } from './helpers/app.ts';

const METHODS = ['get', 'head', 'put', 'post', 'delete', 'patch'];

test('openapi.yaml is the document GET /openapi.yaml serves', async () => {
  const { app, inject } = await build({ validate: false });
  const res = await inject({ method: 'GET', url: '/openapi.yaml' });
  assert.equal(res.statusCode, 200);
  assert.match(String(res.headers['content-type']), /^application\/yaml/);
  if (process.env.UPDATE_OPENAPI) writeFileSync(OPENAPI_PATH, res.body);
  assert.equal(readFileSync(OPENAPI_PATH, 'utf8'), res.body,
    'openapi.yaml is out of date: run UPDATE_OPENAPI=1 node --import tsx --test test/openapi.test.ts');
  assert.equal(YAML.parse(res.body).openapi, '3.1.0');
  await app.close();
});

test('every registered route is in openapi.yaml and every documented operation is a route', async () => {
  const { app } = await build({ validate: false });
  await app.ready();
  const fromRoutes = new Set<string>();
  for (const r of registeredRoutes(app)) {
    assert.ok(r.doc, `${r.method} ${r.url} has no config.doc`);
    for (const op of r.doc.operations ?? [{}]) {
      fromRoutes.add(`${r.method} ${op.path ?? r.url.replace(/:(\w+)/g, '{$1}')}`);
    }
  }
  const doc = docValidator().doc;
  const fromFile = new Set<string>();
  for (const [path, item] of Object.entries(doc.paths as Record<string, Record<string, unknown>>)) {
    for (const m of Object.keys(item)) if (METHODS.includes(m)) fromFile.add(`${m.toUpperCase()} ${path}`);
  }
  assert.deepEqual([...fromRoutes].sort(), [...fromFile].sort());
  await app.close();
});

test('every documented operation is served (no route-level 404)', async () => {
  const { app } = await build({ validate: false });
  const doc = docValidator().doc;
  for (const [path, item] of Object.entries(doc.paths as Record<string, Record<string, { responses: Record<string, unknown>; summary?: string }>>)) {
    for (const [m, op] of Object.entries(item)) {
      assert.ok(op.summary, `${m} ${path} has no summary`);
      assert.ok(op.responses['200'], `${m} ${path} documents no 200`);
      const res = await app.inject({ method: m.toUpperCase() as 'GET', url: path.replace('{id}', 'org/missing') });
      assert.ok(!(res.statusCode === 404 && res.json().code === 'NOT_FOUND'), `${m.toUpperCase()} ${path} is not routed`);
    }
  }
  await app.close();
});
