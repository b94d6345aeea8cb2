/** The package's name and version (package.json), as /info, /v1/models and the OpenAPI document report them. */
import { createRequire } from 'node:module';

const pkg = createRequire(import.meta.url)('../package.json') as { name: string; version: string };

export const NAME: string = pkg.name;
export const VERSION: string = pkg.version;
