import { STATUS_CODES } from 'node:http'
import type { Duplex } from 'node:stream'
import { fileURLToPath } from 'node:url'
import fastifyPostgres from '@fastify/postgres'
import fastifyStatic from '@fastify/static'
import fastifyUnderPressure from '@fastify/under-pressure'
import Fastify, { type FastifyError, type FastifyInstance, type FastifyReply, type FastifyRequest, type FastifyServerOptions } from 'fastify'
import type { GatewayConfig } from './config.js'
import { OverloadedError } from './errors.js'
import { migrate, recordSettings } from './event-log.js'
import authPlugin from './plugins/auth.js'
import bodyParsersPlugin from './plugins/body-parsers.js'
import gatewayPlugin from './plugins/gateway.js'
import metricsPlugin from './plugins/metrics.js'
import publisherPlugin from './plugins/publisher.js'
import securityPlugin, { API_SECURITY_HEADERS } from './plugins/security.js'
import channelsRoutes from './routes/channels.js'
import eventsRoutes, { guardStreamConnections } from './routes/events.js'
import healthRoutes from './routes/health.js'
import mercureRoutes, { MERCURE_COOKIES, MERCURE_PATH } from './routes/mercure.js'
import statusRoutes from './routes/status.js'
import statusStreamRoutes from './routes/status-stream.js'
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
// Seconds of silence on an idle pool connection before TCP keepalive probes
// it, on both ends (Node 20 leaves the probes' interval and count to the OS).
const POOL_KEEPALIVE_IDLE_S = 10

/**
 * How each pool connection is watched, from PG_QUERY_TIMEOUT_MS (Q):
 *  - the client gives up on any statement after Q (pg's query_timeout) and
 *    destroys its connection: a connection gone silent costs a publish Q,
 *    never minutes;
 *  - the server cancels a statement after 2/3 Q (statement_timeout; 10 s by
 *    default) and rolls it back, so a statement stuck in the database (a lock
 *    held elsewhere, a stalled standby) fails with a definite outcome when
 *    the server can be heard. Migrations and pruning lift it for themselves;
 *  - the server ends a session idle in a transaction for 2/3 Q, and drops a
 *    connection whose data goes unacknowledged for Q (tcp_user_timeout) or
 *    whose keepalive probes go unanswered: a gateway gone does not leave a
 *    backend holding the log's lock.
 */
function poolTimeouts (queryTimeoutMs: number): { statementTimeoutMs: number, options: string } {
  const statementTimeoutMs = Math.round(queryTimeoutMs * 2 / 3)
  const settings = {
    tcp_user_timeout: queryTimeoutMs,
    tcp_keepalives_idle: POOL_KEEPALIVE_IDLE_S,
    tcp_keepalives_interval: POOL_KEEPALIVE_IDLE_S,
    tcp_keepalives_count: 3,
    idle_in_transaction_session_timeout: statementTimeoutMs
  }
  return { statementTimeoutMs, options: Object.entries(settings).map(([name, value]) => `-c ${name}=${value}`).join(' ') }
}

function ignoreClientError (): void {}

// Node's default bound on receiving a request's headers.
const HEADERS_TIMEOUT_MS = 60_000

const PUBLIC_DIR = fileURLToPath(new URL('../public/', import.meta.url))

/**
 * Hides the token a URL may carry (EventSource sends it as ?access_token=):
 * the value of every query parameter named access_token once its name is
 * decoded as the query parser decodes it (`access%5Ftoken`, `%61ccess_token`
 * reach the route as access_token too).
 */
export function redactUrl (url: string): string {
  const query = url.indexOf('?')
  if (query < 0) return url
  const params = url.slice(query + 1).split('&').map((param) => {
    const equals = param.indexOf('=')
    if (equals < 0) return param
    const name = param.slice(0, equals)
    return decodeParamName(name).toLowerCase() === 'access_token' ? `${name}=[redacted]` : param
  })
  return maskCredentials(url.slice(0, query + 1) + params.join('&'))
}

