import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { BadRequestError, UnsupportedMediaTypeError } from '../errors.js'
import type { JsonCapture } from '../json-text.js'
import { parseJsonBody } from '../payload.js'

/** How a route takes its body: its `config.body`. */
export interface BodyFormat {
  /**
   * What a JSON body becomes: its value (by default), or, with 'text', the
   * text as sent once it passed the same checks (a payload published as sent).
   */
  json?: 'value' | 'text'
  /** For a JSON value: the members whose text toPayload (src/payload.ts) publishes as sent. */
  capture?: JsonCapture
  /** false: a text/plain body is refused (415); by default it is taken as its text. */
  text?: boolean
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** How the route takes its body (src/plugins/body-parsers.ts). */
    body?: BodyFormat
  }
}

// fatal: invalid UTF-8 is refused rather than turned into U+FFFD, which
// would publish something else than was sent. ignoreBOM keeps a BOM as sent.
const UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/**
 * A request body as text: UTF-8 only (UnsupportedMediaTypeError, 415, for
 * another charset; BadRequestError, 400, for bytes that are not UTF-8).
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
 * A content-type parser (parseAs: 'buffer') from `parse`, which is given
 * the body and the route's BodyFormat, and returns the body or throws.
 */
function bodyParser (parse: (request: FastifyRequest, body: Buffer, format: BodyFormat) => unknown) {
  return (request: FastifyRequest, body: string | Buffer, done: ParsedBody): void => {
    let parsed: unknown
    try {
      parsed = parse(request, body as Buffer, request.routeOptions.config.body ?? {})
    } catch (err) {
      done(err as Error, undefined)
      return
    }
    done(null, parsed)
  }
}

/**
 * The app's parsers for application/json and text/plain, in place of
 * Fastify's: UTF-8 only (decodeBody); JSON with the rules of parseJsonBody
 * (depth, prototype keys). Each route says in `config.body` what its body
 * becomes.
 */
export default fp(async function bodyParsersPlugin (app) {
  app.removeContentTypeParser(['application/json', 'text/plain'])
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, bodyParser((request, body, format) => {
    const text = decodeBody(request, body)
    const value = parseJsonBody(text, format.capture)
    return format.json === 'text' ? text : value
  }))
  app.addContentTypeParser('text/plain', { parseAs: 'buffer' }, bodyParser((request, body, format) => {
    if (format.text === false) throw new UnsupportedMediaTypeError('unsupported content type: send application/json')
    return decodeBody(request, body)
  }))
}, { name: 'gateway-body-parsers' })
