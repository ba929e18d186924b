import type { IncomingMessage, OutgoingHttpHeaders } from 'node:http'
import type { Socket } from 'node:net'
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyError, FastifyInstance, FastifyReply, FastifyRequest } from 'fastify'
import { BadRequestError, OverloadedError, UnavailableError } from '../errors.js'
import { EVENT_STREAM_HEADERS, EventStream, type EventStreamOptions, GATEWAY_EVENTS, type StreamOwner } from '../event-stream.js'
import { encodeEvent, encodeRetry } from '../sse.js'
import { jittered, type PreparedStream, type StreamRequest, StreamUnavailableError } from '../stream-core.js'
import { type EventId, MAX_EVENT_ID, parseEventId } from '../event-id.js'
import { checkChannelNames } from '../channel.js'
import { BATCH_DATA, toPayload } from '../payload.js'
import type { EventSelector } from '../hub.js'
import { filterSelector, RowFilterError, RowFilters } from '../row-filter.js'
import { API_ROUTE, API_SECURITY_HEADERS } from '../plugins/security.js'

export interface EventsRoutesOptions {
  /** MAX_CHANNELS_PER_STREAM: channels one stream may have. */
  maxChannelsPerStream: number
  /** STREAM_BUFFER_BYTES: unsent bytes of a stream whose client does not read, before it is cut off. */
  streamBufferBytes: number
  /** RETRY_MS: the base of the `retry:` advice (ms). */
  retryMs: number
  /** MAX_BATCH_BYTES and MAX_BATCH_EVENTS: a batch's body and its events. */
  maxBatchBytes: number
  maxBatchEvents: number
  /** MAX_PAYLOAD_BYTES: the largest payload, in UTF-8 bytes. */
  maxPayloadBytes: number
}

const StreamQuery = Type.Object({
  // A single ?channel=x arrives as a string and is coerced to [x].
  channel: Type.Array(Type.String(), { minItems: 1 }),
  access_token: Type.Optional(Type.String()),
  lastEventId: Type.Optional(Type.String()),
  // Row filters (src/row-filter.ts), ANDed: ?filter=status=eq.shipped&filter=total=gte.100
  filter: Type.Optional(Type.Array(Type.String()))
})

/** The stream's selector: its row filters, or undefined (every event) without any; BadRequestError naming a bad filter. */
function selectorOf (filters: string[] | undefined): EventSelector | undefined {
  if (filters === undefined || filters.length === 0) return undefined
  try {
    return filterSelector(RowFilters.parse(filters))
  } catch (err) {
    if (err instanceof RowFilterError) throw new BadRequestError(err.message)
    throw err
  }
}

function resumeId (value: string | string[] | undefined): EventId | undefined {
  if (value === undefined) return undefined
  const id = typeof value === 'string' ? parseEventId(value.trim()) : undefined
  if (id === undefined) throw new BadRequestError(`Last-Event-ID must be an event id: the digits of an id: field, at most ${MAX_EVENT_ID}`)
  return id
}

const LISTENER_DOWN = 'the gateway cannot listen to the database right now; retry shortly'

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
 * 403) is thrown as it is. `say` words the why (another protocol, such as
 * Mercure, says it without a `gateway/*` event).
 */
export function retryLater (request: FastifyRequest, reply: FastifyReply, err: FastifyError, retryMs: number, say: (refusal: { status: number, reason: string, retry: number }) => string = sayUnavailable): FastifyReply {
  const statusCode = err.statusCode ?? 500
  if (statusCode < 500 && statusCode !== 429) throw err
  const retry = jittered(2 * retryMs)
  reply.header('retry-after', Math.max(1, Math.ceil(retry / 1000)))
  // Media types are case-insensitive (RFC 9110, 8.3.1).
  if (request.headers.accept?.toLowerCase().includes('text/event-stream') !== true) throw err
  // A failure we did not name may carry internals: it is logged, not told.
  const named = err.code?.startsWith('GW_') === true
  if (!named) request.log.error({ err }, 'stream set-up failed')
  else request.log.warn({ code: err.code, message: err.message }, 'stream refused for now')
  return reply.code(200).headers({
    // A refusal from a global hook (overloaded) comes before the route's own hook.
    ...API_SECURITY_HEADERS,
    'content-type': EVENT_STREAM_HEADERS['content-type'],
    'cache-control': 'no-cache'
  }).send(encodeRetry(retry) + say({ status: statusCode, reason: named ? err.message : 'Internal Server Error', retry }))
}

