import { createHash } from 'node:crypto'
import fastifyCookie from '@fastify/cookie'
import fastifyJwt from '@fastify/jwt'
import type { FastifyRequest } from 'fastify'
import fp from 'fastify-plugin'
import { ChannelPatterns } from '../channel.js'
import type { JwtAlgorithm } from '../config.js'
import { ForbiddenError, TooManyRequestsError, UnauthorizedError, UnavailableError } from '../errors.js'
import { FailedAttempts } from '../failed-attempts.js'
import { isTicket, redeemTicket, type TicketGrant } from '../tickets.js'

export type ChannelAction = 'publish' | 'subscribe'

export interface GatewayClaims {
  sub?: string
  publish?: string[]
  subscribe?: string[]
  /**
   * Seconds since the epoch; every token the gateway accepts has one. Once
   * accepted, it is the whole second at which the gateway stops honouring
   * the token: its `exp` rounded down, plus the clock tolerance.
   */
  exp?: number
  /** The operator's claim: reads GET /status. */
  admin?: boolean
}

declare module '@fastify/jwt' {
  interface FastifyJWT {
    payload: GatewayClaims
    user: GatewayClaims
  }
}

declare module 'fastify' {
  interface FastifyInstance {
    /**
     * Checks that the request may `action` every channel: throws 401 for a
     * missing, invalid or expired token and 403 for a token that does not
     * cover a channel. Subscribing to channels that are all public needs no
     * token. Resolves with the token's claims, or null when none was needed.
     */
    authorize (request: FastifyRequest, action: ChannelAction, channels: Iterable<string>): Promise<GatewayClaims | null>
    /**
     * Runs `check`, which authenticates the request, unless the client's
     * address has used up its failed attempts (429 with Retry-After, before
     * anything is checked); a 401 from `check` counts as one failure.
     * `authorize` and `authorizeOperator` go through it.
     */
    attemptAuthentication<T> (request: FastifyRequest, check: () => Promise<T>): Promise<T>
    /**
     * The operator's views of this instance (GET /status, GET /metrics, the
     * status stream) need a token with `"admin": true` (`npm run token --
     * --admin`) in the Authorization header, never in a URL or a cookie:
     * channel names, and how many streams, channels and events there are,
     * say more than a client should learn. Verified as a channel token is,
     * failed attempts counted as for `authorize`. Throws 401 for a missing,
     * invalid or expired token, 403 for one without the claim; resolves
     * with its claims.
     */
    authorizeOperator (request: FastifyRequest): Promise<GatewayClaims>
    /**
     * Redeems a ticket (once: it is spent): 401 when it is invalid, expired
     * or already used, or the token it was issued for has expired; 503 when
     * the database cannot say. Resolves with its grant, whose channels the
     * caller checks. Failed attempts are the caller's to count.
     */
    useTicket (request: FastifyRequest, ticket: string): Promise<TicketGrant>
    /**
     * The stable identity of the request's token (see tokenIdentity), or
     * undefined for a request without a valid token (none, a ticket, one
     * that does not verify): rate limits then count the address.
     */
    clientIdentity (request: FastifyRequest): string | undefined
  }
}

export interface AuthPluginOptions {
  /** The one algorithm accepted. */
  algorithm?: JwtAlgorithm
  /** The HS256 secret, at least 32 bytes. */
  secret: string
  /** The PEM public key for RS256 or ES256. */
  publicKey?: string | undefined
  /** When set, a token must carry this `aud`. */
  audience?: string | undefined
  /** When set, a token must carry this `iss`. */
  issuer?: string | undefined
  /** Failed token or ticket attempts an address may make per window (default 100). */
  maxFailedAttempts?: number
  /** That window, in milliseconds (default 60 s). */
  failedAttemptsWindowMs?: number
  publicChannels: ChannelPatterns
  /** The cookie a browser may carry the token in. */
  cookieName?: string
  /** Origins allowed to publish with a cookie (besides the gateway's own). */
  trustedOrigins?: readonly string[]
  /** Seconds a token's `exp` may lie in the future at most (absurd ones are refused). */
  maxTokenLifetimeSeconds?: number
  /** Seconds of clock skew forgiven on `exp`, `nbf` and `iat`. */
  clockToleranceSeconds?: number
}

