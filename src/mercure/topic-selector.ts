import { RE2JS } from 're2js'
import { URLPattern } from 'urlpattern-polyfill/urlpattern'

/*
 * Topic selectors: which topics a subscriber asks for, and which a token
 * allows to publish or to read privately.
 *
 * - `legacy` (draft-07, the `topic=` parameter and the `mercure` claim):
 *   `*`, the topic itself, or an RFC 6570 URI template the topic expands from.
 * - `exact` (Mercure 1.0, `match=`, `match_exact=`): `*` or the topic itself,
 *   byte for byte.
 * - `urlpattern` (Mercure 1.0, `match_urlpattern=`): `*` or a WHATWG URL
 *   Pattern, relative ones and relative topics resolved against the hub's URL.
 *
 * Matching runs in bounded time whatever the selector and the topic:
 * - a URL pattern compiles to one regular expression per URL component, and
 *   JavaScript's engine backtracks on them (`/:a:b:c:d/x` against a path of
 *   1,000 characters takes 23 s in urlpattern-polyfill). We let the polyfill
 *   parse and compile the pattern (so the expressions are the standard's),
 *   and run the expressions with re2js, whose time is linear in the topic;
 * - a URI template becomes one regular expression too (what each operator
 *   may expand to, uriTemplateExpression), run by re2js. Hand-written
 *   because the RFC 6570 libraries for JavaScript either match with
 *   backtracking regular expressions (uri-template-lite, with
 *   backreferences RE2 refuses) or scan for the first occurrence of each
 *   literal part (uri-templates), which cannot match adjacent expressions
 *   such as Mercure's own `/.well-known/mercure/subscriptions{/topic}{/subscriber}`;
 * - selectors are at most `maxSelectorLength` characters.
 *
 * Each compiled selector remembers its answers (bounded), and selectors are
 * compiled once per (type, value) for the whole process: subscribers with the
 * same selectors share both.
 */

export type SelectorType = 'legacy' | 'exact' | 'urlpattern'

export interface TopicSelector {
  readonly type: SelectorType
  readonly value: string
}

/** A selector the matcher refused (invalid URL pattern or template, too long). */
export class InvalidSelectorError extends Error {
  override name = 'InvalidSelectorError'
}

/** The URL components a URL pattern matches, in the order the polyfill compiles them. */
const COMPONENTS = ['protocol', 'username', 'password', 'hostname', 'port', 'pathname', 'search', 'hash'] as const

type Components = Record<typeof COMPONENTS[number], string>

function urlComponents (url: URL): Components {
  return {
    protocol: url.protocol.slice(0, -1),
    username: url.username,
    password: url.password,
    hostname: url.hostname,
    port: url.port,
    pathname: url.pathname,
    search: url.search.slice(1),
    hash: url.hash.slice(1)
  }
}

const NativeRegExp = RegExp

/**
 * The regular expressions (source texts) urlpattern-polyfill builds for a
 * pattern, one per component. The polyfill keeps them private, so we watch
 * it build them: `RegExp` is swapped, for the length of one synchronous
 * constructor call, for a proxy that records each source. When given a
 * protocol, the constructor string parser compiles the protocol once more
 * to tell special schemes: the components are the last eight.
 */
function compileUrlPattern (pattern: string, baseUrl: string): RE2JS[] {
  const sources: string[] = []
  globalThis.RegExp = new Proxy(NativeRegExp, {
    construct (target, args: [string, string?]) {
      sources.push(String(args[0]))
      return Reflect.construct(target, args) as RegExp
    }
  })
  try {
    // eslint-disable-next-line no-new
    new URLPattern(pattern, baseUrl)
  } catch {
    throw new InvalidSelectorError('not a valid URL pattern')
  } finally {
    globalThis.RegExp = NativeRegExp
  }
  if (sources.length < COMPONENTS.length) throw new InvalidSelectorError('not a valid URL pattern')
  try {
    return sources.slice(-COMPONENTS.length).map((source) => RE2JS.compile(source))
  } catch {
    // Backreferences and lookarounds in a custom group: RE2 has neither.
    throw new InvalidSelectorError('a URL pattern\'s regular expression groups may not use backreferences or lookarounds')
  }
}

