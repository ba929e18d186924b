import type { FastifyInstance, LogLevel } from 'fastify'

const SEVERITY: Record<string, number> = { trace: 10, debug: 20, info: 30, warn: 40, error: 50, fatal: 60, silent: Infinity }

/**
 * The log level for routes polled all day (health checks, scrapes): `warn`,
 * so that their requests are not logged at `info`, but never louder than the
 * app itself (a route's logLevel replaces the app's, even `silent`).
 */
export function pollingLogLevel (app: FastifyInstance): LogLevel {
  const level = app.log.level
  return (SEVERITY[level] ?? 0) > SEVERITY.warn! ? level as LogLevel : 'warn'
}
