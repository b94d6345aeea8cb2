/**
 * The process entry point: parse options, listen, load the model and serve, and shut down gracefully on
 * SIGTERM/SIGINT (stop accepting, let in-flight requests finish within --shutdown-grace). Once the
 * options are read, everything is logged by one pino logger (JSON lines on stdout), the one the
 * HTTP app logs with; a bad command line is a usage message on stderr.
 */
import { CliError, helpText, parseOptions, type ServerOptions } from '../cli.ts';
import { isServeError } from '../errors.ts';
import { createLogger, startServer, type Server } from './server.ts';

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
  const log = createLogger(options.logLevel);
  let server: Server | undefined;
  // Installed before listening, so a signal at any point drains (or, before the server exists, just exits).
  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    log.info(`${signal}: draining (grace ${options.shutdownGrace}s)`);
    await server?.close(options.shutdownGrace * 1000);
    log.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  try {
    // Listens at once: until the model is loaded every route but /metrics answers 503 with the progress.
    server = await startServer(options, log);
  } catch (err) {
    log.fatal(isServeError(err) ? { code: err.code } : { err }, `failed to start: ${(err as Error)?.message ?? String(err)}`);
    process.exit(1);
  }
  if (stopping) return;
  server.setReady(true);
  log.info({ model: server.runtime.modelId, lora_mode: options.loraMode }, 'ready');
}

main().catch((err: unknown) => {
  process.stderr.write(`failed to start: ${(err as Error)?.stack ?? String(err)}\n`);
  process.exit(1);
});
