// Latency histogram: fixed-width buckets, cheap enough to record every delivery.

export const BUCKET_MS = 0.05
export const BUCKETS = 600_000 // 30 s

export function newHistogram (): Uint32Array {
  return new Uint32Array(BUCKETS)
}

export function record (histogram: Uint32Array, ms: number, count = 1): void {
  const bucket = ms <= 0 ? 0 : Math.min(BUCKETS - 1, Math.floor(ms / BUCKET_MS))
  histogram[bucket] = (histogram[bucket] as number) + count
}

export function merge (into: Uint32Array, from: Uint32Array): void {
  for (let i = 0; i < from.length; i++) into[i] = (into[i] as number) + (from[i] as number)
}

/** The value below which `q` of the recorded samples fall, in ms. */
export function quantile (histogram: Uint32Array, q: number): number {
  let total = 0
  for (const n of histogram) total += n
  if (total === 0) return NaN
  const rank = Math.ceil(q * total)
  let seen = 0
  for (let i = 0; i < histogram.length; i++) {
    seen += histogram[i] as number
    if (seen >= rank) return (i + 1) * BUCKET_MS
  }
  return NaN
}

/** Wall-clock milliseconds with sub-ms precision, comparable across threads and processes. */
export function now (): number {
  return performance.timeOrigin + performance.now()
}
