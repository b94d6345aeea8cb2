/**
 * Admin storms under load: an adapter id replaced over and over with alternating versions, or deleted and uploaded
 * again, while clients generate on it and on other adapters. Every answer is compared with the solo answers.
 */
import { adapterBytes, freshDir, loop, placeAdapter, PROMPTS, SoakClient, SoloAnswers, startSoakServer, type Answer } from './harness.ts';
import { sleep, Violations, type Scenario, type ScenarioContext } from './scenario.ts';

const CLIENTS = 16;
const seconds = (ctx: ScenarioContext) => (ctx.size === 'short' ? 4 : 60);

/** Counts of answers by status (`200`, `404 ADAPTER_NOT_FOUND`, `transport failure`). */
function tallyStatus(tally: Record<string, number>, a: Answer): void {
  const key = a.status === 0 ? 'transport failures' : a.status === 200 ? 'answers 200' : `answers ${a.status} ${a.code ?? '(no code)'}`;
  tally[key] = (tally[key] ?? 0) + 1;
}

export const replaceStorm: Scenario = {
  name: 'replace storm',
  criterion: 'one id re-uploaded with alternating versions while 16 clients generate on it and on 2 other adapters: every 200 equals the solo answer of one whole version of the adapter asked (never another adapter\'s, a mixture or the base); no 5xx, no other status; every upload 200',
  async run(ctx) {
    const v = new Violations();
    const dir = await freshDir(ctx.workDir, 'replace-storm');
    const [v1, v2, a, b] = await Promise.all([101, 102, 201, 202].map((seed) => adapterBytes(ctx.workDir, { seed })));
    await placeAdapter(dir, 'storm', v1!);
    await placeAdapter(dir, 'other-a', a!);
    await placeAdapter(dir, 'other-b', b!);
    const server = await startSoakServer(ctx, 'replace-storm', dir);
    const client = new SoakClient(server.api.url);
    try {
      const solo = new SoloAnswers();
      await solo.record(client, 'base', null);
      await solo.record(client, 'other-a', 'other-a');
      await solo.record(client, 'other-b', 'other-b');
      await solo.record(client, 'storm@v1', 'storm');
      v.check((await client.upload('storm', v2!)).status === 200, 'setup', () => 'upload of v2 failed');
      await solo.record(client, 'storm@v2', 'storm');
      for (const c of solo.collisions(['base', 'other-a', 'other-b', 'storm@v1', 'storm@v2'])) v.add('indistinguishable solo answers', c);

      const tally: Record<string, number> = {};
      const versions = { v1: 0, v2: 0 };
      let uploads = 0;
      const end = performance.now() + seconds(ctx) * 1000;
      const done = () => performance.now() > end;
      const uploader = (async () => {
        while (!done()) {
          const r = await client.upload('storm', uploads % 2 === 0 ? v1! : v2!);
          v.check(r.status === 200, 'upload not 200', () => `${r.status} ${r.code ?? r.failure ?? ''}`);
          uploads++;
        }
      })();
      await loop(CLIENTS, done, async (w, i) => {
        const prompt = PROMPTS[i % PROMPTS.length]!;
        const adapter = w % 4 === 3 ? (i % 2 ? 'other-a' : 'other-b') : 'storm';
        const ans = await client.generate(prompt, adapter, { stream: i % 3 === 0 });
        tallyStatus(tally, ans);
        if (!v.check(ans.status === 200 && ans.code === undefined, ans.status >= 500 ? '5xx' : 'not a 200', () => `${adapter}: ${ans.status} ${ans.code ?? ans.failure ?? ''}`)) return;
        const labels = solo.labelsOf(prompt, ans.text!);
        if (adapter === 'storm') {
          if (labels.includes('storm@v1')) versions.v1++;
          else if (labels.includes('storm@v2')) versions.v2++;
          else v.add('wrong answer', `storm on "${prompt}": ${JSON.stringify(ans.text)} is ${labels.length ? labels.join(', ') : 'no solo answer (a mixture?)'}`);
        } else {
          v.check(labels.includes(adapter), 'wrong answer', () => `${adapter} on "${prompt}": ${JSON.stringify(ans.text)} is ${labels.join(', ') || 'no solo answer'}`);
        }
      });
      await uploader;
      v.check(versions.v1 > 0 && versions.v2 > 0, 'one version never served', () => JSON.stringify(versions));
      return v.result(this, { seconds: seconds(ctx), clients: CLIENTS, uploads, 'storm answers on v1': versions.v1, 'storm answers on v2': versions.v2, ...tally });
    } finally {
      await client.close();
      await server.stop();
    }
  },
};

export const deleteStorm: Scenario = {
  name: 'delete/re-upload storm',
  criterion: 'one id deleted and uploaded again in a loop while 16 clients generate on it: every answer is a coded 404 (ADAPTER_NOT_FOUND) or the solo answer; nothing else; admin calls never 5xx',
  async run(ctx) {
    const v = new Violations();
    const dir = await freshDir(ctx.workDir, 'delete-storm');
    const files = await adapterBytes(ctx.workDir, { seed: 301 });
    await placeAdapter(dir, 'flip', files);
    const server = await startSoakServer(ctx, 'delete-storm', dir);
    const client = new SoakClient(server.api.url);
    try {
      const solo = new SoloAnswers();
      await solo.record(client, 'base', null);
      await solo.record(client, 'flip', 'flip');
      for (const c of solo.collisions(['base', 'flip'])) v.add('indistinguishable solo answers', c);

      const tally: Record<string, number> = {};
      const admin: Record<string, number> = {};
      const end = performance.now() + seconds(ctx) * 1000;
      const done = () => performance.now() > end;
      const churn = (async () => {
        while (!done()) {
          // Each state lasts a few hundred milliseconds, so that requests under load see both.
          for (const op of [() => client.remove('flip'), () => client.upload('flip', files)]) {
            const r = await op();
            const key = `${r.status}${r.code ? ` ${r.code}` : ''}`;
            admin[key] = (admin[key] ?? 0) + 1;
            v.check(r.status > 0 && r.status < 500, 'admin 5xx or failure', () => `${r.status} ${r.code ?? r.failure ?? ''}`);
            await sleep(200 + Math.random() * 400);
          }
        }
      })();
      await loop(CLIENTS, done, async (w, i) => {
        const prompt = PROMPTS[i % PROMPTS.length]!;
        const ans = await client.generate(prompt, 'flip', { stream: i % 3 === 0 });
        tallyStatus(tally, ans);
        if (ans.status === 404 && ans.code === 'ADAPTER_NOT_FOUND') return;
        if (!v.check(ans.status === 200 && ans.code === undefined, 'neither 404 nor 200', () => `${ans.status} ${ans.code ?? ans.failure ?? ''}`)) return;
        v.check(ans.text === solo.get('flip', prompt), 'wrong answer', () => `"${prompt}": ${JSON.stringify(ans.text)} is ${solo.labelsOf(prompt, ans.text!).join(', ') || 'no solo answer'}`);
      });
      await churn;
      v.check((tally['answers 200'] ?? 0) > 0 && (tally['answers 404 ADAPTER_NOT_FOUND'] ?? 0) > 0, 'storm did not mix 200s and 404s', () => JSON.stringify(tally));
      return v.result(this, { seconds: seconds(ctx), clients: CLIENTS, ...tally, ...Object.fromEntries(Object.entries(admin).map(([k, n]) => [`admin ${k}`, n])) });
    } finally {
      await client.close();
      await server.stop();
    }
  },
};
