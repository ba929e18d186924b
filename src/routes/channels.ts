import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { checkChannelNames } from '../channel.js'
import { checkPayload } from '../payload.js'
import { API_ROUTE } from '../plugins/security.js'

export interface ChannelsRoutesOptions {
  config: GatewayConfig
}

const ChannelParams = Type.Object({ channel: Type.String() })

export default async function channelsRoutes (app: FastifyInstance, { config }: ChannelsRoutesOptions): Promise<void> {
  app.withTypeProvider<TypeBoxTypeProvider>().post('/channels/:channel', {
    bodyLimit: config.MAX_PAYLOAD_BYTES,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.publishRateLimit],
    // The payload is the body as sent: JSON is checked, then kept as text.
    config: { body: { json: 'text' } },
    schema: { params: ChannelParams }
  }, async (request, reply) => {
    const { channel } = request.params
    checkChannelNames([channel])
    await app.authorize(request, 'publish', [channel])
    const payload = typeof request.body === 'string' ? request.body : ''
    checkPayload(payload, config.MAX_PAYLOAD_BYTES, 'the payload')
    const [id] = await app.publishAll(request, [{ channel, payload }])
    reply.code(201)
    return { id, channel }
  })
}
