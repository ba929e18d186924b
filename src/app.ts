import { STATUS_CODES } from 'node:http'
import { fileURLToPath } from 'node:url'
import fastifyPostgres from '@fastify/postgres'
import fastifyStatic from '@fastify/static'
import fastifyUnderPressure from '@fastify/under-pressure'
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import type { GatewayConfig } from './config.js'
import { OverloadedError } from './errors.js'
import { migrate } from './event-log.js'
import authPlugin from './plugins/auth.js'
import gatewayPlugin from './plugins/gateway.js'
import metricsPlugin from './plugins/metrics.js'
import publisherPlugin from './plugins/publisher.js'
import securityPlugin, { API_SECURITY_HEADERS } from './plugins/security.js'
import channelsRoutes from './routes/channels.js'
import eventsRoutes, { guardStreamConnections } from './routes/events.js'
import healthRoutes from './routes/health.js'
import statusRoutes from './routes/status.js'
import ticketsRoutes from './routes/tickets.js'

/** The configuration build() needs: a database and a secret are settled. */
export interface AppConfig extends GatewayConfig {
  readonly DATABASE_URL: string
  readonly JWT_SECRET: string
}

declare module 'fastify' {
  interface FastifyContextConfig {
    /** @fastify/under-pressure reads it from a route's config; its types do not declare it. */
    pressureHandler?: (request: FastifyRequest, reply: FastifyReply, type: string, value: number | undefined) => Promise<void> | void
  }
}

const POOL_CONNECTION_TIMEOUT_MS = 5000
// Every statement on the pool is short; one that waits longer than this (a
// lock held elsewhere, a stalled standby) is cancelled by the server, which
// rolls it back, so a publish stuck in the database fails with a definite
// outcome instead of holding up every publish behind it. Migrations and
// pruning lift it for themselves.
const POOL_STATEMENT_TIMEOUT_MS = 10_000

// Node's default bound on receiving a request's headers.
const HEADERS_TIMEOUT_MS = 60_000

const PUBLIC_DIR = fileURLToPath(new URL('../public/', import.meta.url))

