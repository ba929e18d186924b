import fp from 'fastify-plugin'
import type { StreamTally } from '../event-stream.js'
import { Counter, Gauge, Histogram, Registry, collectDefaultMetrics } from 'prom-client'

export interface GatewayMetrics {
  registry: Registry
  streamsOpen: Gauge
  channelsListened: Gauge
  listenerConnected: Gauge
  notifyQueueUsage: Gauge
  listenerReconnects: Counter
  eventsPublished: Counter
  publishTransactions: Counter
  eventsReceived: Counter<'kind'>
  eventsDelivered: Counter
  eventsReplayed: Counter
  eventsCaughtUp: Counter
  streamsCutOff: Counter
  framesDropped: Counter
  /** What the streams count on the hot path, read at scrape time. */
  streamTally: StreamTally
  bytesWritten: Counter
  poolConnections: Gauge<'state'>
  publishDuration: Histogram<'route'>
  fanOutDuration: Histogram
}

// Routes whose 201s are timed by pgsse_publish_duration_seconds.
const PUBLISH_ROUTES = new Set(['/channels/:channel', '/events'])

declare module 'fastify' {
  interface FastifyInstance {
    metrics: GatewayMetrics
  }
}

// One registry per app, so that several apps in one process (tests, several
// gateways embedded in a host) do not mix their figures.
export default fp(async function metricsPlugin (app) {
  const registry = new Registry()
  const streamTally: StreamTally = { bytesWritten: 0 }
  let bytesReported = 0
  let transactionsReported = 0
  collectDefaultMetrics({ register: registry, prefix: 'pgsse_process_' })
  // Gauges of state held elsewhere are read when scraped, not kept in step.
  const metrics: GatewayMetrics = {
    registry,
    streamsOpen: new Gauge({
      name: 'pgsse_streams_open',
      help: 'SSE streams open now',
      registers: [registry],
      collect () { this.set(app.hasDecorator('streams') ? app.streams.size : 0) }
    }),
    channelsListened: new Gauge({
      name: 'pgsse_channels_listened',
      help: 'Channels the listener connection LISTENs on',
      registers: [registry],
      collect () { this.set(app.hasDecorator('listener') ? app.listener.channels.size : 0) }
    }),
    listenerConnected: new Gauge({
      name: 'pgsse_listener_connected',
      help: '1 while the listener connection is up and live',
      registers: [registry],
      collect () { this.set(app.hasDecorator('listener') && app.listener.connected ? 1 : 0) }
    }),
    notifyQueueUsage: new Gauge({
      name: 'pgsse_notify_queue_usage_ratio',
      help: 'pg_notification_queue_usage(): the fraction of the NOTIFY queue in use; at 1 publishing fails',
      registers: [registry],
      async collect () {
        try {
          const { rows } = await app.pg.query<{ usage: number }>('SELECT pg_notification_queue_usage() AS usage')
          this.set(rows[0]?.usage ?? 0)
        } catch {}
      }
    }),
    listenerReconnects: new Counter({ name: 'pgsse_listener_reconnects_total', help: 'Times the listener connection was re-established', registers: [registry] }),
    eventsPublished: new Counter({ name: 'pgsse_events_published_total', help: 'Events committed through this instance', registers: [registry] }),
    eventsReceived: new Counter({ name: 'pgsse_events_received_total', help: 'Notifications received by the listener', labelNames: ['kind'], registers: [registry] }),
    eventsDelivered: new Counter({ name: 'pgsse_events_delivered_total', help: 'Event frames written to streams', registers: [registry] }),
    eventsReplayed: new Counter({ name: 'pgsse_events_replayed_total', help: 'Events replayed from the log to resuming streams', registers: [registry] }),
    eventsCaughtUp: new Counter({ name: 'pgsse_events_caught_up_total', help: 'Events the listener read from the log after reconnecting', registers: [registry] }),
    streamsCutOff: new Counter({ name: 'pgsse_streams_cut_off_total', help: 'Streams ended because the client did not read fast enough', registers: [registry] }),
    framesDropped: new Counter({ name: 'pgsse_frames_dropped_total', help: 'Event frames thrown away with the streams cut off (their clients resume from the log)', registers: [registry] }),
    streamTally,
    publishTransactions: new Counter({
      name: 'pgsse_publish_transactions_total',
      help: 'Transactions run by publishes without an Idempotency-Key, retries included (concurrent publishes share one; events_published / this is the mean group)',
      registers: [registry],
      collect () {
        const committed = app.hasDecorator('publisher') ? app.publisher.groups : 0
        this.inc(committed - transactionsReported)
        transactionsReported = committed
      }
    }),
    bytesWritten: new Counter({
      name: 'pgsse_bytes_written_total',
      help: 'Bytes of events written to streams',
      registers: [registry],
      collect () {
        this.inc(streamTally.bytesWritten - bytesReported)
        bytesReported = streamTally.bytesWritten
      }
    }),
    poolConnections: new Gauge({
      name: 'pgsse_pool_connections',
      help: 'Publishing pool connections: total, idle, and requests waiting for one',
      labelNames: ['state'],
      registers: [registry],
      collect () {
        const { totalCount, idleCount, waitingCount } = app.pg.pool
        this.set({ state: 'total' }, totalCount)
        this.set({ state: 'idle' }, idleCount)
        this.set({ state: 'waiting' }, waitingCount)
      }
    }),
    publishDuration: new Histogram({
      name: 'pgsse_publish_duration_seconds',
      help: 'Time from a publish request to its 201, COMMIT included',
      labelNames: ['route'],
      buckets: [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
      registers: [registry]
    }),
    fanOutDuration: new Histogram({
      name: 'pgsse_fanout_duration_seconds',
      help: 'Time to hand one received event to every stream on its channel',
      buckets: [0.00001, 0.00005, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05],
      registers: [registry]
    })
  }
  app.decorate('metrics', metrics)

  app.addHook('onResponse', async (request, reply) => {
    const route = request.routeOptions.url
    if (reply.statusCode === 201 && route !== undefined && PUBLISH_ROUTES.has(route)) {
      metrics.publishDuration.observe({ route }, reply.elapsedTime / 1000)
    }
  })
}, { name: 'gateway-metrics' })
