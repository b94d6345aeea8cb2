// Builds the native matmul addon (src/backend/wasm/addon/matmul.cc → build/Release/matmul.node) with node-gyp. npm runs this as the
// package's install script (npm ci / npm install). A failed build only warns: the server then uses the wasm kernels.
import { spawnSync } from 'node:child_process';
import { dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const dir = dirname(fileURLToPath(import.meta.url));
// npm puts its bundled node-gyp in npm_config_node_gyp for lifecycle scripts; otherwise try one on PATH.
const gyp = process.env.npm_config_node_gyp;
const [cmd, args] = gyp ? [process.execPath, [gyp, 'rebuild']] : ['node-gyp', ['rebuild']];
const r = spawnSync(cmd, args, { cwd: dir, stdio: ['ignore', 'ignore', 'pipe'], encoding: 'utf8' });
if (r.status === 0) {
  console.log('lora-serve: built the native matmul addon (src/backend/wasm/addon/build/Release/matmul.node)');
} else {
  const why = r.error ? r.error.message : (r.stderr ?? '').trim().split('\n').slice(-5).join('\n');
  console.warn(`lora-serve: the native matmul addon did not build (it needs python3, make and a C++ compiler); the wasm kernels will be used.\n${why}`);
}
