/**
 * How long to wait before reconnecting after `failures` failed attempts in a
 * row: "full jitter" exponential backoff, a uniform draw from 0 up to
 * `baseMs` × 2^failures, capped at `maxMs` (milliseconds). The jitter keeps
 * instances that lost the same server from coming back in step.
 * `random` is Math.random by default; a test passes its own.
 */
export function reconnectDelay (failures: number, baseMs: number, maxMs: number, random: () => number = Math.random): number {
  return random() * Math.min(maxMs, baseMs * 2 ** failures)
}

export interface LivenessOptions {
  /** How often `check` runs (ms). */
  intervalMs: number
  /** How long one check may take before the connection is deemed dead (ms). */
  timeoutMs: number
}

/**
 * Runs `check` every `intervalMs`, one at a time, each bounded by
 * `timeoutMs`; a check that throws or takes longer calls `onDead` with the
 * reason. A half-open connection fires no error of its own: only a query
 * that gets no answer tells. Returns the function that stops watching.
 */
export function watchLiveness (check: () => Promise<void>, options: LivenessOptions, onDead: (err: Error) => void): () => void {
  // One check at a time: with an interval shorter than the timeout, checks
  // would otherwise pile up as concurrent queries on a silent connection
  // (which pg deprecates) until the first one times out.
  let checking = false
  const timer = setInterval(() => {
    if (checking) return
    checking = true
    let timeout: NodeJS.Timeout | undefined
    const late = new Promise<never>((_resolve, reject) => {
      timeout = setTimeout(() => reject(new Error(`liveness query took over ${options.timeoutMs} ms`)), options.timeoutMs)
    })
    Promise.race([check(), late])
      .catch((err: Error) => onDead(err))
      .finally(() => {
        clearTimeout(timeout)
        checking = false
      })
  }, options.intervalMs)
  timer.unref()
  return () => clearInterval(timer)
}