/** A selector compiled once, with the answers it gave (bounded). */
export class CompiledSelector implements TopicSelector {
  readonly type: SelectorType
  readonly value: string
  readonly #test: (topic: string) => boolean
  readonly #answers = new Map<string, boolean>()
  readonly #maxAnswers: number

  constructor (selector: TopicSelector, test: (topic: string) => boolean, maxAnswers: number) {
    this.type = selector.type
    this.value = selector.value
    this.#test = test
    this.#maxAnswers = maxAnswers
  }

  /** Whether the topic matches; computed once per topic while remembered. */
  matches (topic: string): boolean {
    let answer = this.#answers.get(topic)
    if (answer === undefined) {
      answer = this.#test(topic)
      // Forgetting all at once is cheaper than an LRU, and the working set
      // (the topics being published now) comes back at once.
      if (this.#answers.size >= this.#maxAnswers) this.#answers.clear()
      this.#answers.set(topic, answer)
    }
    return answer
  }
}

export interface TopicMatcherOptions {
  /** The hub's URL, against which relative URL patterns and topics resolve. */
  hubUrl: string
  /** The longest selector, in characters (default 2,048). */
  maxSelectorLength?: number
  /** Compiled selectors kept (default 10,000). */
  maxSelectors?: number
  /** Topic answers each compiled selector keeps (default 1,000). */
  maxAnswersPerSelector?: number
}

const ALL: (topic: string) => boolean = () => true

/** Compiles selectors (once per type and value) and matches topics against them. */
export class TopicMatcher {
  readonly hubUrl: string
  readonly #maxSelectorLength: number
  readonly #maxSelectors: number
  readonly #maxAnswers: number
  readonly #compiled = new Map<string, CompiledSelector>()

  constructor (options: TopicMatcherOptions) {
    this.hubUrl = new URL(options.hubUrl).href
    this.#maxSelectorLength = options.maxSelectorLength ?? 2048
    this.#maxSelectors = options.maxSelectors ?? 10_000
    this.#maxAnswers = options.maxAnswersPerSelector ?? 1000
  }