// A JWT (its header always starts "eyJ", the base64url of '{"') or a
// ticket anywhere in a URL, under whatever name or separator a client used
// (`access_token[]=`, `channel=a;access_token=`): masked too. Each class
// excludes the character that ends it, so the match is linear.
const CREDENTIAL = /eyJ[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*\.[A-Za-z0-9_-]*|tkt_[A-Za-z0-9_-]+/g

/** Masks anything in a text that looks like a token or a ticket. */
export function maskCredentials (text: string): string {
  return text.replace(CREDENTIAL, '[redacted]')
}

function decodeParamName (name: string): string {
  if (!name.includes('%') && !name.includes('+')) return name
  // Each %XX on its own: a malformed escape elsewhere in the name (which
  // makes decodeURIComponent throw) must not hide one that spells the name.
  return name.replace(/\+/g, ' ').replace(/%([0-9A-Fa-f]{2})/g, (_match, hex: string) => String.fromCharCode(parseInt(hex, 16)))
}

// Fastify's own errors, in words that repeat nothing of the request: its
// messages quote the URL (a bad URL), the content type, or the body.
const FRAMEWORK_MESSAGES: Record<string, string> = {
  FST_ERR_BAD_URL: 'the URL is malformed: check its percent-encoding',
  FST_ERR_MAX_PARAM_LENGTH: 'a path segment is too long',
  FST_ERR_ASYNC_CONSTRAINT: 'the request could not be routed',
  FST_ERR_CTP_INVALID_MEDIA_TYPE: 'unsupported content type: send application/json or text/plain',
  FST_ERR_CTP_BODY_TOO_LARGE: 'the body is larger than this route accepts',
  FST_ERR_CTP_INVALID_CONTENT_LENGTH: 'the body does not match its Content-Length',
  FST_ERR_CTP_EMPTY_JSON_BODY: 'the body is empty: send JSON'
}

/**
 * The message a client gets for an error: ours (GW_ codes) and schema
 * validation as written, Fastify's own in fixed words, anything else only
 * as its status, since it may quote input, SQL or internals.
 */
function clientMessage (err: FastifyError, statusCode: number): string {
  const code = err.code ?? ''
  if (code.startsWith('GW_') || code === 'FST_ERR_VALIDATION') return err.message
  return FRAMEWORK_MESSAGES[code] ?? (statusCode < 500 ? `the request was refused: ${(STATUS_CODES[statusCode] ?? 'error').toLowerCase()}` : 'Internal Server Error')
}

/** Answers an error as every API answer: its security headers and {statusCode, error, message}. */
function sendError (reply: FastifyReply, err: FastifyError, statusCode: number): void {
  // A refusal from a global hook (URL too long, overloaded) comes before
  // the route's own hook that sets the API's security headers.
  if (!reply.hasHeader('x-content-type-options')) reply.headers(API_SECURITY_HEADERS)
  // A message may quote what the client sent (a channel name): never a credential.
  reply.code(statusCode).send({ statusCode, error: STATUS_CODES[statusCode] ?? 'Error', message: maskCredentials(clientMessage(err, statusCode)) })
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

// The security headers as a raw header block, for answers written to the socket.
const RAW_SECURITY_HEADERS = Object.entries(API_SECURITY_HEADERS).map(([name, value]) => `${name}: ${value}\r\n`).join('')

/**
 * Answers what Node refuses before Fastify sees a request (bytes that are
 * not HTTP, conflicting lengths, headers too large, a request not received
 * in time) in the API's format, with its security headers, then closes the
 * connection; Fastify's own answer has neither. Nothing of the request is
 * repeated.
 */
function clientErrorHandler (this: FastifyInstance, err: NodeJS.ErrnoException, socket: Duplex): void {
  if (err.code === 'ECONNRESET' || socket.destroyed) return
  const statusCode = err.code === 'ERR_HTTP_REQUEST_TIMEOUT' ? 408 : err.code === 'HPE_HEADER_OVERFLOW' ? 431 : 400
  const message = statusCode === 408
    ? 'the request was not received in time'
    : statusCode === 431 ? 'the request line and headers are too large' : 'the request is not valid HTTP/1.1'
  const body = JSON.stringify({ statusCode, error: STATUS_CODES[statusCode], message })
  this.log.debug({ code: err.code }, 'client error')
  if (socket.writable) {
    socket.write(`HTTP/1.1 ${statusCode} ${STATUS_CODES[statusCode] ?? ''}\r\nConnection: close\r\nContent-Type: application/json; charset=utf-8\r\n` +
      `Content-Length: ${Buffer.byteLength(body)}\r\n${RAW_SECURITY_HEADERS}\r\n${body}`)
  }
  socket.destroy()
}

/** Makes the app, connected to its database, without listening. */
export async function build (config: AppConfig, logger: FastifyServerOptions['logger'] = loggerOptions(config.LOG_LEVEL)): Promise<FastifyInstance> {
  const app = Fastify({
    logger,
    clientErrorHandler,
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
    trustProxy: config.trustProxy,
    // A URL the router cannot decode, before any route or hook: answered
    // as any other error, not with Fastify's body that repeats the URL.
    frameworkErrors (err, request, reply) {
      const statusCode = err.statusCode !== undefined && err.statusCode >= 400 ? err.statusCode : 400
      request.log.info({ code: err.code }, 'request refused by the router')
      sendError(reply, err as FastifyError, statusCode)
    }
  })

  // The first onRequest hook: it must run as each request arrives.
  guardStreamConnections(app, new Set(['/events', MERCURE_PATH]))

  app.setErrorHandler<FastifyError>((err, request, reply) => {
    const statusCode = err.statusCode !== undefined && err.statusCode >= 400 ? err.statusCode : 500
    // Refusals we answer on purpose (503 overloaded, unavailable) are
    // expected under strain: a warning, without a stack per request. Any
    // other 5xx may carry SQL or internals: logged, never answered.
    const ours = err.code?.startsWith('GW_') === true
    if (statusCode >= 500 && !ours) request.log.error({ err }, 'request failed')
    else if (statusCode >= 500) request.log.warn({ code: err.code, message: err.message }, 'request refused')
    sendError(reply, err, statusCode)
  })
  // Fastify's own 404 message repeats the URL, which may hold a token.
  app.setNotFoundHandler((_request, reply) => {
    reply.code(404).send({ statusCode: 404, error: 'Not Found', message: 'no such route or file' })
  })

  const { statementTimeoutMs, options } = poolTimeouts(config.PG_QUERY_TIMEOUT_MS)
  await app.register(fastifyPostgres, {
    connectionString: config.DATABASE_URL,
    max: config.PG_POOL_SIZE,
    connectionTimeoutMillis: POOL_CONNECTION_TIMEOUT_MS,
    statement_timeout: statementTimeoutMs,
    query_timeout: config.PG_QUERY_TIMEOUT_MS,
    // Server settings for the session (an `options` in DATABASE_URL wins).
    options,
    keepAlive: true,
    keepAliveInitialDelayMillis: POOL_KEEPALIVE_IDLE_S * 1000,
    application_name: 'pg-sse-gateway:pool'
  })
  // An idle client whose backend dies emits 'error' on the pool; unhandled,
  // that would end the process.
  app.pg.pool.on('error', (err) => app.log.warn({ err: { message: err.message } }, 'idle database client lost'))
  // A client out of the pool (a transaction, a migration) whose connection
  // dies emits 'error' too, besides failing its query, and nothing listens
  // to it then: that would end the process. Its query's caller handles it.
  app.pg.pool.on('connect', (client) => client.on('error', ignoreClientError))

  const client = await app.pg.connect()
  try {
    await migrate(client)
    await recordSettings(client, { maxPayloadBytes: config.MAX_PAYLOAD_BYTES })
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
    maxFailedAttempts: config.AUTH_FAILURE_MAX,
    failedAttemptsWindowMs: config.AUTH_FAILURE_WINDOW_MS,
    publicChannels: config.publicChannels,
    cookieName: config.TOKEN_COOKIE,
    trustedOrigins: config.corsOrigins,
    maxTokenLifetimeSeconds: config.MAX_TOKEN_LIFETIME_SECONDS,
    clockToleranceSeconds: config.CLOCK_TOLERANCE_SECONDS
  })
  // A publish waits for its group no longer than for a pool connection; a
  // group is stalled once publishes behind it fail so, or once the server
  // would have cancelled it had it been heard.
  await app.register(publisherPlugin, {
    maxEvents: config.MAX_BATCH_EVENTS,
    maxBytes: config.MAX_BATCH_BYTES,
    maxWaitMs: POOL_CONNECTION_TIMEOUT_MS,
    stalledAfterMs: Math.min(POOL_CONNECTION_TIMEOUT_MS, statementTimeoutMs)
  })
  await app.register(securityPlugin, {
    corsOrigins: config.corsOrigins,
    maxUrlBytes: config.MAX_URL_BYTES,
    maxStreamsPerAddress: config.MAX_STREAMS_PER_IP,
    maxStreams: config.MAX_STREAMS,
    publishRateMax: config.PUBLISH_RATE_MAX,
    publishRateWindowMs: config.PUBLISH_RATE_WINDOW_MS
  })
  await app.register(bodyParsersPlugin)
  // After the security plugin: its headers and limits cover the static files too.
  await app.register(fastifyStatic, { root: PUBLIC_DIR })
  await app.register(gatewayPlugin, {
    listener: {
      connectionString: config.DATABASE_URL,
      livenessIntervalMs: config.LISTENER_LIVENESS_INTERVAL_MS,
      livenessTimeoutMs: config.LISTENER_LIVENESS_TIMEOUT_MS,
      reconnectDelayMaxMs: config.LISTENER_RECONNECT_MAX_MS
    },
    heartbeatMs: config.HEARTBEAT_MS,
    streams: { maxHeldBytes: config.STREAM_BUFFER_BYTES, retryMs: config.RETRY_MS },
    retention: {
      maxAgeSeconds: config.RETENTION_MAX_AGE_SECONDS,
      maxEvents: config.RETENTION_MAX_EVENTS,
      idempotencyWindowSeconds: config.IDEMPOTENCY_WINDOW_SECONDS,
      intervalMs: config.RETENTION_INTERVAL_MS
    }
  })

  await app.register(healthRoutes)
  await app.register(eventsRoutes, {
    maxChannelsPerStream: config.MAX_CHANNELS_PER_STREAM,
    streamBufferBytes: config.STREAM_BUFFER_BYTES,
    retryMs: config.RETRY_MS,
    maxBatchBytes: config.MAX_BATCH_BYTES,
    maxBatchEvents: config.MAX_BATCH_EVENTS,
    maxPayloadBytes: config.MAX_PAYLOAD_BYTES
  })
  await app.register(channelsRoutes, { maxPayloadBytes: config.MAX_PAYLOAD_BYTES })
  await app.register(statusRoutes, { retention: { maxAgeSeconds: config.RETENTION_MAX_AGE_SECONDS, maxEvents: config.RETENTION_MAX_EVENTS } })
  await app.register(statusStreamRoutes, { retryMs: config.RETRY_MS, poolSize: config.PG_POOL_SIZE, ticketTtlSeconds: config.TICKET_TTL_SECONDS })
  await app.register(ticketsRoutes, { maxChannels: config.MAX_CHANNELS_PER_STREAM, ticketTtlSeconds: config.TICKET_TTL_SECONDS })
  // Mercure's keys default to the gateway's own.
  const defaultKey = config.JWT_ALGORITHM === 'HS256' ? config.JWT_SECRET : config.jwtPublicKey as string
  await app.register(mercureRoutes, {
    hubUrl: config.MERCURE_HUB_URL,
    anonymous: config.MERCURE_ANONYMOUS,
    tokens: {
      algorithm: config.JWT_ALGORITHM,
      publisherKey: config.MERCURE_PUBLISHER_JWT_KEY ?? defaultKey,
      subscriberKey: config.MERCURE_SUBSCRIBER_JWT_KEY ?? defaultKey,
      audience: config.MERCURE_AUDIENCE,
      issuer: config.MERCURE_ISSUER,
      requireExp: config.JWT_REQUIRE_EXP,
      clockToleranceSeconds: config.CLOCK_TOLERANCE_SECONDS
    },
    cookieNames: [...(config.MERCURE_COOKIE_NAME !== undefined ? [config.MERCURE_COOKIE_NAME] : []), ...MERCURE_COOKIES],
    trustedOrigins: config.corsOrigins,
    retryMs: config.RETRY_MS,
    streamBufferBytes: config.STREAM_BUFFER_BYTES,
    maxPayloadBytes: config.MAX_PAYLOAD_BYTES,
    subscriptions: config.MERCURE_SUBSCRIPTIONS
  })
  return app
}
