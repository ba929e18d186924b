import type { IncomingMessage, OutgoingHttpHeaders } from 'node:http'
import type { Socket } from 'node:net'
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { BadRequestError, OverloadedError, UnavailableError } from '../errors.js'
import { EVENT_STREAM_HEADERS, EventStream, GATEWAY_EVENTS } from '../event-stream.js'
import { type LogBounds, readLogBounds, readReplayPage } from '../event-log.js'
import { encodeEvent, encodeRetry } from '../sse.js'
import { type EventId, MAX_EVENT_ID, parseEventId } from '../event-id.js'
import { checkChannelNames } from '../channel.js'
import { BATCH_DATA, toPayload } from '../payload.js'
import { API_ROUTE, API_SECURITY_HEADERS } from '../plugins/security.js'

export interface EventsRoutesOptions {
  config: GatewayConfig
}

const StreamQuery = Type.Object({
  // A single ?channel=x arrives as a string and is coerced to [x].
  channel: Type.Array(Type.String(), { minItems: 1 }),
  access_token: Type.Optional(Type.String()),
  lastEventId: Type.Optional(Type.String())
})

// Pages of the log a replay reads at a time.
const REPLAY_PAGE = 500

function resumeId (value: string | string[] | undefined): EventId | undefined {
  if (value === undefined) return undefined
  const id = typeof value === 'string' ? parseEventId(value.trim()) : undefined
  if (id === undefined) throw new BadRequestError(`Last-Event-ID must be an event id: the digits of an id: field, at most ${MAX_EVENT_ID}`)
  return id
}

/**
 * Where a stream starts: after the id it resumes from, or at the log's head.
 * An id the log no longer holds (pruned), or never held (beyond the head,
 * e.g. from another database), or drawn on a timeline the log forked away
 * from, is answered with a `gateway/missed` event
 * and the stream starts from what the log has.
 */
function startPosition (resumeFrom: number | undefined, bounds: LogBounds): { after: number, missed: boolean } {
  if (resumeFrom === undefined) return { after: bounds.head, missed: false }
  // An id from a timeline the log no longer follows (a failover lost it):
  // the stream goes on from the last event kept before the fork.
  if (bounds.forkedAfter !== undefined) return { after: bounds.forkedAfter, missed: true }
  if (resumeFrom > bounds.head) return { after: bounds.head, missed: true }
  if (resumeFrom < bounds.prunedThrough) return { after: bounds.prunedThrough, missed: true }
  return { after: resumeFrom, missed: false }
}

async function replayLog (app: FastifyInstance, stream: EventStream, channels: readonly string[], after: number): Promise<number> {
  let count = 0
  let position = after
  for (;;) {
    const { prunedThrough, events: rows } = await readReplayPage(app.pg.pool, channels, position, REPLAY_PAGE)
    // Retention pruned past the position since the bounds (or the previous
    // page) were read: the events in between are gone. Say so, as for a
    // pruned Last-Event-ID, rather than skip them silently.
    if (prunedThrough > position) {
      stream.replay(Buffer.from(encodeEvent({
        event: GATEWAY_EVENTS.missed,
        data: JSON.stringify({ lastEventId: String(position), resumedAfter: String(prunedThrough) })
      })), prunedThrough)
      position = prunedThrough
    }
    for (const row of rows) {
      position = Number(row.id)
      stream.replay(Buffer.from(encodeEvent({ id: row.id, event: row.channel, data: row.payload })), position)
    }
    count += rows.length
    if (rows.length < REPLAY_PAGE || stream.ended) return count
    // Respect the client's pace: never read the log faster than it takes it.
    await stream.drained()
  }
}

// setTimeout takes at most 2^31 - 1 ms (24.8 days); a later expiry re-arms.
const MAX_TIMER_MS = 2 ** 31 - 1

function endExpired (stream: EventStream): void {
  stream.write(Buffer.from(encodeEvent({
    event: GATEWAY_EVENTS.expired,
    data: JSON.stringify({ reason: 'the token expired: reconnect with a fresh one' })
  })))
  stream.end().catch(() => {})
}

