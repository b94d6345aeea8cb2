/**
 * The OpenAPI 3.1 document, generated from the registered routes: their TypeBox schemas
 * (src/server/schemas.ts) and the `config.doc` each route carries. `GET /openapi.yaml` and
 * `GET /openapi.json` serve it, Swagger UI at `/docs` shows it; the committed openapi.yaml at
 * the repository root is the same document, and test/openapi.test.ts fails when the two differ
 * (regenerate with
 * `UPDATE_OPENAPI=1 node --import tsx --test test/openapi.test.ts`).
 */
import { Type, type TSchema } from '@sinclair/typebox';
import swaggerUi from '@fastify/swagger-ui';
import type { FastifyInstance, FastifySchema, RouteOptions } from 'fastify';
import fastifyPlugin from 'fastify-plugin';
import YAML from 'yaml';
import type { ErrorCode } from '../../errors.ts';
import { NAME, VERSION } from '../../version.ts';
import { ErrorBody, OpenAIErrorBody } from '../schemas.ts';
import { responseStatus } from './common.ts';

/** One documented operation of a route; every field defaults to what the route's schema says. */
export interface OperationDoc {
  /** OpenAPI path; default: the route url with `:param` written `{param}`. */
  readonly path?: string;
  readonly summary?: string;
  /** Present and undefined: no query parameters, whatever the route's schema says. */
  readonly query?: TSchema;
  readonly body?: { readonly contentType: string; readonly schema: TSchema };
  readonly response?: TSchema;
}

export interface RouteDoc {
  readonly tag: string;
  /** More than one when a wildcard route serves several documented paths. */
  readonly operations?: readonly OperationDoc[];
  /** Error codes beyond the common ones (auth, validation, body size, internal). */
  readonly errors?: readonly ErrorCode[];
  /** Schema of each `data:` event when the route can answer with text/event-stream. */
  readonly stream?: TSchema;
  /** A non-JSON 200 content type (the body is text). */
  readonly produces?: string;
  /** Response headers of a 200: name → description. */
  readonly headers?: Readonly<Record<string, string>>;
}

declare module 'fastify' {
  interface FastifySchema {
    summary?: string;
    /** Not an API operation (Swagger UI's own pages and assets): left out of the document. */
    hide?: boolean;
  }
  interface FastifyContextConfig {
    doc?: RouteDoc;
    /** No API key needed (health checks, Prometheus scrapes with --metrics-public). */
    public?: boolean;
    /** Changes what is stored or loaded (adapter upload, delete, load/unload): needs --admin-api-key when it is set. */
    admin?: boolean;
  }
}

/** What the onRoute hook records of each route. */
export interface RouteRecord {
  readonly method: string;
  readonly url: string;
  readonly schema?: FastifySchema & { response?: Record<number, TSchema> };
  readonly doc?: RouteDoc;
  readonly public: boolean;
  readonly admin: boolean;
}

export function recordRoute(r: RouteOptions): RouteRecord[] {
  if (r.schema?.hide) return [];
  const methods = Array.isArray(r.method) ? r.method : [r.method];
  return methods.map((method) => ({
    method: String(method).toUpperCase(),
    url: r.url,
    schema: r.schema as RouteRecord['schema'],
    doc: r.config?.doc,
    public: r.config?.public === true,
    admin: r.config?.admin === true,
  }));
}

type Json = Record<string, unknown>;

/** Strips TypeBox's symbol keys (JSON round trip). */
function plain(schema: unknown): Json {
  return JSON.parse(JSON.stringify(schema)) as Json;
}

/** Moves every titled sub-schema into components.schemas and points at it with $ref. */
class Components {
  readonly schemas: Record<string, Json> = {};

  ref(schema: TSchema | Json): Json {
    return this.walk(plain(schema)) as Json;
  }

