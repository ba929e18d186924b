import { TooManyRequestsError, UnavailableError } from './errors.js'

/**
 * Counts the live streams of this instance, in total and per client
 * address, so that one client cannot take every socket and the instance
 * cannot be opened past what it can serve. Instances do not share counts.
 */
export class StreamLimits {
  readonly maxPerAddress: number
  readonly maxTotal: number
  readonly #perAddress = new Map<string, number>()
  #total = 0

  constructor (maxPerAddress: number, maxTotal: number) {
    this.maxPerAddress = maxPerAddress
    this.maxTotal = maxTotal
  }

  get total (): number {
    return this.#total
  }

  count (address: string): number {
    return this.#perAddress.get(address) ?? 0
  }

  /**
   * Counts one more stream of `address`, or throws 429 (this address has
   * its share) or 503 (the instance is full). Returns the release, which
   * may be called any number of times.
   */
  acquire (address: string): () => void {
    const mine = this.count(address)
    if (mine >= this.maxPerAddress) {
      throw new TooManyRequestsError(`at most ${this.maxPerAddress} streams per client address: close one first`)
    }
    if (this.#total >= this.maxTotal) {
      throw new UnavailableError('this gateway serves as many streams as it can: retry shortly')
    }
    this.#perAddress.set(address, mine + 1)
    this.#total++
    let released = false
    return () => {
      if (released) return
      released = true
      this.#total--
      const left = this.count(address) - 1
      if (left > 0) this.#perAddress.set(address, left)
      else this.#perAddress.delete(address)
    }
  }
}