/**
 * Ends each stream when its token's `exp` (whole seconds) passes. Streams
 * whose tokens expire in the same second share one timer: a Timeout and its
 * closures per stream would cost more than the stream's own state.
 */
class ExpiryTimers {
  readonly #due = new Map<number, { streams: Set<EventStream>, timer: NodeJS.Timeout }>()

  add (stream: EventStream, exp: number): void {
    if (exp * 1000 <= Date.now()) {
      endExpired(stream)
      return
    }
    let bucket = this.#due.get(exp)
    if (bucket === undefined) {
      bucket = { streams: new Set(), timer: this.#arm(exp) }
      this.#due.set(exp, bucket)
    }
    bucket.streams.add(stream)
  }

  delete (stream: EventStream, exp: number): void {
    const bucket = this.#due.get(exp)
    if (bucket === undefined || !bucket.streams.delete(stream)) return
    if (bucket.streams.size === 0) {
      clearTimeout(bucket.timer)
      this.#due.delete(exp)
    }
  }

  #arm (exp: number): NodeJS.Timeout {
    return setTimeout(() => {
      const bucket = this.#due.get(exp)
      if (bucket === undefined) return
      if (exp * 1000 > Date.now()) {
        bucket.timer = this.#arm(exp)
        return
      }
      this.#due.delete(exp)
      for (const stream of bucket.streams) endExpired(stream)
    }, Math.min(exp * 1000 - Date.now(), MAX_TIMER_MS))
  }
}

const LISTENER_DOWN = 'the gateway cannot listen to the database right now; retry shortly'

/**
 * The `retry:` a stream advises, drawn from [ms, 2 × ms): after a restart
 * its clients come back spread over that span instead of in one burst.
 */
export function jittered (ms: number, random: () => number = Math.random): number {
  return Math.floor(ms * (1 + random()))
}

/**
 * Answers a stream request that cannot be served now but may be soon (the
 * gateway is full, overloaded, or cannot reach the database; the address
 * has its share of streams): every status but 200 makes an EventSource give
 * up for good, so a client that accepts `text/event-stream` gets a 200
 * stream that advises `retry:` (twice a stream's, jittered), says why in a
 * `gateway/unavailable` event without an `id:` (the client keeps its place)
 * and ends; EventSource reconnects after the advised delay. Other clients
 * (curl, fetch without that Accept) get the error itself, 429 or 503. Both
 * carry `Retry-After` in seconds. A refusal that will not change (400, 401,
 * 403) is thrown as it is.
 */
function retryLater (request: FastifyRequest, reply: FastifyReply, err: FastifyError, retryMs: number): FastifyReply {
  const statusCode = err.statusCode ?? 500
  if (statusCode < 500 && statusCode !== 429) throw err
  const retry = jittered(2 * retryMs)
  reply.header('retry-after', Math.max(1, Math.ceil(retry / 1000)))
  if (request.headers.accept?.includes('text/event-stream') !== true) throw err
  // A failure we did not name may carry internals: it is logged, not told.
  const named = err.code?.startsWith('GW_') === true
  if (!named) request.log.error({ err }, 'stream set-up failed')
  else request.log.warn({ code: err.code, message: err.message }, 'stream refused for now')
  return reply.code(200).headers({
    // A refusal from a global hook (overloaded) comes before the route's own hook.
    ...API_SECURITY_HEADERS,
    'content-type': EVENT_STREAM_HEADERS['content-type'],
    'cache-control': 'no-cache'
  }).send(encodeRetry(retry) + encodeEvent({
    event: GATEWAY_EVENTS.unavailable,
    data: JSON.stringify({ status: statusCode, reason: named ? err.message : 'Internal Server Error', retry })
  }))
}

// Connections whose current request is a stream's (being set up, or live),
// with that request.
const streamConnections = new WeakMap<Socket, IncomingMessage>()

