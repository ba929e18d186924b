import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import { checkChannelNames } from '../channel.js'
import { checkPayload } from '../payload.js'
import { API_ROUTE } from '../plugins/security.js'

export interface ChannelsRoutesOptions {
  /** MAX_PAYLOAD_BYTES: the largest payload, in UTF-8 bytes. */
  maxPayloadBytes: number
}

const ChannelParams = Type.Object({ channel: Type.String() })

export default async function channelsRoutes (app: FastifyInstance, { maxPayloadBytes }: ChannelsRoutesOptions): Promise<void> {
  app.withTypeProvider<TypeBoxTypeProvider>().post('/channels/:channel', {
    bodyLimit: maxPayloadBytes,
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
    checkPayload(payload, maxPayloadBytes, 'the payload')
    const [id] = await app.publishAll(request, [{ channel, payload }])
    reply.code(201)
    return { id, channel }
  })
}
