import { BadRequestError, PayloadTooLargeError } from './errors.js'
import { type JsonCapture, JsonTextError, scanJson } from './json-text.js'

/*
 * What a published payload may be, and how a JSON body becomes payloads:
 * no Fastify here (src/plugins/body-parsers.ts feeds it request bodies).
 */

/**
 * Deepest nesting of arrays and objects in a JSON body. Deeper is refused
 * (400): nothing legitimate nests so deep, and a subscriber's parser may
 * not take it (serde_json's default limit is 128).
 */
export const MAX_JSON_DEPTH = 128

/** Where a batch body's event data is: `{"events": [{"data": …}]}`. */
export const BATCH_DATA: JsonCapture = { list: 'events', member: 'data' }

// The JSON text of each batch event's data, as the client sent it (compacted),
// keyed by the event object the body was parsed into.
const dataTexts = new WeakMap<object, string>()

/**
 * Parses a JSON body: BadRequestError (400) when it is not JSON, nests
 * deeper than MAX_JSON_DEPTH, or has a `__proto__` or
 * `constructor.prototype` key. With `capture`, remembers the text of each
 * `list[i].member` for toPayload.
 */
export function parseJsonBody (text: string, capture?: JsonCapture): unknown {
  let value: unknown
  try {
    value = JSON.parse(text)
  } catch {
    // JSON.parse's message quotes the body: never echo input.
    throw new BadRequestError('the body is not valid JSON')
  }
  let scan
  try {
    scan = scanJson(text, MAX_JSON_DEPTH, capture)
  } catch (err) {
    if (err instanceof JsonTextError) throw new BadRequestError(err.message)
    throw err
  }
  if (capture !== undefined && typeof value === 'object' && value !== null) {
    const list = (value as Record<string, unknown>)[capture.list]
    if (Array.isArray(list)) {
      list.forEach((item: unknown, i) => {
        const text = scan.captured[i]
        if (typeof item === 'object' && item !== null && text !== undefined) dataTexts.set(item, text)
      })
    }
  }
  return value
}

/**
 * The payload of a batch event: a string is sent verbatim, any other JSON
 * value as the JSON text the client sent, compacted: never through a float,
 * so 12345678901234567890 and 1e400 arrive as written. Checked as
 * checkPayload checks, `what` naming it in the error.
 */
export function toPayload (event: { data: unknown }, maxBytes: number, what: string): string {
  const { data } = event
  // An event that did not come through parseJsonBody has no text: its value is all there is.
  const payload = typeof data === 'string' ? data : dataTexts.get(event) ?? JSON.stringify(data)
  checkPayload(payload, maxBytes, what)
  return payload
}

const LONE_SURROGATE = /\p{Surrogate}/u

/**
 * Throws unless the payload can be published as sent: PayloadTooLargeError
 * (413) over `maxBytes` UTF-8 bytes; BadRequestError (400) for a NUL
 * character or a lone surrogate. `what` names the payload in the message.
 */
export function checkPayload (payload: string, maxBytes: number, what: string): void {
  if (Buffer.byteLength(payload) > maxBytes) {
    throw new PayloadTooLargeError(`${what} is larger than ${maxBytes} bytes`)
  }
  // PostgreSQL text cannot hold NUL.
  if (payload.includes('\u0000')) {
    throw new BadRequestError(`${what} must not contain the NUL character`)
  }
  // A lone surrogate (JSON allows "\ud800") has no UTF-8 form: it would
  // arrive as U+FFFD, not as sent.
  if (LONE_SURROGATE.test(payload)) {
    throw new BadRequestError(`${what} must be valid Unicode: it holds a lone surrogate`)
  }
}
