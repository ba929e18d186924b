import type { OutgoingHttpHeaders } from 'node:http'
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { BadRequestError, UnavailableError } from '../errors.js'
import { EVENT_STREAM_HEADERS, EventStream, GATEWAY_EVENTS } from '../event-stream.js'
import { type LogBounds, readLogBounds, readReplayPage } from '../event-log.js'
import { encodeEvent, encodeRetry } from '../sse.js'
import { type EventId, MAX_EVENT_ID, parseEventId } from '../event-id.js'
import { BATCH_DATA, checkChannelNames, jsonBodyParser, publishAll, toPayload, utf8BodyParser } from './publishing.js'
import { API_ROUTE } from '../plugins/security.js'

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

const BatchBody = Type.Object({
  events: Type.Array(Type.Object({
    channel: Type.String(),
    data: Type.Unknown()
  }, { required: ['channel', 'data'] }), { minItems: 1 })
})

export default async function eventsRoutes (app: FastifyInstance, { config }: EventsRoutesOptions): Promise<void> {
  const routes = app.withTypeProvider<TypeBoxTypeProvider>()
  const expiries = new ExpiryTimers()
  // A batch is UTF-8 JSON: invalid bytes are refused, not replaced by U+FFFD;
  // each event's data is kept as the client's JSON text.
  app.removeContentTypeParser(['application/json', 'text/plain'])
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, utf8BodyParser(jsonBodyParser(BATCH_DATA)))

  // No HEAD: it would open a stream whose events nobody may send.
  routes.get('/events', {
    schema: { querystring: StreamQuery },
    exposeHeadRoute: false,
    ...API_ROUTE
  }, async (request, reply) => {
    const channels = [...new Set(request.query.channel)]
    if (channels.length > config.MAX_CHANNELS_PER_STREAM) {
      throw new BadRequestError(`a stream may have at most ${config.MAX_CHANNELS_PER_STREAM} channels`)
    }
    checkChannelNames(channels)
    // EventSource sends the header on reconnect; the query parameter serves
    // a first connection from a client that kept its place.
    const resumeFrom = resumeId(request.headers['last-event-id'] ?? request.query.lastEventId)
    // Counted before the token is checked (a ticket is spent by the check);
    // released when the response closes, however the request ends.
    const releaseSlot = app.streamLimits.acquire(request.ip)
    reply.raw.on('close', releaseSlot)
    const claims = await app.authorize(request, 'subscribe', channels)

    const stream = new EventStream(reply.raw, {
      maxBufferedBytes: config.STREAM_BUFFER_BYTES,
      tally: app.metrics.streamTally,
      onCutOff: (droppedFrames) => {
        app.metrics.streamsCutOff.inc()
        app.metrics.framesDropped.inc(droppedFrames)
        request.log.warn({ channels }, 'stream cut off: the client is not reading')
      }
    })
    let unsubscribe: () => void
    let bounds: LogBounds
    try {
      unsubscribe = await app.hub.subscribe(channels, stream)
    } catch {
      throw new UnavailableError('the gateway cannot listen to the database right now; retry shortly')
    }
    try {
      // Read after the LISTENs took effect: whatever commits later arrives live.
      bounds = await readLogBounds(app.pg.pool, resumeFrom)
    } catch {
      unsubscribe()
      throw new UnavailableError('the event log cannot be read right now; retry shortly')
    }
    if (request.raw.destroyed || reply.raw.destroyed) {
      unsubscribe()
      return reply.hijack()
    }

    const start = startPosition(resumeFrom, bounds)
    stream.startAfter(start.after)
    // The stream begins only now, with its channels LISTENed: an event
    // committed after the client sees the response is never missed.
    reply.hijack()
    app.streams.add(stream)
    const exp = claims?.exp
    reply.raw.on('close', () => {
      if (exp !== undefined) expiries.delete(stream, exp)
      unsubscribe()
      app.streams.delete(stream)
    })
    let preamble = encodeRetry(config.RETRY_MS) + encodeEvent({
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
    schema: { body: BatchBody }
  }, async (request, reply) => {
    const { events } = request.body
    if (events.length > config.MAX_BATCH_EVENTS) {
      throw new BadRequestError(`a batch may have at most ${config.MAX_BATCH_EVENTS} events`)
    }
    const channels = events.map((e) => e.channel)
    checkChannelNames(channels)
    const claims = await app.authorize(request, 'publish', new Set(channels))
    const toPublish = events.map((e, i) => ({ channel: e.channel, payload: toPayload(e, config.MAX_PAYLOAD_BYTES, `events[${i}].data`) }))
    const ids = await publishAll(app, request, claims, toPublish)
    reply.code(201)
    return { ids }
  })
}
