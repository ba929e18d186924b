import { createHash } from 'node:crypto'
import type { FastifyInstance, FastifyRequest } from 'fastify'
import { BadRequestError, ConflictError, InvalidChannelError, PayloadTooLargeError, UnavailableError, UnsupportedMediaTypeError } from '../errors.js'
import { type EventToPublish, IdempotencyConflictError, type IdempotencyKey, type PublishResult, publishEvents } from '../event-log.js'
import { PublishQueueTimeoutError } from '../group-publisher.js'
import type { GatewayClaims } from '../plugins/auth.js'
import { CHANNEL_NAME_RULE, isChannelName } from '../channel.js'
import { type JsonCapture, JsonTextError, scanJson } from '../json-text.js'

export function checkChannelNames (channels: Iterable<string>): void {
  for (const channel of channels) {
    if (!isChannelName(channel)) {
      throw new InvalidChannelError(`invalid channel name ${JSON.stringify(channel)}: use ${CHANNEL_NAME_RULE}`)
    }
  }
}

/**
 * Deepest nesting of arrays and objects in a JSON body. Deeper is refused
 * (400): nothing legitimate nests so deep, and a subscriber's parser may
 * not take it (serde_json's default limit is 128).
 */
export const MAX_JSON_DEPTH = 128

// The JSON text of each batch event's data, as the client sent it (compacted),
// keyed by the event object the body was parsed into.
const dataTexts = new WeakMap<object, string>()

/**
 * Parses a JSON body: 400 when it is not JSON, nests deeper than
 * MAX_JSON_DEPTH, or has a `__proto__` or `constructor.prototype` key.
 * With `capture`, remembers the text of each `list[i].member` for toPayload.
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

/** Where a batch body's event data is: `{"events": [{"data": …}]}`. */
export const BATCH_DATA: JsonCapture = { list: 'events', member: 'data' }

/**
 * The payload of a batch event: a string is sent verbatim, any other JSON
 * value as the JSON text the client sent, compacted: never through a float,
 * so 12345678901234567890 and 1e400 arrive as written.
 */
export function toPayload (event: { data: unknown }, maxBytes: number, what: string): string {
  const { data } = event
  // An event that did not come through parseJsonBody has no text: its value is all there is.
  const payload = typeof data === 'string' ? data : dataTexts.get(event) ?? JSON.stringify(data)
  checkPayload(payload, maxBytes, what)
  return payload
}

const LONE_SURROGATE = /\p{Surrogate}/u

// fatal: invalid UTF-8 is refused rather than turned into U+FFFD, which
// would publish something else than was sent. ignoreBOM keeps a BOM as sent.
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/**
 * A request body as text: UTF-8 only (415 for another charset, 400 for
 * bytes that are not UTF-8).
 */
export function decodeBody (request: FastifyRequest, body: Buffer): string {
  const charset = /;\s*charset\s*=\s*"?([^";\s]*)/i.exec(request.headers['content-type'] ?? '')?.[1]
  if (charset !== undefined && !/^(utf-?8|us-ascii)$/i.test(charset)) {
    throw new UnsupportedMediaTypeError('send the body as UTF-8 (charset=utf-8)')
  }
  try {
    return UTF8.decode(body)
  } catch {
    throw new BadRequestError('the body is not valid UTF-8')
  }
}

// Fastify does not export the type of a content-type parser's callback.
type ParsedBody = (err: Error | null, body?: unknown) => void

/**
 * A content-type parser (parseAs: 'buffer') that decodes the body with
 * decodeBody and hands the text to `then`.
 */
export function utf8BodyParser (then: (request: FastifyRequest, text: string, done: ParsedBody) => void) {
  return (request: FastifyRequest, body: string | Buffer, done: ParsedBody): void => {
    let text: string
    try {
      text = decodeBody(request, body as Buffer)
    } catch (err) {
      done(err as Error, undefined)
      return
    }
    then(request, text, done)
  }
}

/**
 * The `then` of utf8BodyParser for JSON: parses with parseJsonBody, and
 * hands on what `keep` makes of the text and the value (the value itself by
 * default; a route that publishes the body as sent keeps the text).
 */
export function jsonBodyParser (capture?: JsonCapture, keep: (text: string, value: unknown) => unknown = (_text, value) => value) {
  return (_request: FastifyRequest, text: string, done: ParsedBody): void => {
    let value: unknown
    try {
      value = parseJsonBody(text, capture)
    } catch (err) {
      done(err as Error, undefined)
      return
    }
    done(null, keep(text, value))
  }
}

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

/**
 * Whether an error with this code means the publishing statement failed and
 * rolled back. A SQLSTATE is the database's answer about the statement,
 * except a connection exception (class 08) or the server ending the session
 * (57P01 and kin), which may come after the COMMIT was done. Anything else
 * (ECONNRESET, a connection ended) may too.
 */
function rolledBack (code: unknown): boolean {
  return typeof code === 'string' && /^[0-9A-Z]{5}$/.test(code) && !code.startsWith('08') && !code.startsWith('57P')
}

const IDEMPOTENCY_KEY = /^[\x21-\x7e]{1,255}$/

/**
 * Publishes in one transaction; 201 only after COMMIT succeeded. A request
 * with an Idempotency-Key publishes once: a repeat (same client, same key,
 * same events) gets the first ids back.
 */
export async function publishAll (app: FastifyInstance, request: FastifyRequest, claims: GatewayClaims | null, events: readonly EventToPublish[]): Promise<string[]> {
  const header = request.headers['idempotency-key']
  let idempotency: IdempotencyKey | undefined
  if (header !== undefined) {
    if (typeof header !== 'string' || !IDEMPOTENCY_KEY.test(header)) {
      throw new BadRequestError('Idempotency-Key must be 1 to 255 visible ASCII characters')
    }
    // Keys are the client's own: scoped to the identity of its token (its
    // iss and sub, or the token itself without a sub), never shared.
    const client = app.clientIdentity(request)
    // Publishing was authorized with a token: it has one.
    if (client === undefined || claims === null) throw new Error('a publish without a verified token')
    idempotency = {
      key: JSON.stringify([client, header]),
      requestHash: createHash('sha256').update(JSON.stringify(events)).digest('base64url')
    }
  }
  let result: PublishResult
  try {
    result = idempotency === undefined
      ? { ids: await app.publisher.publish(events), replayed: false }
      : await publishEvents(app.pg.pool, events, idempotency)
  } catch (err) {
    if (err instanceof IdempotencyConflictError) throw new ConflictError(err.message)
    const code = (err as { code?: unknown }).code
    // Class 22 is "data exception": the database refused a value.
    if (typeof code === 'string' && code.startsWith('22')) {
      throw new BadRequestError('the database refused the event: nothing was published')
    }
    app.log.error({ err: { message: (err as Error).message, code } }, 'publish failed')
    if (!(err instanceof PublishQueueTimeoutError) && !rolledBack(code)) {
      throw new UnavailableError('the database did not confirm the commit: the events may or may not have been published; retry with an Idempotency-Key to publish them at most once')
    }
    throw new UnavailableError('the event could not be committed: nothing was published; retry shortly')
  }
  if (result.replayed) {
    request.log.info('idempotent repeat: nothing published')
  } else {
    app.metrics.eventsPublished.inc(result.ids.length)
  }
  return result.ids
}
