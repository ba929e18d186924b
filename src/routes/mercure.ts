import { randomUUID } from 'node:crypto'
import type { OutgoingHttpHeaders } from 'node:http'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { BadRequestError, ForbiddenError, OverloadedError, PayloadTooLargeError, UnauthorizedError, UnavailableError, UnsupportedMediaTypeError } from '../errors.js'
import type { EventId } from '../event-id.js'
import { nothingPublished } from '../group-publisher.js'
import { ANONYMOUS, InvalidTokenError, mayPublish, mayRead, type MercureGrants, type MercureTokenOptions, MercureTokens, payloadFor, type VerifiedToken } from '../mercure/authorization.js'
import { findUpdate, lastUpdateId } from '../mercure/log.js'
import { ActiveSubscriptions, type Subscription, subscriptionDocument, type SubscriptionRow } from '../mercure/subscriptions.js'
import { MERCURE_DIALECT, MercureSelector } from '../mercure/selector.js'
import { type CompiledSelector, InvalidSelectorError, type SelectorType, TopicMatcher } from '../mercure/topic-selector.js'
import { encodeUpdatePayload, InvalidUpdateError, MERCURE_CHANNEL, parsePublishForm } from '../mercure/update.js'
import { decodeBody } from '../plugins/body-parsers.js'
import { originAllowed } from '../plugins/auth.js'
import { API_ROUTE } from '../plugins/security.js'
import { encodeComment } from '../sse.js'
import { retryLater, serveStream, type StreamSettings } from './events.js'

/*
 * A Mercure hub (https://mercure.rocks), both protocol generations, on the
 * gateway's log, listener and stream core: `GET /.well-known/mercure`
 * subscribes, `POST /.well-known/mercure` publishes. Updates are events of
 * the reserved channel MERCURE_CHANNEL; topics are matched in process
 * (src/mercure/).
 */

export const MERCURE_PATH = '/.well-known/mercure'

export interface MercureRoutesOptions {
  /** MERCURE_HUB_URL: relative topics and patterns resolve against it. */
  hubUrl: string
  /** MERCURE_ANONYMOUS: subscribers without a token get public updates. */
  anonymous: boolean
  /** How tokens are verified (keys, algorithm, aud, iss, exp). */
  tokens: MercureTokenOptions
  /** Cookies a token is read from, in order. */
  cookieNames: readonly string[]
  /** CORS_ORIGINS: pages that may publish with a cookie, besides the gateway's own. */
  trustedOrigins: readonly string[]
  /** RETRY_MS: the base of the `retry:` advice (ms). */
  retryMs: number
  /** STREAM_BUFFER_BYTES: unsent bytes of a stream whose client does not read, before it is cut off. */
  streamBufferBytes: number
  /** MAX_PAYLOAD_BYTES: the largest publish form, in bytes. */
  maxPayloadBytes: number
  /** MERCURE_SUBSCRIPTIONS: the subscriptions API and subscription events. */
  subscriptions: boolean
}

// How often an instance renews its row of active subscriptions (stale after three).
const INSTANCE_HEARTBEAT_MS = 10_000

// Bounds on what one request may ask (Mercure asks hubs for such limits).
const MAX_SELECTORS = 100
const MAX_TOPICS = 100
const MAX_FIELD_LENGTH = 2048

// Mercure 1.0 refuses C0, C1, DEL and format characters in matchers.
const CONTROL_OR_FORMAT = /[\p{Cc}\p{Cf}]/u

const SELECTOR_PARAMETERS: Record<string, SelectorType> = { topic: 'legacy', match: 'exact', match_exact: 'exact', match_urlpattern: 'urlpattern' }

/** The legacy cookie, Mercure 1.0's; MERCURE_COOKIE_NAME adds one. */
export const MERCURE_COOKIES = ['mercureAuthorization', '__Secure-mercure_access_token'] as const

type BearerError = 'invalid_token' | 'insufficient_scope' | 'invalid_request'

