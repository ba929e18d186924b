import type { OutgoingHttpHeaders } from 'node:http'
import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { BadRequestError, UnavailableError } from '../errors.js'
import { EVENT_STREAM_HEADERS, EventStream } from '../event-stream.js'
import { encodeRetry } from '../sse.js'
import { checkChannelNames, publishAll, toPayload } from './publishing.js'

export interface EventsRoutesOptions {
  config: GatewayConfig
}

const StreamQuery = Type.Object({
  // A single ?channel=x arrives as a string and is coerced to [x].
  channel: Type.Array(Type.String(), { minItems: 1 }),
  access_token: Type.Optional(Type.String())
})

const BatchBody = Type.Object({
  events: Type.Array(Type.Object({
    channel: Type.String(),
    data: Type.Unknown()
  }, { required: ['channel', 'data'] }), { minItems: 1 })
})

export default async function eventsRoutes (app: FastifyInstance, { config }: EventsRoutesOptions): Promise<void> {
  const routes = app.withTypeProvider<TypeBoxTypeProvider>()

  routes.get('/events', { schema: { querystring: StreamQuery } }, async (request, reply) => {
    const channels = [...new Set(request.query.channel)]
    checkChannelNames(channels)
    if (channels.length > config.MAX_CHANNELS_PER_STREAM) {
      throw new BadRequestError(`a stream may have at most ${config.MAX_CHANNELS_PER_STREAM} channels`)
    }
    await app.authorize(request, 'subscribe', channels)

    const stream = new EventStream(reply.raw, {
      maxBufferedBytes: config.STREAM_BUFFER_BYTES,
      onCutOff: () => {
        app.metrics.streamsCutOff.inc()
        request.log.warn({ channels }, 'stream cut off: the client is not reading')
      }
    })
    let unsubscribe: () => void
    try {
      unsubscribe = await app.hub.subscribe(channels, stream)
    } catch {
      throw new UnavailableError('the gateway cannot listen to the database right now; retry shortly')
    }
    if (request.raw.destroyed || reply.raw.destroyed) {
      unsubscribe()
      return reply.hijack()
    }
    // The stream begins only now, with its channels LISTENed: an event
    // committed after the client sees the response is never missed.
    reply.hijack()
    app.streams.add(stream)
    reply.raw.on('close', () => {
      unsubscribe()
      app.streams.delete(stream)
    })
    stream.open({ ...reply.getHeaders() as OutgoingHttpHeaders, ...EVENT_STREAM_HEADERS }, encodeRetry(config.RETRY_MS))
  })

  routes.post('/events', {
    bodyLimit: config.MAX_BATCH_BYTES,
    schema: { body: BatchBody }
  }, async (request, reply) => {
    const { events } = request.body
    if (events.length > config.MAX_BATCH_EVENTS) {
      throw new BadRequestError(`a batch may have at most ${config.MAX_BATCH_EVENTS} events`)
    }
    const channels = events.map((e) => e.channel)
    checkChannelNames(channels)
    await app.authorize(request, 'publish', new Set(channels))
    const toPublish = events.map((e, i) => ({ channel: e.channel, payload: toPayload(e.data, config.MAX_PAYLOAD_BYTES, `events[${i}].data`) }))
    const ids = await publishAll(app, toPublish)
    reply.code(201)
    return { ids }
  })
}
