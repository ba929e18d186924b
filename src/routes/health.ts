import type { FastifyInstance } from 'fastify'
import type pg from 'pg'
import { pollingLogLevel } from '../logging.js'
import { API_ROUTE } from '../plugins/security.js'

// The readiness probe's own bound on its query, below the pool's: a probe
// that lands on a silent connection answers 503 in this time (and the
// connection is destroyed) instead of hanging the load balancer's check.
const READY_PROBE_TIMEOUT_MS = 2000
// pg reads query_timeout from a query's config too; its types omit it.
const READY_PROBE: pg.QueryConfig & { query_timeout: number } = { text: 'SELECT 1', query_timeout: READY_PROBE_TIMEOUT_MS }

export default async function healthRoutes (app: FastifyInstance): Promise<void> {
  // The process is up even when it sheds load: a liveness probe that
  // restarted an overloaded gateway would only make matters worse.
  app.get('/healthz', { logLevel: pollingLogLevel(app), config: { pressureHandler: () => undefined }, ...API_ROUTE }, async () => ({ status: 'ok' }))

  app.get('/readyz', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (_request, reply) => {
    const listener = app.listener.connected
    let database = false
    try {
      await app.pg.query(READY_PROBE)
      // A publish group stuck on a silent connection while the pool's other
      // connections answer: publishing cannot commit, whatever the probe says.
      database = !app.publisher.stalled
    } catch {}
    const ready = listener && database
    reply.code(ready ? 200 : 503)
    return { status: ready ? 'ready' : 'unavailable', listener, database }
  })
}
