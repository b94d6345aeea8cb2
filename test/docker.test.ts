/**
 * Static checks of the container and monitoring files (no Docker engine needed): the Dockerfile's
 * final stages, docker/compose.yaml, Prometheus and Grafana provisioning, and the Grafana dashboard,
 * whose metric names must exist in docs/metrics.md (lora_serve_*) or in prom-client's default
 * collectors (process_*, nodejs_*), so the dashboard cannot drift from the server.
 * docker/validate.sh runs this file plus promtool and docker compose when they are installed.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { createRequire } from 'node:module';
import { parse as parseYaml } from 'yaml';
import { OPTIONS } from '../src/cli.ts';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const DOCKER = join(ROOT, 'docker');
const read = (p: string): string => readFileSync(join(ROOT, p), 'utf8');
// Compose files use YAML merge keys (<<: *anchor), as Docker Compose does.
const yaml = (p: string): any => parseYaml(read(p), { merge: true });

// ------------------------------------------------------------------------------------------------
// Dockerfile

interface Stage { from: string; name: string; lines: string[] }

/** Instructions (continuations joined, comments dropped) grouped by stage. */
function dockerStages(text: string): { args: Map<string, string>; stages: Stage[] } {
  const logical: string[] = [];
  let cur = '';
  for (const raw of text.split('\n')) {
    const line = raw.trim();
    if (line.startsWith('#') || (line === '' && cur === '')) continue;
    if (line.endsWith('\\')) { cur += line.slice(0, -1) + ' '; continue; }
    logical.push((cur + line).trim());
    cur = '';
  }
  const args = new Map<string, string>();
  const stages: Stage[] = [];
  for (const l of logical) {
    const m = /^FROM\s+(\S+)(?:\s+AS\s+(\S+))?/i.exec(l);
    if (m) { stages.push({ from: m[1]!, name: (m[2] ?? '').toLowerCase(), lines: [] }); continue; }
    if (stages.length === 0) {
      const a = /^ARG\s+(\w+)=(\S+)/i.exec(l);
      if (a) args.set(a[1]!, a[2]!);
      continue;
    }
    stages.at(-1)!.lines.push(l);
  }
  return { args, stages };
}