/**
 * Who a verified token speaks for, as one string, for what is kept per
 * client (idempotency keys, rate limits): its `iss` and `sub` when it has a
 * `sub` (a non-empty string), so that every token of one subject is one
 * client; otherwise (no `sub`, an empty one, or one that is not a string) the
 * token itself, as the hash of its signed part (header and claims), which
 * no respelling of the token changes (the signature may be written several
 * ways, and an ECDSA one made anew, but the signed part is fixed by it).
 */
export function tokenIdentity (claims: GatewayClaims, token: string): string {
  const { iss, sub } = claims as { iss?: unknown, sub?: unknown }
  const identity = typeof sub === 'string' && sub !== ''
    ? JSON.stringify(['sub', iss ?? null, sub])
    : JSON.stringify(['token', token.slice(0, token.lastIndexOf('.'))])
  return createHash('sha256').update(identity).digest('base64url')
}

type TokenSource = 'header' | 'query' | 'cookie'

interface FoundToken {
  token: string
  source: TokenSource
}

function findToken (request: FastifyRequest, cookieName: string): FoundToken | undefined {
  const header = request.headers.authorization
  if (header !== undefined) {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(header)
    return { token: match?.[1] ?? '', source: 'header' }
  }
  // EventSource cannot send headers, so streams may carry the token in the URL.
  const query = request.query as Record<string, unknown> | undefined
  const token = query?.access_token
  if (typeof token === 'string') return { token, source: 'query' }
  const cookie = request.cookies[cookieName]
  if (cookie !== undefined) return { token: cookie, source: 'cookie' }
  return undefined
}

/**
 * A browser sends a cookie with any request to the gateway, whoever's page
 * makes it: a write authenticated by a cookie must come from a page of an
 * allowed origin (or of the gateway itself), or it is cross-site request
 * forgery. Browsers send Origin on every POST, and a page cannot forge it.
 */
export function originAllowed (request: FastifyRequest, trusted: ReadonlySet<string>): boolean {
  const origin = request.headers.origin
  if (origin === undefined || origin === 'null') return false
  if (trusted.has(origin)) return true
  try {
    // Scheme, host and port, as browsers compare origins: an https page is
    // not the gateway served over http.
    return new URL(origin).origin === new URL(`${request.protocol}://${request.host}`).origin
  } catch {
    return false
  }
}

const JWT_ERRORS: Record<string, string> = {
  FAST_JWT_EXPIRED: 'the token has expired',
  FAST_JWT_INACTIVE: 'the token is not valid yet (nbf)',
  FAST_JWT_INVALID_CLAIM_VALUE: 'the token is not meant for this gateway (aud or iss)',
  FAST_JWT_MISSING_CLAIM: 'the token is not meant for this gateway (aud or iss)'
}

/** MAX_TOKEN_LIFETIME_SECONDS and CLOCK_TOLERANCE_SECONDS by default. */
export const TOKEN_TIME_DEFAULTS = { maxTokenLifetimeSeconds: 90 * 86400, clockToleranceSeconds: 2 } as const

/**
 * Checks the times of claims fast-jwt verified (it checks that `exp` and
 * `nbf` are numbers and in force, with the tolerance, but takes 600.5, 1e300
 * or Infinity, which 1e400 parses to, at face value). Refuses an `exp` more
 * than `maxLifetime` seconds away and an `iat` that is not a number or lies
 * in the future; answers the claims with `exp` in whole seconds (rounded
 * down) plus the tolerance, the moment the token's streams end. Throws 401.
 */
export function checkTokenTimes (claims: GatewayClaims & { iat?: unknown }, nowMs: number, maxLifetime: number, tolerance: number): GatewayClaims {
  const now = nowMs / 1000
  const exp = Math.floor(claims.exp as number) + tolerance
  if (exp <= now) throw new UnauthorizedError(JWT_ERRORS.FAST_JWT_EXPIRED as string)
  if (!(exp - tolerance - now <= maxLifetime)) {
    throw new UnauthorizedError(`the token lives too long: its exp may be at most ${maxLifetime} seconds away`)
  }
  if (claims.iat !== undefined && !(typeof claims.iat === 'number' && claims.iat <= now + tolerance)) {
    throw new UnauthorizedError('the token\'s iat must be a time in seconds, not in the future')
  }
  return { ...claims, exp }
}

