import fp from 'fastify-plugin'
import { Counter, Gauge, Registry, collectDefaultMetrics } from 'prom-client'

export interface GatewayMetrics {
  registry: Registry
  streamsOpen: Gauge
  channelsListened: Gauge
  listenerConnected: Gauge
  listenerReconnects: Counter
  eventsPublished: Counter
  eventsReceived: Counter<'kind'>
  eventsDelivered: Counter
  streamsCutOff: Counter
}

declare module 'fastify' {
  interface FastifyInstance {
    metrics: GatewayMetrics
  }
}

// One registry per app, so that several apps in one process (tests, several
// gateways embedded in a host) do not mix their figures.
export default fp(async function metricsPlugin (app) {
  const registry = new Registry()
  collectDefaultMetrics({ register: registry, prefix: 'pgsse_process_' })
  const metrics: GatewayMetrics = {
    registry,
    streamsOpen: new Gauge({ name: 'pgsse_streams_open', help: 'SSE streams open now', registers: [registry] }),
    channelsListened: new Gauge({ name: 'pgsse_channels_listened', help: 'Channels the listener connection LISTENs on', registers: [registry] }),
    listenerConnected: new Gauge({ name: 'pgsse_listener_connected', help: '1 while the listener connection is up', registers: [registry] }),
    listenerReconnects: new Counter({ name: 'pgsse_listener_reconnects_total', help: 'Times the listener connection was re-established', registers: [registry] }),
    eventsPublished: new Counter({ name: 'pgsse_events_published_total', help: 'Events committed through this instance', registers: [registry] }),
    eventsReceived: new Counter({ name: 'pgsse_events_received_total', help: 'Notifications received by the listener', labelNames: ['kind'], registers: [registry] }),
    eventsDelivered: new Counter({ name: 'pgsse_events_delivered_total', help: 'Event frames written to streams', registers: [registry] }),
    streamsCutOff: new Counter({ name: 'pgsse_streams_cut_off_total', help: 'Streams ended because the client did not read fast enough', registers: [registry] })
  }
  app.decorate('metrics', metrics)

  app.get('/metrics', { logLevel: 'warn' }, async (_request, reply) => {
    reply.type(registry.contentType)
    return registry.metrics()
  })
}, { name: 'gateway-metrics' })
