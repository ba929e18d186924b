// Channel names are the identifiers used in LISTEN/NOTIFY. We accept a
// conservative ASCII set so a name is the same bytes in a URL, a JWT claim,
// an SSE `event:` field and a quoted SQL identifier (63 bytes is
// PostgreSQL's NAMEDATALEN - 1).
const CHANNEL_NAME = /^[A-Za-z0-9_.:-]{1,63}$/
const CHANNEL_PATTERN = /^[A-Za-z0-9_.:*-]{1,63}$/

export const CHANNEL_NAME_RULE = '1 to 63 characters of A-Z a-z 0-9 _ . : -'

export function isChannelName (name: string): boolean {
  return CHANNEL_NAME.test(name)
}

/**
 * A set of channel patterns where `*` matches any run of characters:
 * `*`, `orders.*`, `chat`. Compiled once into one anchored regular expression.
 */
export class ChannelPatterns {
  readonly patterns: readonly string[]
  readonly #regex: RegExp | null

  constructor (patterns: Iterable<string>) {
    this.patterns = [...patterns]
    for (const pattern of this.patterns) {
      if (!CHANNEL_PATTERN.test(pattern)) {
        throw new TypeError(`invalid channel pattern "${pattern}": use ${CHANNEL_NAME_RULE}, and * as a wildcard`)
      }
    }
    this.#regex = this.patterns.length === 0
      ? null
      : new RegExp(`^(?:${this.patterns.map(patternSource).join('|')})$`)
  }

  /** Reads a comma-separated list such as `PUBLIC_CHANNELS`. */
  static parse (list: string): ChannelPatterns {
    return new ChannelPatterns(list.split(',').map((p) => p.trim()).filter((p) => p !== ''))
  }

  /** Reads a JWT claim; anything but an array of strings allows nothing. */
  static fromClaim (claim: unknown): ChannelPatterns {
    if (!Array.isArray(claim)) return NO_CHANNELS
    const strings = claim.filter((p): p is string => typeof p === 'string' && CHANNEL_PATTERN.test(p))
    return new ChannelPatterns(strings)
  }

  matches (channel: string): boolean {
    return this.#regex !== null && this.#regex.test(channel)
  }

  matchesAll (channels: Iterable<string>): boolean {
    for (const channel of channels) if (!this.matches(channel)) return false
    return true
  }
}

const NO_CHANNELS = new ChannelPatterns([])

function patternSource (pattern: string): string {
  // Only `.` and `*` among the allowed characters mean something in a regex;
  // `-` means nothing outside a character class.
  return pattern.replace(/\./g, '\\.').replace(/\*/g, '.*')
}