export default fp<AuthPluginOptions>(async function authPlugin (app, options) {
  const { publicChannels, audience, issuer } = options
  const failedAttempts = new FailedAttempts(options.maxFailedAttempts ?? 100, options.failedAttemptsWindowMs ?? 60_000)
  const algorithm = options.algorithm ?? 'HS256'
  const cookieName = options.cookieName ?? 'pgsse_token'
  const trustedOrigins = new Set(options.trustedOrigins ?? [])
  const { maxTokenLifetimeSeconds, clockToleranceSeconds } = { ...TOKEN_TIME_DEFAULTS, ...options }
  if (algorithm === 'HS256') {
    // A short HMAC secret can be brute-forced offline from any one token.
    if (Buffer.byteLength(options.secret) < 32) throw new TypeError('the HS256 secret must be at least 32 bytes')
  } else if (options.publicKey === undefined) {
    throw new TypeError(`${algorithm} needs a public key`)
  }

  const required = ['exp', ...(audience !== undefined ? ['aud'] : []), ...(issuer !== undefined ? ['iss'] : [])]
  const errorMessages: Record<string, string> = {
    ...JWT_ERRORS,
    FAST_JWT_MISSING_REQUIRED_CLAIM: `the token must have the claims ${required.join(', ')}`
  }

  await app.register(fastifyCookie)
  await app.register(fastifyJwt, {
    // With a public key the gateway only verifies: tokens are minted elsewhere.
    secret: algorithm === 'HS256' ? options.secret : { public: options.publicKey as string },
    sign: {
      algorithm,
      // Tokens the gateway mints (the demo token, tests) expire by default.
      expiresIn: '1h',
      ...(audience !== undefined ? { aud: audience } : {}),
      ...(issuer !== undefined ? { iss: issuer } : {})
    },
    verify: {
      // Verified tokens are remembered (up to 1,000, each until it expires):
      // a client publishing in a loop reuses its token, and the signature
      // check was 11% of the CPU time of single-event publishes.
      cache: true,
      algorithms: [algorithm],
      clockTolerance: clockToleranceSeconds * 1000,
      // fast-jwt checks aud and iss only when present: require them too.
      requiredClaims: required,
      ...(audience !== undefined ? { allowedAud: audience } : {}),
      ...(issuer !== undefined ? { allowedIss: issuer } : {})
    }
  })

  app.decorate('useTicket', async function useTicket (request: FastifyRequest, ticket: string): Promise<TicketGrant> {
    let grant
    try {
      grant = await redeemTicket(app.pg.pool, ticket)
    } catch (err) {
      request.log.error({ err: { message: (err as Error).message } }, 'redeeming a ticket failed')
      throw new UnavailableError('the ticket cannot be checked right now; retry shortly')
    }
    if (grant === null) throw new UnauthorizedError('the ticket is invalid, expired or already used')
    if (grant.tokenExpiresAt !== undefined && grant.tokenExpiresAt * 1000 <= Date.now()) {
      throw new UnauthorizedError('the token the ticket was issued for has expired')
    }
    return grant
  })

  async function ticketClaims (request: FastifyRequest, ticket: string, action: ChannelAction, wanted: readonly string[]): Promise<GatewayClaims> {
    // Not for publishing, nor for buying another ticket (which would outlive it).
    if (action !== 'subscribe' || request.method !== 'GET') {
      throw new UnauthorizedError('a ticket only opens a stream: use a token here')
    }
    const grant = await app.useTicket(request, ticket)
    const granted = new Set(grant.channels)
    const denied = wanted.filter((c) => !granted.has(c) && !publicChannels.matches(c))
    if (denied.length > 0) {
      throw new ForbiddenError(`the ticket does not allow to subscribe on ${denied.map((c) => `"${c}"`).join(', ')}`)
    }
    const claims: GatewayClaims = { subscribe: [...grant.channels] }
    if (grant.subject !== undefined) claims.sub = grant.subject
    if (grant.tokenExpiresAt !== undefined) claims.exp = grant.tokenExpiresAt
    return claims
  }

  // Every token, channel or operator, is verified here: signature and
  // claims by fast-jwt, then its times. Throws 401.
  function verifiedClaims (token: string): GatewayClaims {
    let claims: GatewayClaims
    try {
      claims = app.jwt.verify<GatewayClaims>(token)
    } catch (err) {
      // fast-jwt's own messages are fine, but ours never risk echoing input.
      throw new UnauthorizedError(errorMessages[(err as { code?: string }).code ?? ''] ?? 'the token is invalid')
    }
    return checkTokenTimes(claims, Date.now(), maxTokenLifetimeSeconds, clockToleranceSeconds)
  }

  async function checkChannels (request: FastifyRequest, action: ChannelAction, wanted: readonly string[]): Promise<GatewayClaims> {
    const found = findToken(request, cookieName)
    if (found === undefined || found.token === '') {
      throw new UnauthorizedError(`a token is needed to ${action}: send Authorization: Bearer <token> or ?access_token=<token>`)
    }
    if (found.source === 'cookie' && request.method !== 'GET' && request.method !== 'HEAD' && !originAllowed(request, trustedOrigins)) {
      throw new ForbiddenError('a request authenticated by cookie must come from an allowed Origin')
    }
    if (isTicket(found.token)) return await ticketClaims(request, found.token, action, wanted)
    const claims = verifiedClaims(found.token)
    const allowed = ChannelPatterns.fromClaim(claims[action])
    const denied = wanted.filter((c) => !allowed.matches(c) && !(action === 'subscribe' && publicChannels.matches(c)))
    if (denied.length > 0) {
      throw new ForbiddenError(`the token does not allow to ${action} on ${denied.map((c) => `"${c}"`).join(', ')}`)
    }
    return claims
  }

  app.decorate('attemptAuthentication', async function attemptAuthentication<T> (request: FastifyRequest, check: () => Promise<T>): Promise<T> {
    // Only attempts with a credential count and are refused: they are the
    // ones that cost a signature check or a DELETE.
    if (findToken(request, cookieName) === undefined) return await check()
    const retryAfter = failedAttempts.retryAfter(request.ip)
    if (retryAfter > 0) {
      const refusal = new TooManyRequestsError(`too many failed token or ticket attempts from this address: retry in ${retryAfter} s`)
      throw Object.assign(refusal, { retryAfterSeconds: retryAfter })
    }
    try {
      return await check()
    } catch (err) {
      if (err instanceof UnauthorizedError) failedAttempts.fail(request.ip)
      throw err
    }
  })

  // The refusal's Retry-After: onError hooks run with the reply, before the
  // error handler answers.
  app.addHook('onError', async (_request, reply, err) => {
    const { retryAfterSeconds } = err as { retryAfterSeconds?: unknown }
    if (typeof retryAfterSeconds === 'number') reply.header('retry-after', String(retryAfterSeconds))
  })

  app.decorate('authorize', async function authorize (request: FastifyRequest, action: ChannelAction, channels: Iterable<string>): Promise<GatewayClaims | null> {
    const wanted = [...channels]
    // Public channels need no credential, so an address refused for its
    // failures may still read them.
    if (action === 'subscribe' && publicChannels.matchesAll(wanted)) return null
    return await app.attemptAuthentication(request, async () => await checkChannels(request, action, wanted))
  })

  app.decorate('authorizeOperator', async function authorizeOperator (request: FastifyRequest): Promise<GatewayClaims> {
    return await app.attemptAuthentication(request, async () => {
      const found = findToken(request, cookieName)
      if (found?.source !== 'header' || found.token === '') {
        throw new UnauthorizedError('this needs an operator token: send Authorization: Bearer <token>')
      }
      const claims = verifiedClaims(found.token)
      if (claims.admin !== true) throw new ForbiddenError('this needs a token with "admin": true')
      return claims
    })
  })

  // Rate limits ask for it before the route checks the token, and the
  // publish route again: once per request.
  const identities = new WeakMap<FastifyRequest, string | undefined>()
  app.decorate('clientIdentity', function clientIdentity (request: FastifyRequest): string | undefined {
    if (identities.has(request)) return identities.get(request)
    const found = findToken(request, cookieName)
    // An address refused for its failures gets no signature check, here either.
    if (found === undefined || found.token === '' || isTicket(found.token) || failedAttempts.retryAfter(request.ip) > 0) return undefined
    let identity: string | undefined
    try {
      identity = tokenIdentity(app.jwt.verify<GatewayClaims>(found.token), found.token)
    } catch {}
    identities.set(request, identity)
    return identity
  })
}, { name: 'gateway-auth', dependencies: ['@fastify/postgres'] })