function unmarkStreamConnection (request: IncomingMessage): void {
  if (streamConnections.get(request.socket) === request) streamConnections.delete(request.socket)
}

/**
 * Closes a connection on which a request arrives behind a stream's. A
 * stream response never ends, so nothing behind it can be answered; yet
 * Node would run each such request and queue its answer, and once the
 * queued answers pass 16 KiB stop reading the socket, so that the client
 * leaving goes unseen (and the stream holds its slot and LISTENs) until a
 * heartbeat fails. Must be the app's first onRequest hook: requests
 * pipelined in one packet all arrive in the same turn, and only the first
 * hook of each runs before the next request arrives.
 */
export function guardStreamConnections (app: FastifyInstance): void {
  app.addHook('onRequest', (request, reply, done) => {
    const connection = request.raw.socket
    if (streamConnections.has(connection)) {
      connection.destroy()
      reply.hijack()
    } else if (request.method === 'GET' && request.routeOptions.url === '/events' && reply.raw.socket !== null) {
      streamConnections.set(connection, request.raw)
    }
    done()
  })
  // A stream request answered without a stream (refused, told to retry) frees its connection.
  app.addHook('onResponse', (request, _reply, done) => {
    unmarkStreamConnection(request.raw)
    done()
  })
}

const BatchBody = Type.Object({
  events: Type.Array(Type.Object({
    channel: Type.String(),
    data: Type.Unknown()
  }, { required: ['channel', 'data'] }), { minItems: 1 })
})