  private walk(node: unknown): unknown {
    if (Array.isArray(node)) return node.map((n) => this.walk(n));
    if (typeof node !== 'object' || node === null) return node;
    const out: Json = {};
    for (const [k, v] of Object.entries(node)) out[k] = this.walk(v);
    const title = out.title;
    if (typeof title !== 'string') return out;
    const existing = this.schemas[title];
    if (existing && JSON.stringify(existing) !== JSON.stringify(out)) throw new Error(`two different schemas are titled ${title}`);
    this.schemas[title] = out;
    return { $ref: `#/components/schemas/${title}` };
  }
}

function errorResponses(codes: Iterable<ErrorCode>, openai: boolean, c: Components): Json {
  const byStatus = new Map<number, ErrorCode[]>();
  for (const code of codes) {
    const status = responseStatus(code, openai);
    byStatus.set(status, [...(byStatus.get(status) ?? []), code]);
  }
  const schema = c.ref(openai ? OpenAIErrorBody : ErrorBody);
  const out: Json = {};
  for (const status of [...byStatus.keys()].sort((a, b) => a - b)) {
    out[String(status)] = {
      description: byStatus.get(status)!.sort().join(', '),
      content: { 'application/json': { schema } },
    };
  }
  return out;
}

function operation(route: RouteRecord, op: OperationDoc, c: Components): { path: string; op: Json } {
  const doc = route.doc!;
  const schema = route.schema ?? {};
  const path = op.path ?? route.url.replace(/:(\w+)/g, '{$1}');
  const parameters: Json[] = [...path.matchAll(/\{(\w+)\}/g)].map((m) => ({
    name: m[1], in: 'path', required: true, schema: { type: 'string' },
    ...(m[1] === 'id' ? { description: 'Adapter id: `name` or `org/name` (the `/` may be sent as is or as %2F)' } : {}),
  }));
  const query = 'query' in op ? op.query : (schema.querystring as TSchema | undefined);
  if (query) {
    const q = plain(query) as { properties?: Record<string, Json>; required?: string[] };
    for (const [name, s] of Object.entries(q.properties ?? {})) {
      const { description, ...rest } = s;
      parameters.push({ name, in: 'query', required: q.required?.includes(name) ?? false, schema: rest, ...(description ? { description } : {}) });
    }
  }
  const body = op.body ?? (schema.body ? { contentType: 'application/json', schema: schema.body as TSchema } : undefined);

  const ok: Json = {};
  const response = op.response ?? schema.response?.[200];
  if (response) ok['application/json'] = { schema: c.ref(response) };
  if (doc.stream) ok['text/event-stream'] = { schema: { type: 'string' }, 'x-event-schema': c.ref(doc.stream) };
  if (doc.produces) ok[doc.produces] = { schema: { type: 'string' } };

  const codes = new Set<ErrorCode>(['INTERNAL', ...(doc.errors ?? [])]);
  if (!route.public) codes.add('UNAUTHORIZED');
  if (route.admin) codes.add('ADMIN_KEY_REQUIRED');
  if (query || body) codes.add('VALIDATION');
  if (body) codes.add('PAYLOAD_TOO_LARGE').add('UNSUPPORTED_MEDIA_TYPE').add('BAD_REQUEST');
  // JSON request objects are closed (src/server/schemas.ts).
  if (body?.contentType === 'application/json') codes.add('UNKNOWN_FIELD');

  return {
    path,
    op: {
      tags: [doc.tag],
      summary: op.summary ?? schema.summary,
      ...(parameters.length ? { parameters } : {}),
      ...(body ? { requestBody: { required: true, content: { [body.contentType]: { schema: c.ref(body.schema) } } } } : {}),
      responses: {
        '200': {
          description: 'OK',
          ...(doc.headers ? { headers: Object.fromEntries(Object.entries(doc.headers).map(([name, description]) => [name, { description, schema: { type: 'string' } }])) } : {}),
          content: ok,
        },
        ...errorResponses(codes, route.url.startsWith('/v1/'), c),
      },
      ...(route.public ? { security: [] } : route.admin ? { security: [{ adminBearerAuth: [] }] } : {}),
    },
  };
}

