import type { FastifyInstance } from 'fastify'
import { pollingLogLevel } from '../logging.js'
import { API_ROUTE } from '../plugins/security.js'

export default async function healthRoutes (app: FastifyInstance): Promise<void> {
  // The process is up even when it sheds load: a liveness probe that
  // restarted an overloaded gateway would only make matters worse.
  app.get('/healthz', { logLevel: pollingLogLevel(app), config: { pressureHandler: () => undefined }, ...API_ROUTE }, async () => ({ status: 'ok' }))

  app.get('/readyz', { ...API_ROUTE, logLevel: pollingLogLevel(app) }, async (_request, reply) => {
    const listener = app.listener.connected
    let database = false
    try {
      await app.pg.query('SELECT 1')
      database = true
    } catch {}
    const ready = listener && database
    reply.code(ready ? 200 : 503)
    return { status: ready ? 'ready' : 'unavailable', listener, database }
  })
}
