import { InvalidChannelError } from './errors.js'

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

/** Throws InvalidChannelError (400) for the first name that is not a channel name. */
export function checkChannelNames (channels: Iterable<string>): void {
  for (const channel of channels) {
    if (!isChannelName(channel)) {
      throw new InvalidChannelError(`invalid channel name ${JSON.stringify(channel)}: use ${CHANNEL_NAME_RULE}`)
    }
  }
}

/**
 * A set of channel patterns where `*` matches any run of characters:
 * `*`, `orders.*`, `chat`. Matching takes time linear in the lengths of the
 * name and the patterns, whatever the stars: no regular expression, which
 * would backtrack (a claim of `*a*a*a…*b` against `aaaa…` would take
 * exponential time and block the event loop).
 */
export class ChannelPatterns {
  readonly patterns: readonly string[]
  readonly #compiled: readonly CompiledPattern[]

  constructor (patterns: Iterable<string>) {
    this.patterns = [...patterns]
    for (const pattern of this.patterns) {
      if (!CHANNEL_PATTERN.test(pattern)) {
        throw new TypeError(`invalid channel pattern "${pattern}": use ${CHANNEL_NAME_RULE}, and * as a wildcard`)
      }
    }
    this.#compiled = [...new Set(this.patterns)].map(compilePattern)
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
    return this.#compiled.some((pattern) => matchesPattern(pattern, channel))
  }

  matchesAll (channels: Iterable<string>): boolean {
    for (const channel of channels) if (!this.matches(channel)) return false
    return true
  }
}

const NO_CHANNELS = new ChannelPatterns([])

/**
 * A pattern cut at its stars: `head*middle…*tail`, or one literal when it
 * has no star. Each middle part carries its KMP failure table.
 */
interface CompiledPattern {
  readonly literal: boolean
  readonly head: string
  readonly middles: ReadonlyArray<{ text: string, failure: Int32Array }>
  readonly tail: string
}

function compilePattern (pattern: string): CompiledPattern {
  const parts = pattern.split('*')
  if (parts.length === 1) return { literal: true, head: pattern, middles: [], tail: '' }
  return {
    literal: false,
    head: parts[0] as string,
    middles: parts.slice(1, -1).filter((p) => p !== '').map((text) => ({ text, failure: failureTable(text) })),
    tail: parts[parts.length - 1] as string
  }
}

/**
 * Matches with no backtracking: the head must start the name and the tail
 * end it; between them each middle part is taken at its first occurrence
 * (taking it later never helps: what follows has less room, not more),
 * found by Knuth-Morris-Pratt, each search starting where the last ended.
 * So every character of the name is read a bounded number of times.
 */
function matchesPattern (pattern: CompiledPattern, name: string): boolean {
  if (pattern.literal) return name === pattern.head
  const { head, tail } = pattern
  if (name.length < head.length + tail.length || !name.startsWith(head) || !name.endsWith(tail)) return false
  let from = head.length
  const end = name.length - tail.length
  for (const middle of pattern.middles) {
    const at = indexOfKmp(name, middle.text, middle.failure, from, end)
    if (at < 0) return false
    from = at + middle.text.length
  }
  return true
}

/** KMP's failure table: for each prefix of `text`, its longest proper border. */
function failureTable (text: string): Int32Array {
  const failure = new Int32Array(text.length)
  let k = 0
  for (let i = 1; i < text.length; i++) {
    while (k > 0 && text[i] !== text[k]) k = failure[k - 1] as number
    if (text[i] === text[k]) k++
    failure[i] = k
  }
  return failure
}

/** Where `part` first occurs in `name[from, end)`, or -1: O(end - from + part.length). */
function indexOfKmp (name: string, part: string, failure: Int32Array, from: number, end: number): number {
  let k = 0
  for (let i = from; i < end; i++) {
    while (k > 0 && name[i] !== part[k]) k = failure[k - 1] as number
    if (name[i] === part[k]) k++
    if (k === part.length) return i - part.length + 1
  }
  return -1
}
