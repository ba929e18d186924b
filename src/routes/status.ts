import type { FastifyInstance } from 'fastify'
import { UnavailableError } from '../errors.js'
import { type LogBounds, readLogBounds, type RetentionPolicy } from '../event-log.js'
import { pollingLogLevel } from '../logging.js'
import { API_ROUTE } from '../plugins/security.js'

export interface StatusRoutesOptions {
  /** What the event log keeps, as GET /status reports it. */
  retention: Pick<RetentionPolicy, 'maxAgeSeconds' | 'maxEvents'>
}

/** GET /status and GET /metrics: the operator's views (app.authorizeOperator). */
export default async function statusRoutes (app: FastifyInstance, { retention }: StatusRoutesOptions): Promise<void> {
  const startedAt = new Date()

  // Prometheus scrapes with the operator token as its bearer token.
  app.get('/metrics', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (request, reply) => {
    await app.authorizeOperator(request)
    reply.type(app.metrics.registry.contentType)
    return await app.metrics.registry.metrics()
  })

  app.get('/status', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (request) => {
    await app.authorizeOperator(request)
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
        lastEventId: activity?.lastEventId === undefined ? null : String(activity.lastEventId)
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
        retention: { maxAgeSeconds: retention.maxAgeSeconds, maxEvents: retention.maxEvents }
      }
    }
  })
}
