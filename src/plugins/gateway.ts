import fp from 'fastify-plugin'
import { pruneLog, type RetentionPolicy } from '../event-log.js'
import { FlushLine } from '../event-stream.js'
import { ChannelHub } from '../hub.js'
import { ListenerConnection, type ListenerOptions } from '../listener.js'
import { encodeComment } from '../sse.js'
import { StreamCore, type Subscriber } from '../stream-core.js'

declare module 'fastify' {
  interface FastifyInstance {
    listener: ListenerConnection
    hub: ChannelHub
    /** History then live for every stream (src/stream-core.ts). */
    streamCore: StreamCore
    /** Where streams with frames queued wait for their write (src/event-stream.ts). */
    flushLine: FlushLine
    /** Every SSE stream open on this app. */
    streams: Set<Subscriber>
  }
}

export interface GatewayPluginOptions {
  /** The listener connection: its database and timings. */
  listener: ListenerOptions
  /** Milliseconds between heartbeat comments on every stream. */
  heartbeatMs: number
  /** The stream core's: bytes of live events held during a stream's set-up before it is cut off; the base of `retry:` (ms). */
  streams: { maxHeldBytes: number, retryMs: number }
  /** What the event log keeps, and every how many milliseconds it is pruned to that. */
  retention: RetentionPolicy & { intervalMs: number }
}

/** The listener connection, the hub fed by it, the stream core and the flush line, owned by the app. */
export default fp<GatewayPluginOptions>(async function gatewayPlugin (app, options) {
  const { heartbeatMs, retention: { intervalMs: retentionIntervalMs, ...retention } } = options
  // A timer of 0 ms (or NaN, which setInterval takes as 1) would spin.
  for (const [name, ms] of [['heartbeatMs', heartbeatMs], ['retention.intervalMs', retentionIntervalMs]] as const) {
    if (!(Number.isInteger(ms) && ms > 0)) throw new TypeError(`the gateway plugin's ${name} must be a positive whole number of milliseconds`)
  }
  const listener = new ListenerConnection(options.listener)
  const hub = new ChannelHub(listener)
  const { metrics } = app
  const streamCore = new StreamCore({
    hub,
    log: app.pg.pool,
    maxHeldBytes: options.streams.maxHeldBytes,
    retryMs: options.streams.retryMs,
    onReplayed: (count) => metrics.eventsReplayed.inc(count)
  })
  const streams = streamCore.subscribers
  const flushLine = new FlushLine()

  listener.on('event', (event) => {
    const started = performance.now()
    metrics.eventsDelivered.inc(hub.deliver(event))
    metrics.fanOutDuration.observe((performance.now() - started) / 1000)
    metrics.eventsReceived.inc({ kind: event.id === undefined ? 'plain' : 'logged' })
  })
  listener.on('discontinuity', ({ cause, resumedAfter }) => {
    const told = streamCore.missed(cause, resumedAfter)
    app.log.warn({ cause, resumedAfter, streamsTold: told }, cause === 'pruned'
      ? 'retention pruned events the listener had not read while away; streams told'
      : 'the event log forked (a failover lost events already delivered); streams told and rewound')
  })
  listener.on('connected', ({ reconnected, caughtUp }) => {
    if (!reconnected) {
      app.log.info('listener connected')
      return
    }
    metrics.listenerReconnects.inc()
    metrics.eventsCaughtUp.inc(caughtUp)
    // Logged events were caught up from the log; plain NOTIFYs sent while
    // the listener was away are gone, and every stream is told so.
    const told = streamCore.gap()
    app.log.info({ channels: listener.channels.size, caughtUp, streamsTold: told }, 'listener reconnected, re-LISTENed its channels and caught up')
  })
  listener.on('disconnected', (err) => {
    app.log.warn({ err: { message: err.message } }, 'listener connection lost; reconnecting')
  })
  listener.on('error', (err) => {
    app.log.error({ err: { message: err.message, code: (err as { code?: string }).code } }, 'listener error')
  })

  await listener.connect()
  app.decorate('listener', listener)
  app.decorate('hub', hub)
  app.decorate('streamCore', streamCore)
  app.decorate('flushLine', flushLine)
  app.decorate('streams', streams)

  // One timer for all streams, and one shared frame.
  const heartbeat = Buffer.from(encodeComment('heartbeat'))
  const heartbeatTimer = setInterval(() => {
    for (const stream of streams) stream.write(heartbeat)
  }, heartbeatMs)
  heartbeatTimer.unref()

  const retentionTimer = setInterval(() => {
    pruneLog(app.pg.pool, retention).then((deleted) => {
      if (deleted > 0) app.log.info({ deleted }, 'event log pruned')
    }, (err: Error) => app.log.warn({ err: { message: err.message } }, 'pruning the event log failed'))
  }, retentionIntervalMs)
  retentionTimer.unref()

  // Streams never finish by themselves: end them so that close() can finish.
  // Clients reconnect (elsewhere) on their own.
  app.addHook('preClose', async () => {
    clearInterval(heartbeatTimer)
    clearInterval(retentionTimer)
    // Once their last chunk is out the connections are idle, and the
    // server closes them at once instead of waiting for keep-alive to lapse.
    await streamCore.endAll()
  })
  app.addHook('onClose', async () => {
    flushLine.close()
    await listener.close()
  })
}, { name: 'gateway', dependencies: ['gateway-metrics'] })
