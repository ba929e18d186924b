import fastifyJwt from '@fastify/jwt'
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { ChannelPatterns } from '../channel.js'
import { ForbiddenError, UnauthorizedError } from '../errors.js'

export type ChannelAction = 'publish' | 'subscribe'

export interface GatewayClaims {
  sub?: string
  publish?: string[]
  subscribe?: string[]
}

declare module '@fastify/jwt' {
  interface FastifyJWT {
    payload: GatewayClaims
    user: GatewayClaims
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * Checks that the request may `action` every channel: throws 401 for a
     * missing, invalid or expired token and 403 for a token that does not
     * cover a channel. Subscribing to channels that are all public needs no
     * token. Resolves with the token's claims, or null when none was needed.
     */
    authorize (request: FastifyRequest, action: ChannelAction, channels: Iterable<string>): Promise<GatewayClaims | null>
  }
}

export interface AuthPluginOptions {
  secret: string
  publicChannels: ChannelPatterns
}

function bearerOrQueryToken (request: FastifyRequest): string | undefined {
  const header = request.headers.authorization
  if (header !== undefined) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header)
    return match?.[1] ?? ''
  }
  // EventSource cannot send headers, so streams may carry the token in the URL.
  const query = request.query as Record<string, unknown> | undefined
  const token = query?.access_token
  return typeof token === 'string' ? token : undefined
}

export default fp<AuthPluginOptions>(async function authPlugin (app, { secret, publicChannels }) {
  await app.register(fastifyJwt, {
    secret,
    sign: { algorithm: 'HS256' },
    verify: { algorithms: ['HS256'] }
  })

  app.decorate('authorize', async function authorize (request: FastifyRequest, action: ChannelAction, channels: Iterable<string>): Promise<GatewayClaims | null> {
    const wanted = [...channels]
    if (action === 'subscribe' && publicChannels.matchesAll(wanted)) return null
    const token = bearerOrQueryToken(request)
    if (token === undefined || token === '') {
      throw new UnauthorizedError(`a token is needed to ${action}: send Authorization: Bearer <token> or ?access_token=<token>`)
    }
    let claims: GatewayClaims
    try {
      claims = app.jwt.verify<GatewayClaims>(token)
    } catch (err) {
      const expired = (err as { code?: string }).code === 'FAST_JWT_EXPIRED'
      throw new UnauthorizedError(expired ? 'the token has expired' : 'the token is invalid')
    }
    const allowed = ChannelPatterns.fromClaim(claims[action])
    const denied = wanted.filter((c) => !allowed.matches(c) && !(action === 'subscribe' && publicChannels.matches(c)))
    if (denied.length > 0) {
      throw new ForbiddenError(`the token does not allow to ${action} on ${denied.map((c) => `"${c}"`).join(', ')}`)
    }
    return claims
  })
}, { name: 'gateway-auth' })
