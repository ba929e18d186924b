import type { FastifyInstance, FastifyRequest } from 'fastify'
import { FastifySSEPlugin } from 'fastify-sse-v2'
import { ForbiddenError, UnauthorizedError, UnavailableError } from '../errors.js'
import { API_ROUTE } from '../plugins/security.js'
import { isTicket, issueTicket } from '../tickets.js'

export interface StatusStreamRoutesOptions {
  /** RETRY_MS: the reconnection delay a dashboard's EventSource is given. */
  retryMs: number
  /** PG_POOL_SIZE: the pool's size, as a sample reports it. */
  poolSize: number
  /** TICKET_TTL_SECONDS: how long an operator ticket may wait to be used. */
  ticketTtlSeconds: number
}

/**
 * The grant of an operator ticket: a ticket row (src/tickets.ts) whose only
 * "channel" is this name. No channel name may hold a `/`, so POST /tickets
 * never issues it, and GET /events refuses such a ticket (403: it does not
 * cover the channels asked for); a channel ticket lacks it and is refused
 * here. One table, one single use, any instance can redeem it.
 */
export const OPERATOR_GRANT = 'gateway/status'

/** How often the figures are sampled and sent: once a second. */
export const STATUS_INTERVAL_MS = 1000
/** Samples kept for the charts of a page that (re)connects: five minutes. */
const HISTORY_LENGTH = 300
/** Channels listed by name in a sample, the most subscribed first. */
const TOP_CHANNELS = 20
/** Dashboards open at once on an instance; each costs a little, all share one sampler. */
const MAX_STATUS_STREAMS = 32

/** One sample of the instance, sent as the `status` event (JSON). */
export interface StatusSample {
  /** Milliseconds since the epoch. */
  at: number
  streams: number
  channels: { listened: number, top: Array<{ name: string, subscribers: number }> }
  /** Per second over the last interval; null on the first sample. */
  rates: { published: number | null, delivered: number | null, cutOffs: number | null }
  totals: { published: number, delivered: number, cutOffs: number }
  listener: { state: string, reconnects: number }
  pool: { total: number, idle: number, waiting: number, max: number }
  /** pg_notification_queue_usage(), 0 to 1. */
  notifyQueueUsage: number
  /** The event loop's mean delay over under-pressure's last sample, in ms. */
  eventLoopLagMs: number
}

/** A point of the charts: what `status/history` carries, oldest first. */
export interface HistoryPoint {
  at: number
  published: number | null
  delivered: number | null
  streams: number
  eventLoopLagMs: number
}

async function counterValue (counter: { get (): Promise<{ values: Array<{ value: number }> }> }): Promise<number> {
  return (await counter.get()).values[0]?.value ?? 0
}

/**
 * Samples the instance once a second while at least one dashboard watches,
 * from what the app already keeps (metrics, streams, hub, listener, pool,
 * under-pressure). A stream waits for the next sample rather than queueing
 * them, so a slow dashboard skips samples instead of buffering them.
 */
class StatusSampler {
  readonly history: HistoryPoint[] = []
  latest: StatusSample | undefined
  readonly #app: FastifyInstance
  readonly #poolMax: number
  #watchers = 0
  #timer: NodeJS.Timeout | undefined
  #sampling = false
  #previous: { at: number, published: number, delivered: number, cutOffs: number } | undefined
  #waiters = new Set<(sample: StatusSample | undefined) => void>()

  constructor (app: FastifyInstance, poolMax: number) {
    this.#app = app
    this.#poolMax = poolMax
  }

