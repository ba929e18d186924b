import fastifyCors from '@fastify/cors'
import fastifyHelmet from '@fastify/helmet'
import fastifyRateLimit from '@fastify/rate-limit'
import type { FastifyInstance, FastifyReply, FastifyRequest, onRequestAsyncHookHandler } from 'fastify'
import fp from 'fastify-plugin'
import { TooManyRequestsError, UriTooLongError } from '../errors.js'
import { StreamLimits } from '../stream-limits.js'

declare module 'fastify' {
  interface FastifyInstance {
    /** Live streams of this instance, per client address and in total. */
    streamLimits: StreamLimits
    /** The onRequest hook of the publish routes: one budget for both. */
    publishRateLimit: onRequestAsyncHookHandler
    /** The onRequest hook of POST /tickets, with a budget of its own. */
    ticketRateLimit: onRequestAsyncHookHandler
  }
}

export interface SecurityPluginOptions {
  /** Origins whose pages may call the gateway with credentials. */
  corsOrigins: readonly string[]
  maxUrlBytes: number
  maxStreamsPerAddress: number
  maxStreams: number
  /** Publish requests allowed per token (or address) in each window. */
  publishRateMax: number
  publishRateWindowMs: number
}

/*
 * The security headers that mean something on an event stream and on a JSON
 * answer: the rest of helmet's set (CSP, COOP, Origin-Agent-Cluster,
 * Referrer-Policy, X-DNS-Prefetch-Control, X-Download-Options,
 * X-Permitted-Cross-Domain-Policies, X-XSS-Protection) governs documents.
 * Helmet keeps them for the demo page and anything else.
 *
 * A constant set through the reply, rather than @fastify/helmet on these
 * routes, for two measured reasons: @fastify/helmet builds helmet's
 * middleware afresh on every request (13% of the gateway's CPU time under
 * single-event publishes, BENCHMARKS.md), and headers set on the raw
 * response are kept in a per-response table for as long as a stream lives.
 */
export const API_SECURITY_HEADERS = {
  'strict-transport-security': 'max-age=31536000; includeSubDomains',
  'x-content-type-options': 'nosniff',
  'cross-origin-resource-policy': 'same-origin',
  'x-frame-options': 'SAMEORIGIN'
}

/** Route options for the API's routes: API_SECURITY_HEADERS instead of helmet. */
export const API_ROUTE = {
  helmet: false,
  onRequest: async function apiSecurityHeaders (_request: FastifyRequest, reply: FastifyReply): Promise<void> {
    reply.headers(API_SECURITY_HEADERS)
  }
} as const

/**
 * The key a request is limited by: the identity of its verified token (one
 * budget per client, however the token is spelled), or its address when it
 * has no valid token. Tokens that do not verify thus share their address's
 * budget, and each of them answers 401 anyway.
 */
function rateLimitKey (app: FastifyInstance, request: FastifyRequest): string {
  const identity = app.clientIdentity(request)
  return identity === undefined ? `ip:${request.ip}` : `token:${identity}`
}

/** Security headers, CORS, rate limits and request size limits. */
export default fp<SecurityPluginOptions>(async function securityPlugin (app, options) {
  const allowedOrigins = new Set(options.corsOrigins)

  await app.register(fastifyHelmet, {
    contentSecurityPolicy: {
      useDefaults: false,
      // The demo page loads its script and style from the gateway and talks
      // to it alone; nothing inline, nothing from elsewhere.
      directives: {
        defaultSrc: ["'self'"],
        scriptSrc: ["'self'"],
        styleSrc: ["'self'"],
        imgSrc: ["'self'", 'data:'],
        connectSrc: ["'self'"],
        objectSrc: ["'none'"],
        baseUri: ["'none'"],
        formAction: ["'self'"],
        frameAncestors: ["'none'"]
      }
    }
  })

  await app.register(fastifyCors, {
    // Only listed origins get CORS headers, credentials included; for any
    // other origin the browser keeps the response from the page.
    origin: (origin, callback) => callback(null, origin !== undefined && allowedOrigins.has(origin) ? origin : false),
    credentials: true,
    methods: ['GET', 'POST'],
    // EventSource polyfills (the eventsource package, others) send
    // Cache-Control, some X-Requested-With, and Accept; a preflight that does
    // not allow them fails their cross-origin streams.
    allowedHeaders: ['authorization', 'content-type', 'last-event-id', 'idempotency-key', 'accept', 'cache-control', 'x-requested-with'],
    maxAge: 600
  })

  await app.register(fastifyRateLimit, {
    global: false,
    max: options.publishRateMax,
    timeWindow: options.publishRateWindowMs,
    errorResponseBuilder: (_request, context) =>
      new TooManyRequestsError(`too many requests: at most ${context.max} in ${options.publishRateWindowMs / 1000} s; retry in ${context.after}`)
  })

  // Node's maxHeaderSize bounds the request line and headers together (431);
  // a URL gets a bound of its own, lower.
  app.addHook('onRequest', async (request) => {
    if (Buffer.byteLength(request.raw.url ?? '') > options.maxUrlBytes) {
      throw new UriTooLongError(`the URL is longer than ${options.maxUrlBytes} bytes`)
    }
  })

  // One limiter per budget, shared by its routes (a route's own
  // `config.rateLimit` would give each route a budget). Options make
  // app.rateLimit() give each limiter a store of its own; without them both
  // would count in the plugin's one store.
  const budget = (name: string): onRequestAsyncHookHandler =>
    app.rateLimit({ keyGenerator: (request) => `${name}:${rateLimitKey(app, request)}` }) as onRequestAsyncHookHandler
  app.decorate('publishRateLimit', budget('publish'))
  app.decorate('ticketRateLimit', budget('ticket'))
  app.decorate('streamLimits', new StreamLimits(options.maxStreamsPerAddress, options.maxStreams))
}, { name: 'gateway-security', dependencies: ['gateway-auth'] })
