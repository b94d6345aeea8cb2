/**
 * The process entry point: parse options, build the server, listen, and shut down gracefully on
 * SIGTERM/SIGINT (stop accepting, let in-flight requests finish within --shutdown-grace).
 */
import { CliError, helpText, parseOptions, type ServerOptions } from '../cli.ts';
import { isServeError } from '../errors.ts';
import { createServer } from './server.ts';

async function main(): Promise<void> {
  let options: ServerOptions;
  try {
    options = parseOptions(process.argv.slice(2), process.env);
  } catch (err) {
    if (err instanceof CliError) {
      process.stderr.write(`${err.message}\n\nRun with --help for the list of options.\n`);
      process.exit(2);
    }
    throw err;
  }
  if (options.help) {
    process.stdout.write(helpText());
    return;
  }
  const log = (msg: string) => process.stdout.write(`${JSON.stringify({ time: new Date().toISOString(), msg })}\n`);
  const server = await createServer(options, log);
  const address = await server.app.listen({ host: options.host, port: options.port });
  server.setReady(true);
  log(`listening on ${address} (model ${server.runtime.modelId}, lora mode ${options.loraMode})`);

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log(`${signal}: draining (grace ${options.shutdownGrace}s)`);
    await server.close(options.shutdownGrace * 1000);
    log('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
}

main().catch((err: unknown) => {
  const msg = isServeError(err) ? `${err.code}: ${err.message}` : (err as Error)?.stack ?? String(err);
  process.stderr.write(`failed to start: ${msg}\n`);
  process.exit(1);
});
