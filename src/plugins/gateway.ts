import fp from 'fastify-plugin'
import type { GatewayConfig } from '../config.js'
import { pruneLog } from '../event-log.js'
import { FlushLine, GATEWAY_EVENTS } from '../event-stream.js'
import { ChannelHub } from '../hub.js'
import { ListenerConnection } from '../listener.js'
import { encodeComment, encodeEvent } from '../sse.js'
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
  connectionString: string
  config: GatewayConfig
}

/** The listener connection, the hub fed by it, the stream core and the flush line, owned by the app. */
export default fp<GatewayPluginOptions>(async function gatewayPlugin (app, { connectionString, config }) {
  const listener = new ListenerConnection({
    connectionString,
    livenessIntervalMs: config.LISTENER_LIVENESS_INTERVAL_MS,
    livenessTimeoutMs: config.LISTENER_LIVENESS_TIMEOUT_MS,
    reconnectDelayMaxMs: config.LISTENER_RECONNECT_MAX_MS
  })
  const hub = new ChannelHub(listener)
  const { metrics } = app
  const streamCore = new StreamCore({
    hub,
    log: app.pg.pool,
    maxHeldBytes: config.STREAM_BUFFER_BYTES,
    retryMs: config.RETRY_MS,
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
    const told = hub.broadcast(Buffer.from(encodeEvent({ event: GATEWAY_EVENTS.gap, data: JSON.stringify({ reason: 'listener reconnected: plain notifications sent meanwhile may be lost' }) })))
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
  }, config.HEARTBEAT_MS)
  heartbeatTimer.unref()

  const retentionTimer = setInterval(() => {
    pruneLog(app.pg.pool, {
      maxAgeSeconds: config.RETENTION_MAX_AGE_SECONDS,
      maxEvents: config.RETENTION_MAX_EVENTS,
      idempotencyWindowSeconds: config.IDEMPOTENCY_WINDOW_SECONDS
    }).then((deleted) => {
      if (deleted > 0) app.log.info({ deleted }, 'event log pruned')
    }, (err: Error) => app.log.warn({ err: { message: err.message } }, 'pruning the event log failed'))
  }, config.RETENTION_INTERVAL_MS)
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
