import type { FastifyInstance } from 'fastify'

export default async function healthRoutes (app: FastifyInstance): Promise<void> {
  app.get('/healthz', { logLevel: 'warn' }, async () => ({ status: 'ok' }))

  app.get('/readyz', { logLevel: 'warn' }, async (_request, reply) => {
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
