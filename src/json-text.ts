// JSON bodies are parsed by JSON.parse, which turns every number into a
// float: 12345678901234567890 becomes 12345678901234567000 and 1e400
// Infinity (then null once written back). What the gateway publishes must be
// the client's own JSON text, so one linear, iterative pass over the text
// (already known valid) finds where the values to publish lie, checks the
// nesting depth and refuses prototype keys, with no recursion to overflow.

/** Why a JSON text was refused; its message is written for the client. */
export class JsonTextError extends Error {
  override name = 'JsonTextError'
}

/** Members to capture: `{"<list>": [{"<member>": VALUE}, …]}` at the top. */
export interface JsonCapture {
  readonly list: string
  readonly member: string
}

export interface JsonScan {
  /**
   * With a capture, the compact text of `list[i].member` for each i that has
   * one (the last, if a key repeats, as JSON.parse keeps the last).
   */
  readonly captured: Array<string | undefined>
}

const OBJECT = 0
const ARRAY = 1

interface Frame {
  readonly kind: typeof OBJECT | typeof ARRAY
  /** The key this container is the value of, in its parent object. */
  readonly under: string | undefined
  /** The current key (objects) or index (arrays). */
  key: string | undefined
  index: number
  expectKey: boolean
}

const QUOTE = 0x22
const BACKSLASH = 0x5c

function isWhitespace (code: number): boolean {
  return code === 0x20 || code === 0x0a || code === 0x0d || code === 0x09
}

/** The index of the quote that closes the string opened at `open`. */
function stringEnd (text: string, open: number): number {
  let from = open + 1
  for (;;) {
    const quote = text.indexOf('"', from)
    if (quote < 0) throw new JsonTextError('the body is not valid JSON')
    let before = quote - 1
    while (text.charCodeAt(before) === BACKSLASH) before--
    // An even run of backslashes escapes itself, not the quote.
    if ((quote - 1 - before) % 2 === 0) return quote
    from = quote + 1
  }
}

/** `text[start, end)` without the whitespace between tokens. */
export function compactJson (text: string, start: number, end: number): string {
  let out = ''
  let run = start
  for (let i = start; i < end; i++) {
    const code = text.charCodeAt(i)
    if (code === QUOTE) {
      i = stringEnd(text, i)
    } else if (isWhitespace(code)) {
      out += text.slice(run, i)
      run = i + 1
    }
  }
  return out + text.slice(run, end)
}

/**
 * Scans a JSON text that JSON.parse accepted. Throws a JsonTextError when
 * arrays and objects nest deeper than `maxDepth`, or a key is `__proto__`,
 * or a `constructor` object has a `prototype` key (what Fastify's own
 * parser refuses: such keys pollute prototypes when merged into objects).
 * Time and memory are linear in the text's length; no recursion.
 */
export function scanJson (text: string, maxDepth: number, capture?: JsonCapture): JsonScan {
  const stack: Frame[] = []
  let captured: Array<string | undefined> = []
  // Where the value being captured began, and at which depth it is closed.
  let captureStart = -1
  const atCapture = (): boolean => capture !== undefined && stack.length === 3 &&
    stack[0]?.kind === OBJECT && stack[0].key === capture.list &&
    stack[1]?.kind === ARRAY && stack[2]?.kind === OBJECT && stack[2].key === capture.member
  const valueEnded = (end: number): void => {
    if (captureStart >= 0 && stack.length === 3) {
      captured[(stack[1] as Frame).index] = compactJson(text, captureStart, end)
      captureStart = -1
    }
  }

  for (let i = 0; i < text.length; i++) {
    const code = text.charCodeAt(i)
    if (isWhitespace(code) || code === 0x3a /* : */) continue
    const top = stack[stack.length - 1]
    if (code === 0x2c /* , */) {
      if (top?.kind === OBJECT) top.expectKey = true
      else if (top !== undefined) top.index++
      continue
    }
    if (code === 0x7d /* } */ || code === 0x5d /* ] */) {
      stack.pop()
      valueEnded(i + 1)
      continue
    }
    if (top?.kind === OBJECT && top.expectKey) {
      const end = stringEnd(text, i)
      const raw = text.slice(i + 1, end)
      const key = raw.includes('\\') ? JSON.parse(text.slice(i, end + 1)) as string : raw
      if (key === '__proto__') throw new JsonTextError('the body must not have a "__proto__" key')
      if (key === 'prototype' && top.under === 'constructor') throw new JsonTextError('the body must not have a "constructor.prototype" key')
      top.key = key
      top.expectKey = false
      // A repeated list key replaces the list, as in JSON.parse.
      if (capture !== undefined && stack.length === 1 && key === capture.list) captured = []
      i = end
      continue
    }
    // A value begins.
    if (atCapture()) captureStart = i
    if (code === 0x7b /* { */ || code === 0x5b /* [ */) {
      if (stack.length >= maxDepth) throw new JsonTextError(`the body nests arrays and objects deeper than ${maxDepth} levels`)
      stack.push({
        kind: code === 0x7b ? OBJECT : ARRAY,
        under: top?.kind === OBJECT ? top.key : undefined,
        key: undefined,
        index: 0,
        expectKey: code === 0x7b
      })
      continue
    }
    if (code === QUOTE) {
      i = stringEnd(text, i)
    } else {
      // A number, true, false or null: up to the next delimiter.
      while (i + 1 < text.length) {
        const next = text.charCodeAt(i + 1)
        if (isWhitespace(next) || next === 0x2c || next === 0x7d || next === 0x5d) break
        i++
      }
    }
    valueEnded(i + 1)
  }
  return { captured }
}
