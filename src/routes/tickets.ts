import { Type, type TypeBoxTypeProvider } from '@fastify/type-provider-typebox'
import type { FastifyInstance } from 'fastify'
import { BadRequestError, UnavailableError } from '../errors.js'
import { checkChannelNames } from '../channel.js'
import { issueTicket } from '../tickets.js'
import { API_ROUTE } from '../plugins/security.js'

export interface TicketsRoutesOptions {
  /** MAX_CHANNELS_PER_STREAM: a ticket covers no more channels than a stream may have. */
  maxChannels: number
  /** TICKET_TTL_SECONDS: how long a ticket may wait to be used. */
  ticketTtlSeconds: number
}

const TicketBody = Type.Object({
  channels: Type.Array(Type.String(), { minItems: 1 })
})

/**
 * POST /tickets: trades a token for a subscribe ticket, so that a browser
 * puts a short-lived, single-use, channel-scoped ticket in the stream's URL
 * (where URLs end up: logs, histories, Referer) instead of its token.
 */
export default async function ticketsRoutes (app: FastifyInstance, { maxChannels, ticketTtlSeconds }: TicketsRoutesOptions): Promise<void> {
  app.withTypeProvider<TypeBoxTypeProvider>().post('/tickets', {
    bodyLimit: 16 * 1024,
    helmet: API_ROUTE.helmet,
    onRequest: [API_ROUTE.onRequest, app.ticketRateLimit],
    schema: { body: TicketBody }
  }, async (request, reply) => {
    const channels = [...new Set(request.body.channels)]
    if (channels.length > maxChannels) {
      throw new BadRequestError(`a ticket may have at most ${maxChannels} channels, as a stream`)
    }
    checkChannelNames(channels)
    const claims = await app.authorize(request, 'subscribe', channels)
    let ticket: string
    try {
      ticket = await issueTicket(app.pg.pool, { channels, subject: claims?.sub, tokenExpiresAt: claims?.exp }, ticketTtlSeconds)
    } catch (err) {
      request.log.error({ err: { message: (err as Error).message } }, 'issuing a ticket failed')
      throw new UnavailableError('the ticket could not be issued; retry shortly')
    }
    reply.code(201)
    return { ticket, channels, expiresIn: ticketTtlSeconds }
  })
}