const dockerfile = dockerStages(read('Dockerfile'));
const stage = (name: string): Stage => {
  const s = dockerfile.stages.find((st) => st.name === name);
  assert.ok(s, `Dockerfile has a stage named ${name}`);
  return s;
};
/** ENV keys of a stage (both `ENV K=V K2=V2` and `ENV K V`). */
function envOf(s: Stage): Map<string, string> {
  const env = new Map<string, string>();
  for (const l of s.lines) {
    const m = /^ENV\s+(.*)$/i.exec(l);
    if (!m) continue;
    const body = m[1]!;
    if (/^\w+\s+[^=]*$/.test(body)) { const [k, ...v] = body.split(/\s+/); env.set(k!, v.join(' ')); continue; }
    for (const kv of body.match(/\w+=("[^"]*"|\S+)/g) ?? []) {
      const i = kv.indexOf('=');
      env.set(kv.slice(0, i), kv.slice(i + 1).replace(/^"|"$/g, ''));
    }
  }
  return env;
}

test('Dockerfile: gpu and cpu targets, gpu is the default (last) stage', () => {
  const names = dockerfile.stages.map((s) => s.name);
  assert.ok(names.includes('cpu'));
  assert.equal(names.at(-1), 'gpu', 'docker build without --target builds the gpu image');
});

test('Dockerfile: the GPU base is CUDA 11.x with cuDNN 8 (libtensorflow 2.9.1 of tfjs-node-gpu 4.22.0)', () => {
  const cuda = dockerfile.args.get('CUDA_IMAGE');
  assert.ok(cuda, 'ARG CUDA_IMAGE has a default');
  assert.match(cuda, /^nvidia\/cuda:11\.\d+\.\d+-cudnn8-(runtime|devel)-ubuntu\d+\.\d+$/);
  assert.equal(stage('gpu').from, '${CUDA_IMAGE}');
  assert.match(dockerfile.args.get('NODE_IMAGE') ?? '', /^node:20[.-]/);
  assert.equal(dockerfile.args.get('TFJS_VERSION'), '4.22.0');
  const deps = stage('gpu-deps').lines.join('\n');
  assert.match(deps, /npm ci --omit=dev/);
  assert.match(deps, /npm install --no-save --omit=dev [^\n]*@tensorflow\/tfjs-node-gpu@\$\{TFJS_VERSION\}/);
  // The project's tfjs-core must be the version tfjs-node-gpu pins, or two engines would exist.
  const lock = JSON.parse(read('package-lock.json'));
  assert.equal(lock.packages['node_modules/@tensorflow/tfjs-core'].version, dockerfile.args.get('TFJS_VERSION'));
});

for (const name of ['gpu', 'cpu']) {
  test(`Dockerfile ${name}: non-root USER, EXPOSE 3000, HEALTHCHECK on /health, volumes, server env`, () => {
    const s = stage(name);
    const users = s.lines.filter((l) => /^USER\s/i.test(l));
    assert.equal(users.length, 1, 'one USER instruction');
    const user = users[0]!.split(/\s+/)[1]!.split(':')[0]!;
    assert.ok(user !== 'root' && user !== '0', `USER ${user} is not root`);
    assert.ok(s.lines.some((l) => /^EXPOSE\s+3000(\/tcp)?$/i.test(l)), 'EXPOSE 3000');
    const hc = s.lines.find((l) => /^HEALTHCHECK\s/i.test(l));
    assert.ok(hc, 'HEALTHCHECK');
    assert.match(hc, /CMD \["node", "-e", ".*fetch\('http:\/\/127\.0\.0\.1:'.*\/health'/);
    assert.doesNotMatch(hc, /curl|wget/);
    const vol = s.lines.find((l) => /^VOLUME\s/i.test(l));
    assert.ok(vol && vol.includes('"/models"') && vol.includes('"/adapters"') && vol.includes('"/hf-home"'), 'VOLUME /models /adapters /hf-home');
    const env = envOf(s);
    assert.equal(env.get('HF_HOME'), '/hf-home', 'the Hub cache is in the volume');
    assert.equal(env.get('LORA_SERVE_HOST'), '0.0.0.0');
    assert.equal(env.get('LORA_SERVE_ADAPTER_DIR'), '/adapters');
    assert.equal(env.get('LORA_SERVE_BACKEND'), name === 'gpu' ? 'tensorflow-gpu' : '${CPU_BACKEND}');
    // The server is the ENTRYPOINT, so `docker run IMAGE --flag value` adds flags instead of replacing the command.
    assert.ok(s.lines.includes('ENTRYPOINT ["/usr/bin/tini", "--", "node", "--import", "tsx", "src/server/main.ts"]'), 'tini is PID 1 and runs the server');
    assert.ok(s.lines.includes('CMD []'), 'no default arguments');
    for (const copy of s.lines.filter((l) => /^COPY\s/i.test(l) && !/--from=/.test(l))) {
      const srcs = copy.split(/\s+/).slice(1, -1);
      for (const src of srcs) assert.ok(existsSync(join(ROOT, src)), `COPY source ${src} exists`);
    }
  });
}

test('Dockerfile webgpu: the cpu image plus the Vulkan loader and libglvnd, the NVIDIA graphics capability, non-root', () => {
  const s = stage('webgpu');
  assert.equal(s.from, 'cpu', 'the cpu image: its user, node_modules (Dawn is a dependency), health check and command');
  const apt = s.lines.find((l) => /apt-get install/.test(l)) ?? '';
  for (const pkg of ['libvulkan1', 'libglvnd0']) assert.match(apt, new RegExp(`\\b${pkg}\\b`), pkg);
  const env = envOf(s);
  assert.equal(env.get('LORA_SERVE_BACKEND'), 'webgpu');
  assert.ok(env.get('NVIDIA_DRIVER_CAPABILITIES')?.split(',').includes('graphics'), 'graphics mounts the Vulkan ICD');
  assert.equal(env.get('NVIDIA_VISIBLE_DEVICES'), 'all');
  const user = s.lines.filter((l) => /^USER\s/i.test(l)).at(-1)?.split(/\s+/)[1]?.split(':')[0];
  assert.ok(user && user !== 'root' && user !== '0', `the last USER (${user}) is not root`);
  const pkg = JSON.parse(read('package.json'));
  assert.ok(pkg.dependencies.webgpu && pkg.dependencies['@tensorflow/tfjs-backend-webgpu'], 'Dawn and the tfjs WebGPU backend are dependencies');
});

test('Dockerfile: npm start is the command the images run', () => {
  const pkg = JSON.parse(read('package.json'));
  // exec: npm's signals reach node itself, not a shell that would not pass them on.
  assert.equal(pkg.scripts.start, 'exec node --import tsx src/server/main.ts');
  for (const name of ['gpu', 'cpu']) {
    const entrypoint = stage(name).lines.find((l) => /^ENTRYPOINT\s/i.test(l))!;
    assert.deepEqual(JSON.parse(entrypoint.replace(/^ENTRYPOINT\s+/i, '')).slice(2), pkg.scripts.start.split(' ').slice(1), name);
  }
  assert.ok(pkg.dependencies.tsx, 'tsx is a runtime dependency (npm ci --omit=dev keeps it)');
});

test('.dockerignore keeps node_modules, .git, .cache and adapter folders out of the context', () => {
  const lines = read('.dockerignore').split('\n').map((l) => l.trim());
  for (const p of ['node_modules', '.git', '.cache', 'bench/results', 'adapters/*/']) assert.ok(lines.includes(p), p);
  for (const p of ['src', 'package.json', 'package-lock.json', 'tsconfig.json']) assert.ok(!lines.includes(p), `${p} stays in the context`);
});

// ------------------------------------------------------------------------------------------------
// Server environment variables used by the images and compose exist in src/cli.ts

const OPTION_ENVS = new Set(OPTIONS.map((o) => o.env));

test('every LORA_SERVE_* variable the Dockerfile and compose set is a server option', () => {
  const used = new Set<string>();
  for (const s of dockerfile.stages) for (const k of envOf(s).keys()) if (k.startsWith('LORA_SERVE_')) used.add(k);
  const compose = yaml('docker/compose.yaml');
  for (const svc of Object.values<any>(compose.services)) {
    for (const k of Object.keys(svc.environment ?? {})) if (k.startsWith('LORA_SERVE_')) used.add(k);
  }
  assert.ok(used.size >= 4);
  for (const k of used) assert.ok(OPTION_ENVS.has(k), `${k} is an option of src/cli.ts`);
});

// ------------------------------------------------------------------------------------------------
// docker/compose.yaml

const compose = yaml('docker/compose.yaml');

/** [source, target, mode] of a short-syntax volume; the source may be `${VAR:-default}`. */
function splitVolume(spec: string): string[] {
  if (spec.startsWith('${')) {
    const end = spec.indexOf('}');
    return [spec.slice(0, end + 1), ...spec.slice(end + 2).split(':')];
  }
  return spec.split(':');
}

/** Host path of a short-syntax bind mount relative to docker/, or undefined for named volumes. */
function bindSource(spec: string): string | undefined {
  const src = splitVolume(spec)[0]!;
  const def = /^\$\{\w+:-(.*)\}$/.exec(src);
  const path = def ? def[1]! : src;
  return path.startsWith('.') || path.startsWith('/') ? resolve(DOCKER, path) : undefined;
}

test('compose: services, build targets and the GPU reservation', () => {
  assert.deepEqual(Object.keys(compose.services).sort(), ['grafana', 'prometheus', 'server', 'server-cpu', 'server-webgpu']);
  const { server, 'server-cpu': cpu, 'server-webgpu': webgpu } = compose.services;
  for (const [svc, target] of [[server, 'gpu'], [cpu, 'cpu'], [webgpu, 'webgpu']] as const) {
    assert.equal(resolve(DOCKER, svc.build.context), ROOT);
    assert.ok(existsSync(join(ROOT, svc.build.dockerfile ?? 'Dockerfile')));
    assert.equal(svc.build.target, target);
    assert.ok(stage(target));
    assert.deepEqual(svc.ports, ['${LORA_SERVE_PORT_HOST:-3000}:3000']);
    assert.equal(svc.environment.LORA_SERVE_HOST, '0.0.0.0');
  }
  assert.deepEqual(server.profiles, ['gpu']);
  assert.deepEqual(cpu.profiles, ['cpu']);
  assert.deepEqual(webgpu.profiles, ['webgpu']);
  assert.equal(webgpu.environment.LORA_SERVE_BACKEND, 'webgpu');
  assert.ok(webgpu.environment.NVIDIA_DRIVER_CAPABILITIES.split(',').includes('graphics'));
  assert.equal(webgpu.deploy.resources.reservations.devices[0].driver, 'nvidia');
  assert.ok(webgpu.networks.default.aliases.includes('server'), 'prometheus finds the webgpu variant as server:3000');
  assert.equal(server.environment.LORA_SERVE_BACKEND, 'tensorflow-gpu');
  assert.equal(cpu.environment.LORA_SERVE_BACKEND, 'wasm');
  const dev = server.deploy.resources.reservations.devices[0];
  assert.equal(dev.driver, 'nvidia');
  assert.deepEqual(dev.capabilities, ['gpu']);
  assert.equal(cpu.deploy, undefined, 'the cpu variant reserves no GPU');
  assert.ok(cpu.networks.default.aliases.includes('server'), 'prometheus finds the cpu variant as server:3000');
});

test('compose: bind-mounted files and folders exist (models/adapters excepted: created on first up)', () => {
  let checked = 0;
  for (const [name, svc] of Object.entries<any>(compose.services)) {
    for (const v of svc.volumes ?? []) {
      const src = bindSource(v);
      if (!src) {
        assert.ok(splitVolume(v)[0]! in (compose.volumes ?? {}), `${name}: named volume ${v} is declared`);
        continue;
      }
      if (/\/(models|adapters)$/.test(src)) continue;
      assert.ok(existsSync(src), `${name}: ${v} -> ${src} exists`);
      checked++;
    }
  }
  assert.ok(checked >= 4);
  const mounts = (svc: string) => compose.services[svc].volumes.map((v: string) => splitVolume(v).slice(0, 2));
  assert.deepEqual(mounts('prometheus')[0], ['./prometheus/prometheus.yml', '/etc/prometheus/prometheus.yml']);
  assert.ok(compose.services.prometheus.command.includes('--config.file=/etc/prometheus/prometheus.yml'));
});

// ------------------------------------------------------------------------------------------------
// Prometheus

test('prometheus.yml scrapes server:3000/metrics every 5s', () => {
  const prom = yaml('docker/prometheus/prometheus.yml');
  const job = prom.scrape_configs.find((j: any) => j.static_configs?.some((s: any) => s.targets.includes('server:3000')));
  assert.ok(job, 'a job targets server:3000');
  assert.equal(job.metrics_path ?? '/metrics', '/metrics');
  assert.equal(job.scrape_interval, '5s');
  assert.ok(parseFloat(job.scrape_timeout ?? '10') <= 5, 'scrape_timeout <= scrape_interval');
});

// ------------------------------------------------------------------------------------------------
// Grafana

const grafanaMount = (file: string): string => {
  const v = compose.services.grafana.volumes.find((m: string) => resolve(DOCKER, splitVolume(m)[0]!) === join(DOCKER, file));
  assert.ok(v, `compose mounts docker/${file} into grafana`);
  return splitVolume(v)[1]!;
};

test('grafana provisioning: datasource, dashboard provider and the mounts agree', () => {
  const ds = yaml('docker/grafana/provisioning/datasources/prometheus.yaml').datasources;
  assert.equal(ds.length, 1);
  assert.equal(ds[0].type, 'prometheus');
  assert.equal(ds[0].uid, 'prometheus');
  assert.equal(ds[0].url, 'http://prometheus:9090');
  assert.equal(grafanaMount('grafana/provisioning/datasources/prometheus.yaml'), '/etc/grafana/provisioning/datasources/prometheus.yaml');
  const providers = yaml('docker/grafana/provisioning/dashboards/dashboards.yaml').providers;
  assert.equal(grafanaMount('grafana/provisioning/dashboards/dashboards.yaml'), '/etc/grafana/provisioning/dashboards/dashboards.yaml');
  assert.equal(providers[0].options.path, grafanaMount('grafana/dashboards'));
  const home = compose.services.grafana.environment.GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH;
  assert.equal(home, `${providers[0].options.path}/lora-serve.json`);
  assert.ok(existsSync(join(DOCKER, 'grafana/dashboards/lora-serve.json')));
});

interface Panel { id: number; type: string; title: string; datasource?: { uid: string }; targets?: { expr: string }[]; panels?: Panel[] }
const dashboard = JSON.parse(read('docker/grafana/dashboards/lora-serve.json')) as { uid: string; panels: Panel[]; templating: { list: any[] } };
const allPanels = dashboard.panels.flatMap((p) => [p, ...(p.panels ?? [])]);
const exprs = [
  ...allPanels.flatMap((p) => (p.targets ?? []).map((t) => ({ panel: p.title, expr: t.expr }))),
  ...dashboard.templating.list.map((v) => ({ panel: `$${v.name}`, expr: String(v.definition ?? '') })),
];

/** Metric names in an expression: identifiers followed by `{`, `[`, `)` or `,` or at the end, minus PromQL words. */
function metricNames(expr: string): string[] {
  const noStrings = expr.replace(/"(?:[^"\\]|\\.)*"/g, '""');
  return [...noStrings.matchAll(/\b((?:lora_serve|process|nodejs)_[a-z0-9_]+)\b/g)].map((m) => m[1]!);
}

test('dashboard: parses, unique panel ids, every query panel uses the provisioned datasource', () => {
  assert.equal(dashboard.uid, 'lora-serve');
  const ids = allPanels.map((p) => p.id);
  assert.equal(new Set(ids).size, ids.length, 'panel ids are unique');
  const queries = allPanels.filter((p) => p.type !== 'row');
  assert.ok(queries.length >= 20);
  for (const p of queries) {
    assert.equal(p.datasource?.uid, 'prometheus', p.title);
    assert.ok((p.targets ?? []).length > 0 && p.targets!.every((t) => t.expr.trim() !== ''), `${p.title} has queries`);
  }
});

test('dashboard: every lora_serve_* metric it queries is documented in docs/metrics.md', () => {
  assert.ok(existsSync(join(ROOT, 'docs/metrics.md')), 'docs/metrics.md exists');
  const documented = new Set(read('docs/metrics.md').match(/\blora_serve_[a-z0-9_]+/g) ?? []);
  assert.ok(documented.size > 0);
  const used = new Set<string>();
  for (const { panel, expr } of exprs) {
    for (const name of metricNames(expr)) {
      if (!name.startsWith('lora_serve_')) continue;
      used.add(name);
      const base = name.replace(/_(bucket|sum|count)$/, '');
      assert.ok(documented.has(name) || documented.has(base), `${panel}: ${name} is not in docs/metrics.md`);
    }
  }
  assert.ok(used.size >= 15, `the dashboard queries ${used.size} lora_serve_* series`);
});

test('dashboard: process_* and nodejs_* metrics are prom-client default collector names', () => {
  const require = createRequire(import.meta.url);
  const libDir = join(dirname(require.resolve('prom-client')), 'lib', 'metrics');
  const source = readdirSync(libDir).filter((f) => f.endsWith('.js') && statSync(join(libDir, f)).isFile())
    .map((f) => readFileSync(join(libDir, f), 'utf8')).join('\n');
  let n = 0;
  for (const { panel, expr } of exprs) {
    for (const name of metricNames(expr)) {
      if (name.startsWith('lora_serve_')) continue;
      n++;
      assert.ok(source.includes(`'${name}'`), `${panel}: ${name} is not a prom-client default metric`);
    }
  }
  assert.ok(n > 0);
});

test('dashboard: histogram quantiles read _bucket series with le', () => {
  for (const { panel, expr } of exprs) {
    for (const m of expr.matchAll(/histogram_quantile\(([^,]+),\s*sum by \(([^)]*)\) \(rate\((\w+)\{/g)) {
      assert.ok(m[2]!.split(',').map((s) => s.trim()).includes('le'), `${panel}: sum by includes le`);
      assert.match(m[3]!, /_bucket$/, `${panel}: ${m[3]} is a _bucket series`);
    }
  }
});