/** Hides the token a URL may carry (EventSource sends it as ?access_token=). */
export function redactUrl (url: string): string {
  return url.replace(/([?&]access_token=)[^&#]*/gi, '$1[redacted]')
}

export function loggerOptions (level: string): Exclude<FastifyServerOptions['logger'], boolean | undefined> {
  return {
    level,
    redact: ['req.headers.authorization', 'req.headers.cookie'],
    serializers: {
      req (request) {
        return {
          method: request.method,
          url: redactUrl(request.url),
          remoteAddress: request.ip
        }
      }
    }
  }
}

/** Makes the app, connected to its database, without listening. */
export async function build (config: AppConfig, logger: FastifyServerOptions['logger'] = loggerOptions(config.LOG_LEVEL)): Promise<FastifyInstance> {
  const app = Fastify({
    logger,
    // Node answers a larger request line plus headers with a JSON 431.
    // A request not received whole within REQUEST_TIMEOUT_MS (a body sent a
    // byte at a time) is answered 408 and its connection closed; Node checks
    // every connectionsCheckingInterval, so a request may take up to a
    // quarter more. Streams are responses: their requests are whole at once.
    http: {
      maxHeaderSize: config.MAX_HEADER_BYTES,
      requestTimeout: config.REQUEST_TIMEOUT_MS,
      headersTimeout: Math.min(HEADERS_TIMEOUT_MS, config.REQUEST_TIMEOUT_MS),
      connectionsCheckingInterval: Math.min(HEADERS_TIMEOUT_MS, Math.ceil(config.REQUEST_TIMEOUT_MS / 4))
    },
    // Fastify sets the server's own (0: none by default) over Node's.
    requestTimeout: config.REQUEST_TIMEOUT_MS,
    // Behind a proxy, request.ip (rate and stream limits, logs) is the client's only when trusted.
    trustProxy: config.trustProxy
  })

  // The first onRequest hook: it must run as each request arrives.
  guardStreamConnections(app)

  app.setErrorHandler<FastifyError>((err, request, reply) => {
    const statusCode = err.statusCode !== undefined && err.statusCode >= 400 ? err.statusCode : 500
    // Our own errors and Fastify's 4xx are written for the client; anything
    // else may carry SQL or internals and is only logged.
    const exposed = statusCode < 500 || err.code?.startsWith('GW_') === true
    // Refusals we answer on purpose (503 overloaded, unavailable) are
    // expected under strain: a warning, without a stack per request.
    if (statusCode >= 500 && !exposed) request.log.error({ err }, 'request failed')
    else if (statusCode >= 500) request.log.warn({ code: err.code, message: err.message }, 'request refused')
    // A refusal from a global hook (URL too long, overloaded) comes before
    // the route's own hook that sets the API's security headers.
    if (!reply.hasHeader('x-content-type-options')) reply.headers(API_SECURITY_HEADERS)
    let message = exposed ? err.message : 'Internal Server Error'
    if (err.code === 'FST_ERR_CTP_INVALID_MEDIA_TYPE') message = 'unsupported content type: send application/json or text/plain'
    reply.code(statusCode).send({ statusCode, error: STATUS_CODES[statusCode] ?? 'Error', message })
  })
  // Fastify's own 404 message repeats the URL, which may hold a token.
  app.setNotFoundHandler((_request, reply) => {
    reply.code(404).send({ statusCode: 404, error: 'Not Found', message: 'no such route or file' })
  })

  await app.register(fastifyPostgres, {
    connectionString: config.DATABASE_URL,
    max: config.PG_POOL_SIZE,
    connectionTimeoutMillis: POOL_CONNECTION_TIMEOUT_MS,
    statement_timeout: POOL_STATEMENT_TIMEOUT_MS,
    // A server gone without a reset is noticed by TCP, not only by a timeout.
    keepAlive: true,
    application_name: 'pg-sse-gateway:pool'
  })
  // An idle client whose backend dies emits 'error' on the pool; unhandled,
  // that would end the process.
  app.pg.pool.on('error', (err) => app.log.warn({ err: { message: err.message } }, 'idle database client lost'))

  // A publish waits for its group no longer than for a pool connection.
  await app.register(publisherPlugin, { maxEvents: config.MAX_BATCH_EVENTS, maxBytes: config.MAX_BATCH_BYTES, maxWaitMs: POOL_CONNECTION_TIMEOUT_MS })

  const client = await app.pg.connect()
  try {
    await migrate(client)
  } finally {
    client.release()
  }

  // Sheds new requests with a 503 while the event loop lags, instead of
  // queueing them until everything times out; open streams go on.
  await app.register(fastifyUnderPressure, {
    maxEventLoopDelay: config.MAX_EVENT_LOOP_DELAY_MS,
    sampleInterval: config.EVENT_LOOP_SAMPLE_MS,
    retryAfter: 5,
    customError: OverloadedError
  })
  await app.register(metricsPlugin)
  await app.register(authPlugin, {
    algorithm: config.JWT_ALGORITHM,
    secret: config.JWT_SECRET,
    publicKey: config.jwtPublicKey,
    audience: config.JWT_AUDIENCE,
    issuer: config.JWT_ISSUER,
    publicChannels: config.publicChannels,
    cookieName: config.TOKEN_COOKIE,
    trustedOrigins: config.corsOrigins
  })
  await app.register(securityPlugin, {
    corsOrigins: config.corsOrigins,
    maxUrlBytes: config.MAX_URL_BYTES,
    maxStreamsPerAddress: config.MAX_STREAMS_PER_IP,
    maxStreams: config.MAX_STREAMS,
    publishRateMax: config.PUBLISH_RATE_MAX,
    publishRateWindowMs: config.PUBLISH_RATE_WINDOW_MS,
    cookieName: config.TOKEN_COOKIE
  })
  // After the security plugin: its headers and limits cover the static files too.
  await app.register(fastifyStatic, { root: PUBLIC_DIR })
  await app.register(gatewayPlugin, { connectionString: config.DATABASE_URL, config })

  await app.register(healthRoutes)
  await app.register(eventsRoutes, { config })
  await app.register(channelsRoutes, { config })
  await app.register(statusRoutes, { config })
  await app.register(ticketsRoutes, { config })
  return app
}