// RFC 6750 challenges, as Mercure 1.0 asks (draft-07 clients ignore them).
function challenge (reply: FastifyReply, error?: BearerError): void {
  reply.header('www-authenticate', error === undefined ? 'Bearer' : `Bearer error="${error}"`)
}

interface FoundToken {
  token: string
  source: 'header' | 'query' | 'cookie'
}

// The Authorization header first; then (draft-07) the `authorization` query
// parameter; then a cookie.
function findToken (request: FastifyRequest, params: URLSearchParams | undefined, cookieNames: readonly string[]): FoundToken | undefined {
  const header = request.headers.authorization
  if (header !== undefined) return { token: /^Bearer\s+(\S+)\s*$/i.exec(header)?.[1] ?? '', source: 'header' }
  const query = params?.get('authorization')
  if (query !== null && query !== undefined) return { token: query, source: 'query' }
  for (const name of cookieNames) {
    const cookie = request.cookies[name]
    if (cookie !== undefined) return { token: cookie, source: 'cookie' }
  }
  return undefined
}

const UTF8 = new TextDecoder('utf-8', { fatal: true })

// Node reads header bytes as Latin-1; a browser sends Last-Event-ID (an id
// that may hold any character) as UTF-8: read the bytes as such when they are.
function utf8Header (value: string): string {
  try {
    return UTF8.decode(Buffer.from(value, 'latin1'))
  } catch {
    return value
  }
}

// A stream that cannot be opened now answers an EventSource with a 200
// that advises `retry:` (retryLater, src/routes/events.ts) and says why in
// a comment: Mercure streams carry no `gateway/*` event.
function sayInComment ({ reason }: { reason: string }): string {
  return encodeComment(reason)
}