/** The OpenAPI document of these routes (documented routes only: every route has `config.doc`). */
export function openApiDocument(routes: readonly RouteRecord[]): Json {
  const c = new Components();
  const paths: Record<string, Record<string, Json>> = {};
  for (const route of routes) {
    if (!route.doc) throw new Error(`route ${route.method} ${route.url} has no config.doc`);
    for (const op of route.doc.operations ?? [{}]) {
      const { path, op: operationObject } = operation(route, op, c);
      (paths[path] ??= {})[route.method.toLowerCase()] = operationObject;
    }
  }
  const sorted = Object.fromEntries(Object.entries(paths).sort(([a], [b]) => a.localeCompare(b)));
  return {
    openapi: '3.1.0',
    info: {
      title: NAME,
      version: VERSION,
      description: 'One base model, many LoRA adapters: TGI/LoRAX-compatible generation, OpenAI-compatible completions, adapter management. ' +
        'Errors are `{error, error_type, code}` (OpenAI routes: `{error: {message, type, param, code}}`). ' +
        'When the server runs with --api-key, every route but /health (and /metrics with --metrics-public) needs `Authorization: Bearer <key>`; ' +
        'with --admin-api-key, the adapter routes that change what is stored or loaded need that key instead (it opens every other route too). ' +
        'Swagger UI: /docs (served from the server, no network needed).',
    },
    security: [{ bearerAuth: [] }],
    paths: sorted,
    components: {
      securitySchemes: {
        bearerAuth: { type: 'http', scheme: 'bearer', description: 'Only when the server runs with --api-key (the --admin-api-key key is accepted too)' },
        adminBearerAuth: { type: 'http', scheme: 'bearer', description: 'The --admin-api-key key; without --admin-api-key, the --api-key key (and nothing when neither is set)' },
      },
      schemas: Object.fromEntries(Object.entries(c.schemas).sort(([a], [b]) => a.localeCompare(b))),
    },
  };
}

export function openApiYaml(routes: readonly RouteRecord[]): string {
  return YAML.stringify(openApiDocument(routes), { aliasDuplicateObjects: false, lineWidth: 0 });
}

/** The routes' document, built on first use (after every route is registered). */
function lazyDocument(routes: readonly RouteRecord[]) {
  let doc: Json | undefined;
  let yaml: string | undefined;
  return {
    json: () => (doc ??= openApiDocument(routes)),
    yaml: () => (yaml ??= openApiYaml(routes)),
  };
}

export async function openApiRoutes(app: FastifyInstance, routes: readonly RouteRecord[]): Promise<void> {
  const doc = lazyDocument(routes);
  app.get('/openapi.yaml', {
    schema: { summary: 'This document (OpenAPI 3.1)' },
    config: { doc: { tag: 'Service', produces: 'application/yaml' } },
  }, async (_request, reply) => reply.type('application/yaml; charset=utf-8').send(doc.yaml()));
  app.get('/openapi.json', {
    schema: { summary: 'This document as JSON' },
    config: { doc: { tag: 'Service', operations: [{ response: Type.Object({ openapi: Type.Literal('3.1.0') }, { description: 'The same document as /openapi.yaml' }) }] } },
  }, async (_request, reply) => reply.type('application/json; charset=utf-8').send(JSON.stringify(doc.json())));

  // Swagger UI from @fastify/swagger-ui's own files (no network). It reads the document through
  // `app.swagger()`, which @fastify/swagger would provide; here it is this document.
  await app.register(fastifyPlugin(async (scope) => {
    scope.decorate('swagger', (opts?: { yaml?: boolean }) => (opts?.yaml ? doc.yaml() : doc.json()));
  }, { name: '@fastify/swagger' }));
  await app.register(swaggerUi, { routePrefix: '/docs' });
}
