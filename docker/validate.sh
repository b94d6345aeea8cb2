#!/usr/bin/env bash
# Static validation of the container and monitoring files; needs no Docker engine.
#
#   bash docker/validate.sh
#
# 1. test/docker.test.ts (node:test): Dockerfile stages (non-root USER, HEALTHCHECK, EXPOSE 3000, CUDA
#    11.x + cuDNN 8 base), compose references, prometheus.yml target, Grafana provisioning, and every
#    metric the dashboard queries exists in docs/metrics.md / prom-client's defaults. Needs node_modules.
# 2. promtool (Debian: apt-get install -y prometheus), when on PATH: `promtool check config` of
#    docker/prometheus/prometheus.yml, and `promtool check rules` over every dashboard expression
#    (written as recording rules, Grafana variables substituted) so PromQL syntax errors are caught.
# 3. `docker compose config` (Compose v2) or `docker-compose config` (1.x, Debian: docker-compose),
#    when installed, for each profile (gpu, cpu, webgpu).
# 4. hadolint on the Dockerfile, when on PATH; `docker build --check` when a Docker engine answers.
# Missing tools are skipped with a message; any failing check makes the script exit non-zero.
set -uo pipefail
cd "$(dirname "$0")/.."

failed=0
run() {
  local name=$1; shift
  echo "== $name"
  if "$@"; then echo "-- ok: $name"; else echo "-- FAILED: $name"; failed=1; fi
}
skip() { echo "== $1"; echo "-- skipped: $2"; }

run "node test: test/docker.test.ts" node --import tsx --test test/docker.test.ts

if command -v promtool >/dev/null 2>&1; then
  run "promtool check config docker/prometheus/prometheus.yml" promtool check config docker/prometheus/prometheus.yml
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  # JSON is YAML: one recording rule per dashboard query, with Grafana's macros replaced.
  node -e '
    const d = JSON.parse(require("fs").readFileSync("docker/grafana/dashboards/lora-serve.json", "utf8"));
    const rules = [];
    const walk = (ps) => { for (const p of ps) { walk(p.panels ?? []);
      for (const t of p.targets ?? []) rules.push({ record: `lora_serve_dashboard:panel_${p.id}_${t.refId}`,
        expr: t.expr.replaceAll("$__rate_interval", "1m").replaceAll("$__interval", "1m").replaceAll("$instance", ".*") }); } };
    walk(d.panels);
    process.stdout.write(JSON.stringify({ groups: [{ name: "dashboard", rules }] }, null, 2));
    process.stderr.write(`${rules.length} dashboard expressions\n`);
  ' > "$tmp/dashboard-rules.yml" || failed=1
  run "promtool check rules (dashboard expressions)" promtool check rules "$tmp/dashboard-rules.yml"
else
  skip "promtool" "promtool not on PATH (Debian/Ubuntu: apt-get install -y prometheus)"
fi

compose=()
if docker compose version >/dev/null 2>&1; then
  compose=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
  compose=(docker-compose)
fi
if [ ${#compose[@]} -gt 0 ]; then
  for profile in gpu cpu webgpu; do
    run "${compose[*]} config --profile $profile" "${compose[@]}" -f docker/compose.yaml --profile "$profile" config -q
  done
else
  skip "docker compose config" "neither the docker compose plugin nor docker-compose is installed"
fi

if command -v hadolint >/dev/null 2>&1; then
  run "hadolint Dockerfile" hadolint --ignore DL3008 --ignore DL3059 Dockerfile
else
  skip "hadolint" "hadolint not on PATH"
fi

if docker info >/dev/null 2>&1; then
  for target in cpu gpu; do
    run "docker build --check --target $target" docker build --check --target "$target" .
  done
else
  skip "docker build --check" "no Docker engine answers (nothing is built here)"
fi

if [ "$failed" -ne 0 ]; then
  echo "docker/validate.sh: FAILED"
  exit 1
fi
echo "docker/validate.sh: all checks that could run passed"
