/**
 * Counts failed authentication attempts (a token that does not verify, a
 * ticket unknown, spent or expired) per client address in fixed windows, so
 * that an address that keeps guessing is refused before its guesses cost
 * anything: a ticket is checked with a DELETE in the database, a token with
 * a signature check. Instances do not share counts.
 *
 * Memory is bounded: expired windows are swept as new failures come, and
 * past `maxAddresses` the oldest window is forgotten (an address spreading
 * its guesses over that many others wins itself a fresh count, no more).
 */
export class FailedAttempts {
  readonly max: number
  readonly windowMs: number
  readonly maxAddresses: number
  // Kept in the order their windows started (a window that restarts is
  // re-inserted), so the expired ones are always at the front.
  readonly #windows = new Map<string, { failures: number, startedAt: number }>()

  /**
   * @param max failures an address may have in a window; the next attempt is refused
   * @param windowMs length of a window, in milliseconds
   * @param maxAddresses addresses remembered at most
   */
  constructor (max: number, windowMs: number, maxAddresses = 100_000) {
    this.max = max
    this.windowMs = windowMs
    this.maxAddresses = maxAddresses
  }

  /**
   * Seconds until `address` may try again (at least 1), or 0 while it has
   * failures left in its window.
   */
  retryAfter (address: string, now = Date.now()): number {
    const window = this.#windows.get(address)
    if (window === undefined || window.failures < this.max) return 0
    const left = window.startedAt + this.windowMs - now
    return left > 0 ? Math.ceil(left / 1000) : 0
  }

  /** Counts one failed attempt of `address`. */
  fail (address: string, now = Date.now()): void {
    this.#sweep(now)
    const window = this.#windows.get(address)
    if (window !== undefined) {
      window.failures++
      return
    }
    if (this.#windows.size >= this.maxAddresses) {
      const oldest = this.#windows.keys().next()
      if (oldest.done !== true) this.#windows.delete(oldest.value)
    }
    this.#windows.set(address, { failures: 1, startedAt: now })
  }

  /** Addresses with a window in force (or not swept yet). */
  get size (): number {
    return this.#windows.size
  }

  #sweep (now: number): void {
    for (const [address, window] of this.#windows) {
      if (window.startedAt + this.windowMs > now) return
      this.#windows.delete(address)
    }
  }
}
