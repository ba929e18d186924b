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
 * The operator's view of this instance: needs a token with `"admin": true`
 * (`npm run token -- --admin`), since channel names may say more than a
 * subscriber should learn.
 */
export async function authorizeOperator (request: FastifyRequest): Promise<void> {
  let claims: GatewayClaims
  try {
    claims = await request.jwtVerify<GatewayClaims>()
  } catch (err) {
    const code = (err as { code?: string }).code
    const missing = code === 'FST_JWT_NO_AUTHORIZATION_IN_HEADER' || code === 'FST_JWT_NO_AUTHORIZATION_IN_COOKIE'
    throw new UnauthorizedError(missing ? 'the status needs an operator token: send Authorization: Bearer <token>' : 'the token is invalid or has expired')
  }
  if (claims.admin !== true) throw new ForbiddenError('the status needs a token with "admin": true')
}

export default async function statusRoutes (app: FastifyInstance, { config }: StatusRoutesOptions): Promise<void> {
  const startedAt = new Date()

  app.get('/status', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (request) => {
    await authorizeOperator(request)
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
