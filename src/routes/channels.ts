import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { checkChannelNames, checkPayload, jsonBodyParser, publishAll, utf8BodyParser } from './publishing.js'
import { API_ROUTE } from '../plugins/security.js'

export interface ChannelsRoutesOptions {
  config: GatewayConfig
}

const ChannelParams = Type.Object({ channel: Type.String() })

export default async function channelsRoutes (app: FastifyInstance, { config }: ChannelsRoutesOptions): Promise<void> {
  // The payload is the body as sent: JSON is checked, then kept as text.
  app.removeContentTypeParser(['application/json', 'text/plain'])
  app.addContentTypeParser('application/json', { parseAs: 'buffer' }, utf8BodyParser(jsonBodyParser(undefined, (text) => text)))
  app.addContentTypeParser('text/plain', { parseAs: 'buffer' }, utf8BodyParser((_request, text, done) => done(null, text)))

  app.withTypeProvider<TypeBoxTypeProvider>().post('/channels/:channel', {
    bodyLimit: config.MAX_PAYLOAD_BYTES,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.publishRateLimit],
    schema: { params: ChannelParams }
  }, async (request, reply) => {
    const { channel } = request.params
    checkChannelNames([channel])
    const claims = await app.authorize(request, 'publish', [channel])
    const payload = typeof request.body === 'string' ? request.body : ''
    checkPayload(payload, config.MAX_PAYLOAD_BYTES, 'the payload')
    const [id] = await publishAll(app, request, claims, [{ channel, payload }])
    reply.code(201)
    return { id, channel }
  })
}
