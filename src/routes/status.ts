import type { FastifyInstance, FastifyRequest } from 'fastify'
import type { GatewayConfig } from '../config.js'
import { ForbiddenError, UnauthorizedError, UnavailableError } from '../errors.js'
import { type LogBounds, readLogBounds } from '../event-log.js'
import type { GatewayClaims } from '../plugins/auth.js'
import { pollingLogLevel } from '../logging.js'
import { API_ROUTE } from '../plugins/security.js'

export interface StatusRoutesOptions {
  config: GatewayConfig
}

/**
 * The operator's views of this instance (GET /status, GET /metrics) need a
 * token with `"admin": true` (`npm run token -- --admin`), in the
 * Authorization header: channel names, and how many streams, channels and
 * events there are, say more than a client should learn.
 */
export async function authorizeOperator (request: FastifyRequest): Promise<void> {
  let claims: GatewayClaims
  try {
    claims = await request.jwtVerify<GatewayClaims>()
  } catch (err) {
    const code = (err as { code?: string }).code
    const missing = code === 'FST_JWT_NO_AUTHORIZATION_IN_HEADER' || code === 'FST_JWT_NO_AUTHORIZATION_IN_COOKIE'
    throw new UnauthorizedError(missing ? 'this needs an operator token: send Authorization: Bearer <token>' : 'the token is invalid or has expired')
  }
  if (claims.admin !== true) throw new ForbiddenError('this needs a token with "admin": true')
}

export default async function statusRoutes (app: FastifyInstance, { config }: StatusRoutesOptions): Promise<void> {
  const startedAt = new Date()

  // Failed attempts count against the address, as on every other route.
  const operator = async (request: FastifyRequest): Promise<void> => await app.attemptAuthentication(request, async () => await authorizeOperator(request))

  // Prometheus scrapes with the operator token as its bearer token.
  app.get('/metrics', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (request, reply) => {
    await operator(request)
    reply.type(app.metrics.registry.contentType)
    return await app.metrics.registry.metrics()
  })

  app.get('/status', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (request) => {
    await operator(request)
    let log: LogBounds
    try {
      log = await readLogBounds(app.pg.pool)
    } catch {
      throw new UnavailableError('the event log cannot be read right now')
    }
    const { listener, hub } = app
    const channels = [...listener.channels].sort().map((name) => {
      const activity = hub.activity(name)
      return {
        name,
        subscribers: hub.subscriberCount(name),
        lastEventAt: activity === undefined || activity.lastEventAt === 0 ? null : new Date(activity.lastEventAt).toISOString(),
        lastEventId: activity?.lastEventId ?? null
      }
    })
    return {
      startedAt: startedAt.toISOString(),
      streams: app.streams.size,
      listener: {
        state: listener.state,
        reconnects: listener.reconnects,
        lastEventId: String(listener.position),
        channels: channels.length
      },
      channels,
      log: {
        head: String(log.head),
        prunedThrough: String(log.prunedThrough),
        retention: { maxAgeSeconds: config.RETENTION_MAX_AGE_SECONDS, maxEvents: config.RETENTION_MAX_EVENTS }
      }
    }
  })
}
