import fp from 'fastify-plugin'
import type { EventStream } from '../event-stream.js'
import { ChannelHub } from '../hub.js'
import { ListenerConnection } from '../listener.js'
import { encodeComment } from '../sse.js'

declare module 'fastify' {
  interface FastifyInstance {
    listener: ListenerConnection
    hub: ChannelHub
    /** Every SSE stream open on this app. */
    streams: Set<EventStream>
  }
}

export interface GatewayPluginOptions {
  connectionString: string
  heartbeatMs: number
}

/** The listener connection and the hub fed by it, owned by the app. */
export default fp<GatewayPluginOptions>(async function gatewayPlugin (app, { connectionString, heartbeatMs }) {
  const listener = new ListenerConnection({ connectionString })
  const hub = new ChannelHub(listener)
  const streams = new Set<EventStream>()
  const { metrics } = app
  let everConnected = false

  listener.on('event', (event) => {
    metrics.eventsReceived.inc({ kind: event.id === undefined ? 'plain' : 'logged' })
    metrics.eventsDelivered.inc(hub.deliver(event))
  })
  listener.on('connected', () => {
    metrics.listenerConnected.set(1)
    metrics.channelsListened.set(listener.channels.size)
    if (everConnected) {
      metrics.listenerReconnects.inc()
      app.log.info({ channels: listener.channels.size }, 'listener reconnected and re-LISTENed its channels')
    } else {
      app.log.info('listener connected')
    }
    everConnected = true
  })
  listener.on('disconnected', (err) => {
    metrics.listenerConnected.set(0)
    app.log.warn({ err: { message: err.message } }, 'listener connection lost; reconnecting')
  })
  listener.on('error', (err) => {
    app.log.error({ err: { message: err.message, code: (err as { code?: string }).code } }, 'listener error')
  })

  await listener.connect()
  app.decorate('listener', listener)
  app.decorate('hub', hub)
  app.decorate('streams', streams)

  // One timer for all streams, and one shared frame.
  const heartbeat = Buffer.from(encodeComment('heartbeat'))
  const heartbeatTimer = setInterval(() => {
    for (const stream of streams) stream.write(heartbeat)
  }, heartbeatMs)
  heartbeatTimer.unref()

  // Streams never finish by themselves: end them so that close() can finish.
  // Clients reconnect (elsewhere) on their own.
  app.addHook('preClose', async () => {
    clearInterval(heartbeatTimer)
    for (const stream of streams) stream.end()
  })
  app.addHook('onClose', async () => {
    await listener.close()
  })
}, { name: 'gateway', dependencies: ['gateway-metrics'] })