export default async function mercureRoutes (app: FastifyInstance, options: MercureRoutesOptions): Promise<void> {
  const matcher = new TopicMatcher({ hubUrl: options.hubUrl, maxSelectorLength: MAX_FIELD_LENGTH })
  const tokens = new MercureTokens(options.tokens, matcher)
  const trustedOrigins = new Set(options.trustedOrigins)
  const limits = { maxTopics: MAX_TOPICS, maxFieldLength: MAX_FIELD_LENGTH, hubUrl: options.hubUrl }
  const hubPath = MERCURE_PATH
  const streamSettings: StreamSettings = {
    stream: { maxBufferedBytes: options.streamBufferBytes, line: app.flushLine, tally: app.metrics.streamTally },
    retryMs: options.retryMs
  }

  // Active subscriptions, when asked for: registered once this instance is
  // up; what streams still have to remove is waited for before it goes.
  let active: ActiveSubscriptions | undefined
  const pending = new Set<Promise<void>>()
  const track = (work: Promise<void>): Promise<void> => {
    const settled = work.catch((err: Error) => app.log.warn({ err: { message: err.message } }, 'recording Mercure subscriptions failed'))
    pending.add(settled)
    settled.finally(() => pending.delete(settled)).catch(() => {})
    return settled
  }
  if (options.subscriptions) {
    active = new ActiveSubscriptions({
      pool: app.pg.pool,
      hubPath,
      heartbeatMs: INSTANCE_HEARTBEAT_MS,
      onError: (err) => app.log.warn({ err: { message: err.message } }, 'renewing Mercure subscriptions failed')
    })
    await active.start()
    const subscriptions = active
    app.addHook('onClose', async () => {
      await Promise.all(pending)
      await subscriptions.close()
    })
  }

  // The publish form; UTF-8 only, as every body the gateway reads.
  app.addContentTypeParser('application/x-www-form-urlencoded', { parseAs: 'buffer' }, (request, body, done) => {
    try {
      done(null, decodeBody(request, body as Buffer))
    } catch (err) {
      done(err as Error, undefined)
    }
  })

  // Verifies the request's token for a role: 401 (with an RFC 6750
  // challenge) when it is missing and needed, or invalid.
  function authenticate (request: FastifyRequest, reply: FastifyReply, role: 'publish' | 'subscribe', params: URLSearchParams | undefined): VerifiedToken | undefined {
    const found = findToken(request, params, [...options.cookieNames])
    if (found === undefined) {
      if (role === 'subscribe' && options.anonymous) return undefined
      challenge(reply)
      throw new UnauthorizedError(`a token is needed to ${role}: send Authorization: Bearer <token>, or the mercureAuthorization cookie`)
    }
    // A cookie goes with any request a page makes: a publish it
    // authenticates must come from an allowed origin.
    if (found.source === 'cookie' && role === 'publish' && !originAllowed(request, trustedOrigins)) {
      challenge(reply, 'insufficient_scope')
      throw new ForbiddenError('a publish authenticated by cookie must come from an allowed Origin')
    }
    try {
      return tokens.verify(found.token, role)
    } catch (err) {
      if (!(err instanceof InvalidTokenError)) throw err
      challenge(reply, 'invalid_token')
      throw new UnauthorizedError(err.message)
    }
  }

  function selectorsOf (params: URLSearchParams): CompiledSelector[] {
    const selectors: CompiledSelector[] = []
    for (const [name, value] of params) {
      const type = SELECTOR_PARAMETERS[name]
      if (type === undefined) {
        // Mercure 1.0 reserves the whole `match` prefix: a typo fails loudly.
        if (name.toLowerCase().startsWith('match')) throw new BadRequestError('unknown matcher parameter: use topic, match, match_exact or match_urlpattern')
        continue
      }
      if (CONTROL_OR_FORMAT.test(value)) throw new BadRequestError('a topic selector may not contain control or format characters')
      try {
        selectors.push(matcher.compile({ type, value }))
      } catch (err) {
        if (err instanceof InvalidSelectorError) throw new BadRequestError(`invalid topic selector: ${err.message}`)
        throw err
      }
    }
    if (selectors.length === 0) throw new BadRequestError('missing topic selector: give one or more topic, match or match_urlpattern parameters')
    if (selectors.length > MAX_SELECTORS) throw new BadRequestError(`a subscription may have at most ${MAX_SELECTORS} topic selectors`)
    return selectors
  }

  // Where a stream resumes: the log id after which it starts (undefined:
  // at the head), and what the response headers say it starts after.
  async function resumePosition (lastEventId: string): Promise<{ resumeFrom: EventId | undefined, found: boolean }> {
    if (lastEventId === 'earliest') return { resumeFrom: 0, found: false }
    let logId: EventId | undefined
    try {
      logId = await findUpdate(app.pg.pool, lastEventId)
    } catch {
      throw new UnavailableError('the event log cannot be read right now; retry shortly')
    }
    return logId === undefined ? { resumeFrom: undefined, found: false } : { resumeFrom: logId, found: true }
  }

  app.get(MERCURE_PATH, {
    exposeHeadRoute: false,
    config: {
      pressureHandler: async (request, reply) => {
        retryLater(request, reply, new OverloadedError() as FastifyError, options.retryMs, sayInComment)
      }
    },
    ...API_ROUTE
  }, async (request, reply) => {
    if (reply.raw.socket === null) {
      throw new BadRequestError('a stream must be the only request in flight on its connection: open it on a connection of its own')
    }
    // Parsed as URLSearchParams parses (Mercure 1.0 says so), every pair in order.
    const params = new URL(request.raw.url ?? '/', 'http://hub.invalid').searchParams
    const selectors = selectorsOf(params)
    const verified = authenticate(request, reply, 'subscribe', params)
    const grants: MercureGrants = verified?.grants ?? ANONYMOUS
    // The header wins over the query parameters (both generations').
    const header = request.headers['last-event-id']
    const lastEventId = (typeof header === 'string' ? utf8Header(header) : undefined) ?? params.get('last_event_id') ?? params.get('lastEventID') ?? undefined
    let found = false
    return await serveStream(app, request, reply, {
      channels: [MERCURE_CHANNEL],
      resumeFrom: undefined,
      selector: new MercureSelector(matcher, selectors, grants),
      dialect: MERCURE_DIALECT,
      authorize: async () => {
        let resumeFrom: EventId | undefined
        if (lastEventId !== undefined) ({ resumeFrom, found } = await resumePosition(lastEventId))
        return { expiresAt: verified?.exp, resumeFrom }
      },
      headers: (prepared) => {
        // As Mercure sends them: a stream (its token may be in the URL) is never stored.
        const headers: OutgoingHttpHeaders = { 'cache-control': 'private, no-cache, no-store, must-revalidate, max-age=0' }
        if (lastEventId !== undefined) {
          // Where the stream starts: after the update asked for, or `earliest`
          // (asked for, unknown, or pruned meanwhile).
          const startsAfter = found && !prepared.start.missed ? lastEventId : 'earliest'
          // Header values travel as bytes: the id's UTF-8, as the client sent it.
          const value = Buffer.from(startsAfter).toString('latin1')
          headers['last-event-id'] = value
          headers['mercure-last-event-id'] = value
          headers['access-control-expose-headers'] = 'Last-Event-ID, Mercure-Last-Event-ID'
        }
        return headers
      },
      begins: () => {
        if (active === undefined) return undefined
        // One identifier per connection, made by the hub (Mercure 1.0 says so).
        const subscriber = `urn:uuid:${randomUUID()}`
        const subscriptions = active
        const added = track(subscriptions.add(selectors.map((s): Subscription => ({ subscriber, type: s.type, match: s.value, payload: payloadFor(grants, s.value) }))))
        return () => { track(added.then(async () => { await subscriptions.remove(subscriber) })) }
      },
      sayRefusal: sayInComment
    }, streamSettings)
  })

  app.post(MERCURE_PATH, {
    bodyLimit: options.maxPayloadBytes,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.publishRateLimit]
  }, async (request, reply) => {
    const params = new URL(request.raw.url ?? '/', 'http://hub.invalid').searchParams
    const verified = authenticate(request, reply, 'publish', params) as VerifiedToken
    const contentType = request.headers['content-type']?.toLowerCase() ?? ''
    if (!contentType.startsWith('application/x-www-form-urlencoded') || typeof request.body !== 'string') {
      throw new UnsupportedMediaTypeError('send the update as application/x-www-form-urlencoded')
    }
    let update
    try {
      update = parsePublishForm(request.body, limits)
    } catch (err) {
      if (!(err instanceof InvalidUpdateError)) throw err
      throw err.statusCode === 413 ? new PayloadTooLargeError(err.message) : new BadRequestError(err.message)
    }
    if (!mayPublish(matcher, verified.grants, update.topics)) {
      challenge(reply, 'insufficient_scope')
      throw new ForbiddenError('the token does not allow to publish on every topic of the update')
    }
    try {
      await app.publisher.publish([{ channel: MERCURE_CHANNEL, payload: encodeUpdatePayload(update) }])
    } catch (err) {
      app.log.error({ err: { message: (err as Error).message, code: (err as { code?: string }).code } }, 'Mercure publish failed')
      throw new UnavailableError(nothingPublished(err)
        ? 'the update could not be committed: nothing was published; retry shortly'
        : 'the database did not confirm the commit: the update may or may not have been published')
    }
    app.metrics.eventsPublished.inc()
    return reply.code(200).type('text/plain; charset=utf-8').send(update.id)
  })

  if (active !== undefined) subscriptionsApi(app, active, { hubUrl: options.hubUrl, hubPath, authenticate: (request, reply) => authenticate(request, reply, 'subscribe', undefined), matcher })
}

