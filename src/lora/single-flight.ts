/** `start()`'s promise, shared by every caller asking for `key` until it settles: one operation per key at a time. */
export function singleFlight<K, T>(inFlight: Map<K, Promise<T>>, key: K, start: () => Promise<T>): Promise<T> {
  let p = inFlight.get(key);
  if (!p) {
    p = start().finally(() => inFlight.delete(key));
    inFlight.set(key, p);
  }
  return p;
}