  /** Counts a dashboard in; the first starts the timer. Returns its undo. */
  watch (): () => void {
    if (this.#watchers++ === 0) {
      // Rates after a pause would span the pause: start them afresh.
      this.#previous = undefined
      this.#timer = setInterval(() => { this.#tick() }, STATUS_INTERVAL_MS)
      this.#tick()
    }
    let watching = true
    return () => {
      if (!watching) return
      watching = false
      if (--this.#watchers === 0) {
        clearInterval(this.#timer)
        this.#timer = undefined
      }
    }
  }

  /** The next sample, or undefined once `signal` is aborted. */
  async next (signal: AbortSignal): Promise<StatusSample | undefined> {
    if (signal.aborted) return undefined
    return await new Promise((resolve) => {
      const done = (sample: StatusSample | undefined): void => {
        this.#waiters.delete(done)
        signal.removeEventListener('abort', aborted)
        resolve(sample)
      }
      const aborted = (): void => done(undefined)
      this.#waiters.add(done)
      signal.addEventListener('abort', aborted, { once: true })
    })
  }

  #tick (): void {
    // The notify-queue query waits for a pool connection: never two at once.
    if (this.#sampling) return
    this.#sampling = true
    this.#sample().then((sample) => {
      this.latest = sample
      this.history.push({ at: sample.at, published: sample.rates.published, delivered: sample.rates.delivered, streams: sample.streams, eventLoopLagMs: sample.eventLoopLagMs })
      if (this.history.length > HISTORY_LENGTH) this.history.shift()
      for (const waiter of [...this.#waiters]) waiter(sample)
    }, (err: unknown) => {
      this.#app.log.warn({ err: { message: (err as Error).message } }, 'sampling the status failed')
    }).finally(() => { this.#sampling = false })
  }

  async #sample (): Promise<StatusSample> {
    const { metrics, listener, hub, streams } = this.#app
    const [published, delivered, cutOffs, notifyQueueUsage] = await Promise.all([
      counterValue(metrics.eventsPublished),
      counterValue(metrics.eventsDelivered),
      counterValue(metrics.streamsCutOff),
      // Its collect() runs SELECT pg_notification_queue_usage(); a failure keeps the last value.
      counterValue(metrics.notifyQueueUsage)
    ])
    const at = Date.now()
    const previous = this.#previous
    this.#previous = { at, published, delivered, cutOffs }
    const perSecond = (now: number, before: number | undefined): number | null =>
      previous === undefined || before === undefined || at <= previous.at ? null : Math.round((now - before) * 10_000 / (at - previous.at)) / 10
    const top = [...listener.channels]
      .map((name) => ({ name, subscribers: hub.subscriberCount(name) }))
      .sort((a, b) => b.subscribers - a.subscribers || (a.name < b.name ? -1 : 1))
      .slice(0, TOP_CHANNELS)
    const { totalCount, idleCount, waitingCount } = this.#app.pg.pool
    const lag = this.#app.memoryUsage().eventLoopDelay
    return {
      at,
      streams: streams.size,
      channels: { listened: listener.channels.size, top },
      rates: {
        published: perSecond(published, previous?.published),
        delivered: perSecond(delivered, previous?.delivered),
        cutOffs: perSecond(cutOffs, previous?.cutOffs)
      },
      totals: { published, delivered, cutOffs },
      listener: { state: listener.state, reconnects: listener.reconnects },
      pool: { total: totalCount, idle: idleCount, waiting: waitingCount, max: this.#poolMax },
      notifyQueueUsage,
      // Infinity (under-pressure's "cannot tell") is not JSON.
      eventLoopLagMs: Number.isFinite(lag) ? Math.round(lag * 100) / 100 : -1
    }
  }

  stop (): void {
    clearInterval(this.#timer)
    for (const waiter of [...this.#waiters]) waiter(undefined)
  }
}

/** Who opened a dashboard stream, and until when it may run. */
interface OperatorGrant {
  /** Seconds since the epoch, from the operator's token. */
  expiresAt: number | undefined
}

/**
 * A dashboard stream is opened by an operator token in the Authorization
 * header (curl), or by an operator ticket as `access_token` (a browser's
 * EventSource cannot send headers). A token in the URL is refused: URLs end
 * up in logs, histories and Referer headers.
 */
async function authorizeStream (app: FastifyInstance, request: FastifyRequest): Promise<OperatorGrant> {
  const query = request.query as Record<string, unknown>
  const ticket = query.access_token
  if (request.headers.authorization !== undefined || typeof ticket !== 'string') {
    return { expiresAt: (await app.authorizeOperator(request)).exp }
  }
  // Failed attempts count against the address, as on every other route.
  return await app.attemptAuthentication(request, async () => await redeemOperatorTicket(app, request, ticket))
}

async function redeemOperatorTicket (app: FastifyInstance, request: FastifyRequest, ticket: string): Promise<OperatorGrant> {
  if (!isTicket(ticket)) {
    throw new UnauthorizedError('put no token in a URL: trade it for a ticket at POST /status/tickets, or send Authorization: Bearer <token>')
  }
  const grant = await app.useTicket(request, ticket)
  if (!grant.channels.includes(OPERATOR_GRANT)) throw new ForbiddenError('this ticket opens channel streams, not the status: get one at POST /status/tickets')
  return { expiresAt: grant.tokenExpiresAt }
}

// setTimeout takes at most a signed 32-bit count of milliseconds.
const MAX_TIMEOUT_MS = 2 ** 31 - 1

/**
 * GET /status/stream: the operator's live view, the figures of this
 * instance once a second as an SSE stream, served with fastify-sse-v2 (the
 * package our user named for streams). POST /status/tickets: an operator
 * token traded for a single-use ticket that opens it from a browser.
 */
export default async function statusStreamRoutes (app: FastifyInstance, { retryMs, poolSize, ticketTtlSeconds }: StatusStreamRoutesOptions): Promise<void> {
  // fastify-sse-v2 4.2.2 fits here, and only here, because what we send
  // cannot reach its limits (README "Choices worth knowing"):
  // - it drops an event whose data is empty (`if (chunk.data)`), and splits
  //   data on LF only, so a lone CR is written raw and the browser reads it
  //   as a line end: a payload "ok\rid: 999" injects an id (its open
  //   security issue #110). Every event here is a JSON object from
  //   JSON.stringify: never empty, and JSON escapes CR and LF inside
  //   strings, so it holds no raw line break.
  // - it buffers without bound behind a stalled client when events are
  //   pushed to it: here it pulls them, and each pull waits for the next
  //   sample (StatusSampler.next) instead of a queue, so what waits for a
  //   stalled dashboard is its read buffer (highWaterMark, 16 KB) and the
  //   response's, however long the stall.
  // - it costs 5.5 to 8.0 times our writer's CPU per delivery (an earlier
  //   session measured 8.8 to 9.4) and ~7.5 KB more heap per stream
  //   (`node --import tsx bench/sse-v2.ts`: 1,000 clients × 200 events over
  //   loopback): nothing at one event a second to a few operators, too much
  //   for /events.
  await app.register(FastifySSEPlugin, { retryDelay: retryMs })

  const sampler = new StatusSampler(app, poolSize)
  const open = new Set<AbortController>()

  app.addHook('preClose', async () => {
    // Each stream's source ends, fastify-sse-v2 ends its response, and the
    // server can close the connection.
    for (const controller of open) controller.abort()
    sampler.stop()
  })

  app.post('/status/tickets', {
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.ticketRateLimit]
  }, async (request, reply) => {
    const { sub, exp } = await app.authorizeOperator(request)
    let ticket: string
    try {
      ticket = await issueTicket(app.pg.pool, { channels: [OPERATOR_GRANT], subject: sub, tokenExpiresAt: exp }, ticketTtlSeconds)
    } catch (err) {
      request.log.error({ err: { message: (err as Error).message } }, 'issuing an operator ticket failed')
      throw new UnavailableError('the ticket could not be issued; retry shortly')
    }
    reply.code(201)
    return { ticket, expiresIn: ticketTtlSeconds }
  })

  app.get('/status/stream', { ...API_ROUTE }, async (request, reply) => {
    const grant = await authorizeStream(app, request)
    if (open.size >= MAX_STATUS_STREAMS) throw new UnavailableError(`at most ${MAX_STATUS_STREAMS} status streams may be open at once`)
    // A client gone while its ticket was checked: its 'close' has passed,
    // and a stream set up now would never be released.
    if (reply.raw.destroyed) {
      reply.hijack()
      return reply
    }

    const controller = new AbortController()
    open.add(controller)
    const unwatch = sampler.watch()
    let expiry: NodeJS.Timeout | undefined
    if (grant.expiresAt !== undefined) {
      expiry = setTimeout(() => controller.abort('expired'), Math.min(MAX_TIMEOUT_MS, Math.max(0, grant.expiresAt * 1000 - Date.now())))
    }
    reply.raw.once('close', () => {
      controller.abort()
      open.delete(controller)
      clearTimeout(expiry)
      unwatch()
    })

    async function * events (): AsyncGenerator<{ event: string, data: string }> {
      yield { event: 'status/history', data: JSON.stringify(sampler.history) }
      if (sampler.latest !== undefined) yield { event: 'status', data: JSON.stringify(sampler.latest) }
      for (;;) {
        const sample = await sampler.next(controller.signal)
        if (sample === undefined) break
        yield { event: 'status', data: JSON.stringify(sample) }
      }
      if (controller.signal.reason === 'expired') {
        yield { event: 'gateway/expired', data: JSON.stringify({ reason: 'the operator token expired: open the dashboard with a fresh one' }) }
      }
    }

    reply.header('x-accel-buffering', 'no')
    reply.sse(events())
    return reply
  })
}