interface SubscriptionsApiOptions {
  hubUrl: string
  hubPath: string
  matcher: TopicMatcher
  authenticate: (request: FastifyRequest, reply: FastifyReply) => VerifiedToken | undefined
}

const MODERN_TYPES = new Set(['exact', 'urlpattern'])

/**
 * Mercure's subscriptions API, over every instance's subscriptions:
 * `/subscriptions`, `/subscriptions/{topic}[/{subscriber}]` (draft-07,
 * JSON-LD with `lastEventID`) and `/subscriptions/{match_type}/{match}[/{subscriber}]`
 * (1.0, JSON with the cursor in the Link header). A token must allow
 * reading the requested path as a topic.
 */
function subscriptionsApi (app: FastifyInstance, subscriptions: ActiveSubscriptions, options: SubscriptionsApiOptions): void {
  const handler = async (request: FastifyRequest<{ Params: { a?: string, b?: string, c?: string } }>, reply: FastifyReply): Promise<unknown> => {
    const verified = options.authenticate(request, reply)
    const path = new URL(request.raw.url ?? '/', 'http://hub.invalid').pathname
    if (verified === undefined) {
      reply.header('www-authenticate', 'Bearer')
      throw new UnauthorizedError('a token is needed to read subscriptions')
    }
    if (!mayRead(options.matcher, verified.grants, [path])) {
      reply.header('www-authenticate', 'Bearer error="insufficient_scope"')
      throw new ForbiddenError('the token does not allow to read these subscriptions')
    }
    const { a, b, c } = request.params
    // Mercure 1.0's paths start with a matcher type; draft-07's with a topic.
    const modern = c !== undefined || (b !== undefined && MODERN_TYPES.has(a ?? '')) || (a === undefined && verified.grants.generation === '1.0')
    if (modern && a !== undefined && !MODERN_TYPES.has(a)) throw new BadRequestError('unknown matcher type: exact or urlpattern')
    const single = modern ? c !== undefined : b !== undefined
    let rows: SubscriptionRow[]
    let lastEventId: string
    try {
      if (a === undefined) rows = await subscriptions.list()
      else if (modern) rows = await subscriptions.list({ type: a as SelectorType, match: b, subscriber: c })
      else rows = await subscriptions.list({ type: 'legacy', match: a, subscriber: b })
      lastEventId = await lastUpdateId(app.pg.pool)
    } catch (err) {
      // A fault of the database's: the client may come back (503), never a 500.
      request.log.warn({ err: { message: (err as Error).message } }, 'reading the subscriptions failed')
      throw new UnavailableError('the subscriptions cannot be read right now; retry shortly')
    }
    if (single && rows.length === 0) {
      reply.code(404)
      return { statusCode: 404, error: 'Not Found', message: 'no such subscription' }
    }
    const documents = rows.map((row: Subscription) => subscriptionDocument(options.hubPath, row, true))
    reply.header('cache-control', 'must-revalidate')
    if (modern) {
      // Header values travel as bytes: the id's UTF-8, as on a stream's Last-Event-ID.
      reply.header('link', Buffer.from(`<${options.hubUrl}>; rel="mercure"; last-event-id="${lastEventId.replace(/["\\]/g, '')}"; type="mercure"; content-type="application/json"`).toString('latin1'))
      reply.header('access-control-expose-headers', 'Link')
      reply.type('application/json; charset=utf-8')
      return single ? documents[0] : { id: path, type: 'subscriptions', subscriptions: documents }
    }
    reply.type('application/ld+json; charset=utf-8')
    return single
      ? { ...documents[0], lastEventID: lastEventId }
      : { '@context': 'https://mercure.rocks/', id: path, type: 'Subscriptions', lastEventID: lastEventId, subscriptions: documents }
  }
  for (const suffix of ['', '/:a', '/:a/:b', '/:a/:b/:c']) {
    app.get<{ Params: { a?: string, b?: string, c?: string } }>(`${options.hubPath}/subscriptions${suffix}`, { ...API_ROUTE }, handler)
  }
}
