/**
 * The reliability scenarios of `npm run soak` (bench/soak/), in their short versions: each starts the real server,
 * runs its scenario over HTTP and must meet its criterion. The long versions and their figures are `npm run soak`'s.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { SCENARIOS } from '../bench/soak/run.ts';

for (const scenario of SCENARIOS) {
  test(`soak, short: ${scenario.name}`, { timeout: 300_000 }, async () => {
    const workDir = mkdtempSync(join(tmpdir(), 'lora-serve-soak-test-'));
    try {
      const r = await scenario.run({ size: 'short', workDir, log: () => {} });
      assert.ok(r.passed, `${r.name}: ${r.criterion}\nfigures: ${JSON.stringify(r.figures)}\nnotes:\n${(r.notes ?? []).join('\n')}`);
    } finally {
      rmSync(workDir, { recursive: true, force: true });
    }
  });
}