  /** Compiles a selector, or returns it compiled; throws InvalidSelectorError. */
  compile (selector: TopicSelector): CompiledSelector {
    const key = `${selector.type}\u0000${selector.value}`
    const known = this.#compiled.get(key)
    if (known !== undefined) return known
    if (selector.value.length > this.#maxSelectorLength) {
      throw new InvalidSelectorError(`a topic selector may have at most ${this.#maxSelectorLength} characters`)
    }
    const compiled = new CompiledSelector(selector, this.#tester(selector), this.#maxAnswers)
    if (this.#compiled.size >= this.#maxSelectors) this.#compiled.clear()
    this.#compiled.set(key, compiled)
    return compiled
  }

  /** Whether any of the topics matches any of the selectors. */
  matchesAny (selectors: readonly CompiledSelector[], topics: readonly string[]): boolean {
    for (const selector of selectors) {
      for (const topic of topics) if (selector.matches(topic)) return true
    }
    return false
  }

  #tester ({ type, value }: TopicSelector): (topic: string) => boolean {
    // `*` is the wildcard in every generation, whatever the matcher type.
    if (value === '*') return ALL
    if (type === 'exact') return (topic) => topic === value
    if (type === 'urlpattern') return this.#urlPatternTester(value)
    return legacyTester(value)
  }

  #urlPatternTester (pattern: string): (topic: string) => boolean {
    const expressions = compileUrlPattern(pattern, this.hubUrl)
    const hubUrl = this.hubUrl
    return (topic) => {
      let components: Components
      try {
        components = urlComponents(new URL(topic, hubUrl))
      } catch {
        // A topic that is no URL reference matches no URL pattern.
        return false
      }
      return COMPONENTS.every((name, i) => (expressions[i] as RE2JS).matches(components[name]))
    }
  }
}

// RFC 6570, Appendix A: for each operator, what an expansion starts with,
// what separates its items, whether items are named (`name=value`), and
// whether values may hold reserved characters unencoded.
const OPERATORS: Record<string, { first: string, separator: string, named: boolean, reserved: boolean }> = {
  '': { first: '', separator: ',', named: false, reserved: false },
  '+': { first: '', separator: ',', named: false, reserved: true },
  '#': { first: '#', separator: ',', named: false, reserved: true },
  '.': { first: '.', separator: '.', named: false, reserved: false },
  '/': { first: '/', separator: '/', named: false, reserved: false },
  ';': { first: ';', separator: ';', named: true, reserved: false },
  '?': { first: '?', separator: '&', named: true, reserved: false },
  '&': { first: '&', separator: '&', named: true, reserved: false }
}
const VARSPEC = /^(?:[A-Za-z0-9_.]|%[0-9A-Fa-f]{2})+(?::[1-9][0-9]{0,3}|\*)?$/
const UNRESERVED = 'A-Za-z0-9\\-._~'
const RESERVED = ':/?#\\[\\]@!$&\'()*+,;='
const PCT_ENCODED = '%[0-9A-Fa-f]{2}'

function escapeRegExp (text: string): string {
  return text.replace(/[\\^$.*+?()[\]{}|/-]/g, (c) => `\\${c}`)
}

/**
 * The regular expression (RE2 syntax) of every URI a template expands to:
 * its literal parts as they are, each expression as any run of items its
 * operator may produce (lists and exploded values included). Undefined
 * variables expand to nothing, so each expression may be empty. Throws
 * InvalidSelectorError for a template RFC 6570 does not allow.
 */
export function uriTemplateExpression (template: string): string {
  let expression = '^'
  let at = 0
  while (at < template.length) {
    const open = template.indexOf('{', at)
    const literalEnd = open === -1 ? template.length : open
    const literal = template.slice(at, literalEnd)
    if (literal.includes('}')) throw new InvalidSelectorError('not a valid URI template')
    expression += escapeRegExp(literal)
    if (open === -1) break
    const close = template.indexOf('}', open)
    if (close === -1) throw new InvalidSelectorError('not a valid URI template')
    const body = template.slice(open + 1, close)
    const operator = OPERATORS[body.charAt(0)] === undefined || body.charAt(0) === '' ? '' : body.charAt(0)
    const { first, separator, named, reserved } = OPERATORS[operator] as typeof OPERATORS['']
    const varspecs = body.slice(operator.length).split(',')
    if (varspecs.some((varspec) => !VARSPEC.test(varspec))) throw new InvalidSelectorError('not a valid URI template')
    // Values: the characters the operator leaves unencoded, the separators
    // of lists (`,`) and of exploded pairs (`=`), and percent-encodings.
    const value = `(?:[${UNRESERVED}${reserved ? RESERVED : ',='}]|${PCT_ENCODED})*`
    const item = named ? `(?:[${UNRESERVED}]|${PCT_ENCODED})+(?:=${value})?` : value
    expression += `(?:${escapeRegExp(first)}${item}(?:${escapeRegExp(separator)}${item})*)?`
    at = close + 1
  }
  return expression + '$'
}

// A draft-07 selector: the topic itself, or a URI template it expands from
// (matched in linear time by re2js, on the expression above).
function legacyTester (selector: string): (topic: string) => boolean {
  let template: RE2JS | undefined
  try {
    if (selector.includes('{')) template = RE2JS.compile(uriTemplateExpression(selector))
  } catch {
    // Not a valid URI template: the draft matches it as a plain string.
  }
  if (template === undefined) return (topic) => topic === selector
  const expression = template
  return (topic) => topic === selector || expression.matches(topic)
}