function sayUnavailable (refusal: { status: number, reason: string, retry: number }): string {
  return encodeEvent({ event: GATEWAY_EVENTS.unavailable, data: JSON.stringify(refusal) })
}

// Connections whose current request is a stream's (being set up, or live),
// with that request.
const streamConnections = new WeakMap<Socket, IncomingMessage>()

/** Frees a stream's connection once its response closed (the stream routes' 'close' handlers). */
export function unmarkStreamConnection (request: IncomingMessage): void {
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
export function guardStreamConnections (app: FastifyInstance, streamRoutes: ReadonlySet<string> = new Set(['/events'])): void {
  app.addHook('onRequest', (request, reply, done) => {
    const connection = request.raw.socket
    if (streamConnections.has(connection)) {
      connection.destroy()
      reply.hijack()
    } else if (request.method === 'GET' && streamRoutes.has(request.routeOptions.url ?? '') && reply.raw.socket !== null) {
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

/**
 * What a stream route asks of serveStream, once it has parsed its request:
 * the stream core's request (channels, resume id, and the selector and
 * dialect of a route that frames events its own way), without the expiry,
 * which the credential tells.
 */
export interface StreamOpening extends Omit<StreamRequest, 'expiresAt' | 'channels'> {
  channels: string[]
  /**
   * Checks the client's credential (and reads what else the stream needs
   * from the database), once its slot is counted: resolves with when the
   * credential expires (epoch seconds), and the resume id if it is known
   * only now.
   */
  authorize: () => Promise<{ expiresAt: number | undefined, resumeFrom?: EventId }>
  /** Response headers over EVENT_STREAM_HEADERS and the reply's own, from where the stream starts. */
  headers?: (prepared: PreparedStream) => OutgoingHttpHeaders
  /** Just before the stream begins; what it returns is called once its connection closes. */
  begins?: () => (() => void) | undefined
  /** The words of a refusal that EventSource retries (retryLater's `say`). */
  sayRefusal?: (refusal: { status: number, reason: string, retry: number }) => string
}

/**
 * A stream's hold on what it took (its slot, its LISTENs), given back once
 * when its connection closes; and what is done when it is cut off.
 */
class StreamHold implements StreamOwner {
  closed = false
  releaseSlot: (() => void) | undefined
  prepared: PreparedStream | undefined
  /** The route's own, from StreamOpening.begins. */
  onClose: (() => void) | undefined
  readonly #app: FastifyInstance
  readonly #channels: readonly string[]

  constructor (app: FastifyInstance, channels: readonly string[]) {
    this.#app = app
    this.#channels = channels
  }

  streamClosed (): void {
    if (this.closed) return
    this.closed = true
    this.releaseSlot?.()
    if (this.prepared !== undefined) this.#app.streamCore.close(this.prepared)
    this.onClose?.()
  }

  streamCutOff (droppedFrames: number): void {
    this.#app.metrics.streamsCutOff.inc()
    this.#app.metrics.framesDropped.inc(droppedFrames)
    this.#app.log.warn({ channels: this.#channels }, 'stream cut off: the client is not reading')
  }
}

/** How the streams of a route are served: one object for all of them. */
export interface StreamSettings {
  /** Their buffering and flush line. */
  stream: EventStreamOptions
  /** RETRY_MS: the base of the `retry:` advice (ms). */
  retryMs: number
}

/**
 * Serves a parsed stream request: counts it against the stream limits,
 * authorizes it, sets it up with the stream core (LISTENs, start
 * position), then sends the head and hands the connection to its
 * EventStream, which keeps only the socket; the replay and the live events
 * follow. A refusal that may pass (busy, at a limit, the database
 * unreachable) is answered as retryLater says. Everything the stream took
 * is given back when its connection closes, whatever point the set-up had
 * reached. For any route that opens event streams.
 */
export async function serveStream (app: FastifyInstance, request: FastifyRequest, reply: FastifyReply, opening: StreamOpening, settings: StreamSettings): Promise<FastifyReply> {
  const { authorize, headers: routeHeaders, begins, sayRefusal, ...streamRequest } = opening
  const { channels } = opening
  // The client left before its request got here: nothing to take.
  if (reply.raw.destroyed) return reply.hijack()
  const hold = new StreamHold(app, channels)
  const connection = request.raw
  const stream = new EventStream(reply.raw, settings.stream, hold)
  try {
    // Counted before the token is checked (a ticket is spent by the check).
    hold.releaseSlot = app.streamLimits.acquire(request.ip)
    // Checked before the token too, so that a ticket is not spent on a
    // stream that cannot be opened now.
    if (app.listener.state === 'disconnected' || app.listener.state === 'closed') throw new UnavailableError(LISTENER_DOWN)
    const authorized = await authorize()
    if (hold.closed) return reply.hijack()
    try {
      hold.prepared = await app.streamCore.prepare(stream, { ...streamRequest, ...authorized })
    } catch (err) {
      throw err instanceof StreamUnavailableError ? new UnavailableError(err.message) : err
    }
  } catch (err) {
    return retryLater(request, reply, err as FastifyError, settings.retryMs, sayRefusal)
  }
  const prepared = hold.prepared
  // The response closed meanwhile (its 'close' released what was taken),
  // or was destroyed and its 'close' is still to come.
  if (hold.closed || reply.raw.destroyed) {
    app.streamCore.close(prepared)
    return reply.hijack()
  }

  // The stream begins only now, with its channels LISTENed: an event
  // committed after the client sees the response is never missed.
  reply.hijack()
  const headers = { ...reply.getHeaders() as OutgoingHttpHeaders, ...EVENT_STREAM_HEADERS, ...routeHeaders?.(prepared) }
  hold.onClose = begins?.()
  try {
    await app.streamCore.begin(prepared, (preamble) => {
      stream.open(headers, preamble)
      // The connection is the stream's now: it guards itself.
      unmarkStreamConnection(connection)
    })
  } catch (err) {
    // The client reconnects with the last id it got, and resumes.
    request.log.warn({ err: { message: (err as Error).message } }, 'replay failed; ending the stream')
  }
  return reply
}

const BatchBody = Type.Object({
  events: Type.Array(Type.Object({
    channel: Type.String(),
    data: Type.Unknown()
  }, { required: ['channel', 'data'] }), { minItems: 1 })
})

export default async function eventsRoutes (app: FastifyInstance, options: EventsRoutesOptions): Promise<void> {
  const routes = app.withTypeProvider<TypeBoxTypeProvider>()
  const streamSettings: StreamSettings = {
    stream: { maxBufferedBytes: options.streamBufferBytes, line: app.flushLine, tally: app.metrics.streamTally },
    retryMs: options.retryMs
  }

  // No HEAD: it would open a stream whose events nobody may send.
  routes.get('/events', {
    schema: { querystring: StreamQuery },
    exposeHeadRoute: false,
    // Shed under load like every route, but in words EventSource retries.
    config: {
      pressureHandler: async (request, reply) => {
        retryLater(request, reply, new OverloadedError(), options.retryMs)
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
    if (channels.length > options.maxChannelsPerStream) {
      throw new BadRequestError(`a stream may have at most ${options.maxChannelsPerStream} channels`)
    }
    checkChannelNames(channels)
    // Filters narrow what a stream gets on channels it may read: the token
    // is checked for the channels, as without them.
    const selector = selectorOf(request.query.filter)
    // EventSource sends the header on reconnect; the query parameter serves
    // a first connection from a client that kept its place.
    const resumeFrom = resumeId(request.headers['last-event-id'] ?? request.query.lastEventId)
    return await serveStream(app, request, reply, {
      channels,
      resumeFrom,
      selector,
      authorize: async () => ({ expiresAt: (await app.authorize(request, 'subscribe', channels))?.exp })
    }, streamSettings)
  })

  routes.post('/events', {
    bodyLimit: options.maxBatchBytes,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.publishRateLimit],
    // A batch is JSON; each event's data is kept as the client's JSON text.
    config: { body: { capture: BATCH_DATA, text: false } },
    schema: { body: BatchBody }
  }, async (request, reply) => {
    const { events } = request.body
    if (events.length > options.maxBatchEvents) {
      throw new BadRequestError(`a batch may have at most ${options.maxBatchEvents} events`)
    }
    const channels = events.map((e) => e.channel)
    checkChannelNames(channels)
    await app.authorize(request, 'publish', new Set(channels))
    const toPublish = events.map((e, i) => ({ channel: e.channel, payload: toPayload(e, options.maxPayloadBytes, `events[${i}].data`) }))
    const ids = await app.publishAll(request, toPublish)
    reply.code(201)
    return { ids }
  })
}
