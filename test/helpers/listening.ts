/**
 * The whole server (createServer: the real runtime and the app) over a fixture checkpoint, listening on an
 * ephemeral port of 127.0.0.1, for tests over a real socket; its log lines are kept for the tests to read.
 */
import { join } from 'node:path';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { DEFAULT_OPTIONS, type ServerOptions } from '../../src/cli.ts';
import { createServer, type Server } from '../../src/server/server.ts';

export interface ListeningServer extends Server {
  /** `http://127.0.0.1:<port>`. */
  readonly url: string;
  readonly port: number;
  /** The server's log lines (pino JSON, parsed), in order: those at `logLevel` and above (none when silent). */
  readonly lines: Record<string, any>[];
}

/**
 * The server's options for the checkpoint in `root/model` and the adapter folder `root/adapters`: wasm, silent,
 * prompts of up to 64 tokens and 128 in all; `over` replaces any of them.
 */
export function fixtureServerOptions(root: string, over: Partial<ServerOptions> = {}): ServerOptions {
  return {
    ...DEFAULT_OPTIONS, model: join(root, 'model'), adapterDir: join(root, 'adapters'), backend: 'wasm',
    logLevel: 'silent', maxInputLength: 64, maxTotalTokens: 128, ...over,
  };
}

/**
 * Builds the server with fixtureServerOptions(root, over), listens on 127.0.0.1 at a port the system picks, and
 * marks it ready (/health answers 200). close() is the server's: the caller calls it at the end.
 */
export async function listeningServer(root: string, over: Partial<ServerOptions> = {}): Promise<ListeningServer> {
  const options = fixtureServerOptions(root, over);
  const lines: Record<string, any>[] = [];
  const sink = new Writable({
    write(chunk, _enc, done) {
      lines.push(JSON.parse(String(chunk)));
      done();
    },
  });
  const server = await createServer(options, pino({ level: options.logLevel }, sink));
  try {
    await server.app.listen({ host: '127.0.0.1', port: 0 });
  } catch (err) {
    await server.close();
    throw err;
  }
  server.setReady(true);
  const { port } = server.app.server.address() as { port: number };
  return { ...server, url: `http://127.0.0.1:${port}`, port, lines };
}