export default async function eventsRoutes (app: FastifyInstance, { config }: EventsRoutesOptions): Promise<void> {
  const routes = app.withTypeProvider<TypeBoxTypeProvider>()
  const expiries = new ExpiryTimers()

  // No HEAD: it would open a stream whose events nobody may send.
  routes.get('/events', {
    schema: { querystring: StreamQuery },
    exposeHeadRoute: false,
    // Shed under load like every route, but in words EventSource retries.
    config: {
      pressureHandler: async (request, reply) => {
        retryLater(request, reply, new OverloadedError(), config.RETRY_MS)
      }
    },
    ...API_ROUTE
  }, async (request, reply) => {
    // A request queued behind another answer on its connection (HTTP/1.1
    // pipelining) would wait for it, holding whatever it took: it takes
    // nothing, and is refused after that answer. (Behind a stream, which
    // never ends, guardStreamConnections has closed the connection.)
    if (reply.raw.socket === null) {
      throw new BadRequestError('a stream must be the only request in flight on its connection: open it on a connection of its own')
    }
    const channels = [...new Set(request.query.channel)]
    if (channels.length > config.MAX_CHANNELS_PER_STREAM) {
      throw new BadRequestError(`a stream may have at most ${config.MAX_CHANNELS_PER_STREAM} channels`)
    }
    checkChannelNames(channels)
    // EventSource sends the header on reconnect; the query parameter serves
    // a first connection from a client that kept its place.
    const resumeFrom = resumeId(request.headers['last-event-id'] ?? request.query.lastEventId)
    // The client left before its request got here: nothing to take.
    if (reply.raw.destroyed) return reply.hijack()

    // Everything the stream takes is given back when its response closes
    // (the client went away, or the answer was sent), whatever point the
    // set-up had reached; the set-up stops at the next step once it has.
    let closed = false
    let releaseSlot: (() => void) | undefined
    let unsubscribe: (() => void) | undefined
    let claims: Awaited<ReturnType<typeof app.authorize>>
    let stream: EventStream | undefined
    let bounds: LogBounds
    // Idempotent, so `on` rather than `once`, whose wrapper every stream would keep.
    reply.raw.on('close', () => {
      closed = true
      unmarkStreamConnection(request.raw)
      releaseSlot?.()
      unsubscribe?.()
      if (stream !== undefined) {
        // Both are no-ops for a stream that never went live.
        if (claims?.exp !== undefined) expiries.delete(stream, claims.exp)
        app.streams.delete(stream)
      }
    })

    try {
      // Counted before the token is checked (a ticket is spent by the check).
      releaseSlot = app.streamLimits.acquire(request.ip)
      // Checked before the token too, so that a ticket is not spent on a
      // stream that cannot be opened now.
      if (app.listener.state === 'disconnected' || app.listener.state === 'closed') throw new UnavailableError(LISTENER_DOWN)
      claims = await app.authorize(request, 'subscribe', channels)
      if (closed) return reply.hijack()
      stream = new EventStream(reply.raw, {
        maxBufferedBytes: config.STREAM_BUFFER_BYTES,
        tally: app.metrics.streamTally,
        onCutOff: (droppedFrames) => {
          app.metrics.streamsCutOff.inc()
          app.metrics.framesDropped.inc(droppedFrames)
          request.log.warn({ channels }, 'stream cut off: the client is not reading')
        }
      })
      try {
        unsubscribe = await app.hub.subscribe(channels, stream)
      } catch {
        throw new UnavailableError(LISTENER_DOWN)
      }
      if (closed) {
        unsubscribe()
        return reply.hijack()
      }
      try {
        // Read after the LISTENs took effect: whatever commits later arrives live.
        bounds = await readLogBounds(app.pg.pool, resumeFrom)
      } catch {
        throw new UnavailableError('the event log cannot be read right now; retry shortly')
      }
    } catch (err) {
      return retryLater(request, reply, err as FastifyError, config.RETRY_MS)
    }
    // The response was destroyed and its 'close' is still to come: that
    // releases what was taken.
    if (closed || reply.raw.destroyed) return reply.hijack()

    const start = startPosition(resumeFrom, bounds)
    stream.startAfter(start.after)
    // The stream begins only now, with its channels LISTENed: an event
    // committed after the client sees the response is never missed.
    reply.hijack()
    const exp = claims?.exp
    app.streams.add(stream)
    let preamble = encodeRetry(jittered(config.RETRY_MS)) + encodeEvent({
      id: String(start.after),
      event: GATEWAY_EVENTS.open,
      data: JSON.stringify({ lastEventId: String(start.after), head: String(bounds.head) })
    })
    if (start.missed) {
      preamble += encodeEvent({
        event: GATEWAY_EVENTS.missed,
        data: JSON.stringify({ lastEventId: String(resumeFrom), resumedAfter: String(start.after) })
      })
    }
    stream.open({ ...reply.getHeaders() as OutgoingHttpHeaders, ...EVENT_STREAM_HEADERS }, preamble)
    // The stream lives no longer than its token: the client reconnects with a fresh one.
    if (exp !== undefined) expiries.add(stream, exp)

    if (start.after < bounds.head) {
      try {
        const replayed = await replayLog(app, stream, channels, start.after)
        app.metrics.eventsReplayed.inc(replayed)
      } catch (err) {
        // The client reconnects with the last id it got, and resumes.
        request.log.warn({ err: { message: (err as Error).message } }, 'replay failed; ending the stream')
        stream.end().catch(() => {})
        return reply
      }
    }
    stream.release()
    return reply
  })

  routes.post('/events', {
    bodyLimit: config.MAX_BATCH_BYTES,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.publishRateLimit],
    // A batch is JSON; each event's data is kept as the client's JSON text.
    config: { body: { capture: BATCH_DATA, text: false } },
    schema: { body: BatchBody }
  }, async (request, reply) => {
    const { events } = request.body
    if (events.length > config.MAX_BATCH_EVENTS) {
      throw new BadRequestError(`a batch may have at most ${config.MAX_BATCH_EVENTS} events`)
    }
    const channels = events.map((e) => e.channel)
    checkChannelNames(channels)
    await app.authorize(request, 'publish', new Set(channels))
    const toPublish = events.map((e, i) => ({ channel: e.channel, payload: toPayload(e, config.MAX_PAYLOAD_BYTES, `events[${i}].data`) }))
    const ids = await app.publishAll(request, toPublish)
    reply.code(201)
    return { ids }
  })
}
