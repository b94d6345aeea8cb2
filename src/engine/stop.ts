/**
 * Stop sequences over streamed text.
 *
 * The matcher holds back the longest suffix of the text that could still grow into a stop
 * sequence, so streamed text never shows part of a stop that then completes. When a stop
 * completes, generation ends and the text before it is emitted.
 *
 * Inclusion: by default the stop sequence is excluded from the output, as OpenAI and vLLM do.
 * TGI keeps it (its `StopSequenceCriteria` only tests that the decoded output ends with the
 * stop, and `generated_text` is the decode of every generated token); pass
 * `{ includeStop: true }` for that behaviour.
 *
 * When several stops complete in the same chunk, the one that completes first in the text
 * wins (on a tie, the one starting first, i.e. the longest).
 */
export interface StopResult {
  /** Text that is now safe to show. */
  emit: string;
  /** A stop sequence completed: generation must end. */
  stopped: boolean;
  /** The stop sequence that completed. */
  matched?: string;
}

export class StopMatcher {
  private readonly stops: readonly string[];
  private readonly includeStop: boolean;
  private readonly maxLen: number;
  private pending = '';
  private done = false;

  constructor(stops: string[], opts: { includeStop?: boolean } = {}) {
    this.stops = [...new Set(stops.filter((s) => s.length > 0))];
    this.includeStop = opts.includeStop ?? false;
    this.maxLen = this.stops.reduce((m, s) => Math.max(m, s.length), 0);
  }

  get stopped(): boolean {
    return this.done;
  }

  /** Feed newly decoded text. After a stop, further text is ignored. */
  push(newText: string): StopResult {
    if (this.done) return { emit: '', stopped: true };
    if (this.stops.length === 0) return { emit: newText, stopped: false };
    const buf = this.pending + newText;

    let best: { at: number; end: number; stop: string } | null = null;
    for (const stop of this.stops) {
      const at = buf.indexOf(stop);
      if (at < 0) continue;
      const end = at + stop.length;
      if (best === null || end < best.end || (end === best.end && at < best.at)) best = { at, end, stop };
    }
    if (best !== null) {
      this.done = true;
      this.pending = '';
      return { emit: buf.slice(0, this.includeStop ? best.end : best.at), stopped: true, matched: best.stop };
    }

    const hold = this.heldSuffixLength(buf);
    this.pending = buf.slice(buf.length - hold);
    return { emit: buf.slice(0, buf.length - hold), stopped: false };
  }

  /** At the end of generation (no stop matched): the held-back text, which is ordinary output. */
  flush(): string {
    const rest = this.pending;
    this.pending = '';
    return rest;
  }

  /** Length of the longest suffix of `buf` that is a proper prefix of some stop sequence. */
  private heldSuffixLength(buf: string): number {
    for (let k = Math.min(buf.length, this.maxLen - 1); k > 0; k--) {
      const tail = buf.slice(buf.length - k);
      if (this.stops.some((s) => s.length > k && s.startsWith(tail))) return k;
    }
    return 0;
  }
}
