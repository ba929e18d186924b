import { readFileSync } from 'node:fs'
import { Type, type Static } from '@sinclair/typebox'
import envSchema from 'env-schema'
import { ChannelPatterns } from './channel.js'
import { LISTENER_DEFAULTS } from './listener.js'

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const
export const JWT_ALGORITHMS = ['HS256', 'RS256', 'ES256'] as const
export type JwtAlgorithm = typeof JWT_ALGORITHMS[number]

// Every variable the gateway reads, with its default; .env.example mirrors it.
export const ConfigSchema = Type.Object({
  DATABASE_URL: Type.Optional(Type.String({ minLength: 1 })),
  HOST: Type.String({ default: '127.0.0.1', minLength: 1 }),
  PORT: Type.Integer({ default: 3000, minimum: 0, maximum: 65535 }),
  // 32 characters are at least 32 bytes: enough for HS256.
  JWT_SECRET: Type.Optional(Type.String({ minLength: 32 })),
  // One algorithm only: a token naming another (`none`, or HS256 signed with
  // the public key) is refused, so algorithm confusion cannot pass.
  JWT_ALGORITHM: Type.Unsafe<JwtAlgorithm>({ type: 'string', enum: [...JWT_ALGORITHMS], default: 'HS256' }),
  JWT_PUBLIC_KEY_FILE: Type.Optional(Type.String({ minLength: 1 })),
  JWT_AUDIENCE: Type.Optional(Type.String({ minLength: 1 })),
  JWT_ISSUER: Type.Optional(Type.String({ minLength: 1 })),
  TOKEN_COOKIE: Type.String({ default: 'pgsse_token', pattern: '^[A-Za-z0-9_.-]{1,64}$' }),
  CORS_ORIGINS: Type.String({ default: '' }),
  TRUST_PROXY: Type.String({ default: '' }),
  TICKET_TTL_SECONDS: Type.Integer({ default: 30, minimum: 1, maximum: 300 }),
  // A token whose exp lies further away is refused: 1e300 is no expiry.
  MAX_TOKEN_LIFETIME_SECONDS: Type.Integer({ default: 90 * 86400, minimum: 1 }),
  // Clock skew forgiven between the minting side and the gateway.
  CLOCK_TOLERANCE_SECONDS: Type.Integer({ default: 2, minimum: 0, maximum: 300 }),
  PUBLIC_CHANNELS: Type.String({ default: '' }),
  HEARTBEAT_MS: Type.Integer({ default: 15000, minimum: 10 }),
  RETRY_MS: Type.Integer({ default: 3000, minimum: 0 }),
  LOG_LEVEL: Type.Unsafe<typeof LOG_LEVELS[number]>({ type: 'string', enum: [...LOG_LEVELS], default: 'info' }),
  MAX_PAYLOAD_BYTES: Type.Integer({ default: 65536, minimum: 1, maximum: 100 * 1024 * 1024 }),
  MAX_BATCH_EVENTS: Type.Integer({ default: 1000, minimum: 1 }),
  MAX_BATCH_BYTES: Type.Integer({ default: 1024 * 1024, minimum: 1024 }),
  MAX_CHANNELS_PER_STREAM: Type.Integer({ default: 32, minimum: 1 }),
  MAX_STREAMS_PER_IP: Type.Integer({ default: 256, minimum: 1 }),
  MAX_STREAMS: Type.Integer({ default: 10000, minimum: 1 }),
  PUBLISH_RATE_MAX: Type.Integer({ default: 10000, minimum: 1 }),
  PUBLISH_RATE_WINDOW_MS: Type.Integer({ default: 60000, minimum: 1000 }),
  AUTH_FAILURE_MAX: Type.Integer({ default: 100, minimum: 1 }),
  AUTH_FAILURE_WINDOW_MS: Type.Integer({ default: 60000, minimum: 1000 }),
  MAX_HEADER_BYTES: Type.Integer({ default: 16384, minimum: 1024, maximum: 1024 * 1024 }),
  MAX_URL_BYTES: Type.Integer({ default: 8192, minimum: 256, maximum: 1024 * 1024 }),
  // The time to receive a whole request, headers and body; streams are responses and are not bound by it.
  REQUEST_TIMEOUT_MS: Type.Integer({ default: 30000, minimum: 100 }),
  STREAM_BUFFER_BYTES: Type.Integer({ default: 1024 * 1024, minimum: 1024 }),
  PG_POOL_SIZE: Type.Integer({ default: 10, minimum: 1 }),
  // The client-side bound on every statement of the pool; the server's
  // statement_timeout is two thirds of it.
  PG_QUERY_TIMEOUT_MS: Type.Integer({ default: 15000, minimum: 300 }),
  LISTENER_LIVENESS_INTERVAL_MS: Type.Integer({ default: LISTENER_DEFAULTS.livenessIntervalMs, minimum: 10 }),
  LISTENER_LIVENESS_TIMEOUT_MS: Type.Integer({ default: LISTENER_DEFAULTS.livenessTimeoutMs, minimum: 10 }),
  LISTENER_RECONNECT_MAX_MS: Type.Integer({ default: LISTENER_DEFAULTS.reconnectDelayMaxMs, minimum: 10 }),
  RETENTION_MAX_AGE_SECONDS: Type.Integer({ default: 86400, minimum: 1 }),
  RETENTION_MAX_EVENTS: Type.Integer({ default: 1_000_000, minimum: 1 }),
  RETENTION_INTERVAL_MS: Type.Integer({ default: 60000, minimum: 10 }),
  IDEMPOTENCY_WINDOW_SECONDS: Type.Integer({ default: 86400, minimum: 1 }),
  EMBEDDED_PG_DIR: Type.String({ default: '.data/postgres', minLength: 1 }),
  // Load shedding: 0 turns it off.
  MAX_EVENT_LOOP_DELAY_MS: Type.Integer({ default: 1000, minimum: 0 }),
  EVENT_LOOP_SAMPLE_MS: Type.Integer({ default: 1000, minimum: 10 }),
  // Mercure (README, "Mercure"): subscribers without a token get public updates.
  MERCURE_ANONYMOUS: Type.Boolean({ default: false }),
  // Mercure tokens without exp are refused unless false (draft-07 tokens often have none).
  JWT_REQUIRE_EXP: Type.Boolean({ default: true }),
  // Mercure's separate keys (an HS256 secret, or a PEM public key for RS256/ES256); JWT_SECRET or JWT_PUBLIC_KEY_FILE by default.
  MERCURE_PUBLISHER_JWT_KEY: Type.Optional(Type.String({ minLength: 32 })),
  MERCURE_SUBSCRIBER_JWT_KEY: Type.Optional(Type.String({ minLength: 32 })),
  // When set, a Mercure token's aud must hold it, its iss must be it.
  MERCURE_AUDIENCE: Type.Optional(Type.String({ minLength: 1 })),
  MERCURE_ISSUER: Type.Optional(Type.String({ minLength: 1 })),
  // A cookie read for Mercure tokens besides mercureAuthorization and __Secure-mercure_access_token.
  MERCURE_COOKIE_NAME: Type.Optional(Type.String({ pattern: '^[A-Za-z0-9_.-]{1,64}$' })),
  // The hub's URL: relative topics and URL patterns resolve against it; its path is reserved for the hub.
  MERCURE_HUB_URL: Type.String({ default: 'https://localhost/.well-known/mercure', minLength: 1 }),
  // The subscriptions API and subscription events.
  MERCURE_SUBSCRIPTIONS: Type.Boolean({ default: false })
})

export type Env = Static<typeof ConfigSchema>

export interface GatewayConfig extends Readonly<Env> {
  /** PUBLIC_CHANNELS, compiled. */
  readonly publicChannels: ChannelPatterns
  /** CORS_ORIGINS, as origins (`scheme://host[:port]`). */
  readonly corsOrigins: readonly string[]
  /** The PEM text of JWT_PUBLIC_KEY_FILE, for RS256 and ES256. */
  readonly jwtPublicKey: string | undefined
  /** TRUST_PROXY as Fastify's trustProxy option. */
  readonly trustProxy: boolean | string[]
}

export class ConfigError extends Error {
  override name = 'ConfigError'
}

/**
 * Reads the configuration once: `env` (the process environment by default)
 * over an optional `.env` file. A wrong value throws a ConfigError naming
 * the variable.
 */
export function loadConfig (env: Record<string, string | undefined> = process.env, dotenv = true): GatewayConfig {
  let values: Env
  try {
    values = envSchema<Env>({ schema: structuredClone(ConfigSchema), data: env, env: false, dotenv })
  } catch (err) {
    // Ajv says e.g. "env/PORT must be <= 65535"; say it as the variable.
    const message = (err as Error).message.replace(/env\//g, '')
    throw new ConfigError(`invalid configuration: ${message}`)
  }
  let publicChannels: ChannelPatterns
  try {
    publicChannels = ChannelPatterns.parse(values.PUBLIC_CHANNELS)
  } catch (err) {
    throw new ConfigError(`invalid configuration: PUBLIC_CHANNELS: ${(err as Error).message}`)
  }
  const fail = (message: string): never => { throw new ConfigError(`invalid configuration: ${message}`) }
  let jwtPublicKey: string | undefined
  if (values.JWT_ALGORITHM === 'HS256') {
    if (values.JWT_PUBLIC_KEY_FILE !== undefined) fail('JWT_PUBLIC_KEY_FILE is for RS256 and ES256: set JWT_ALGORITHM too')
  } else {
    if (values.JWT_PUBLIC_KEY_FILE === undefined) fail(`JWT_PUBLIC_KEY_FILE is needed with JWT_ALGORITHM=${values.JWT_ALGORITHM}`)
    try {
      jwtPublicKey = readFileSync(values.JWT_PUBLIC_KEY_FILE as string, 'utf8')
    } catch (err) {
      fail(`JWT_PUBLIC_KEY_FILE cannot be read: ${(err as NodeJS.ErrnoException).code ?? 'error'}`)
    }
    if (jwtPublicKey?.includes('PRIVATE KEY') === true) fail('JWT_PUBLIC_KEY_FILE holds a private key: give the public key only')
    if (jwtPublicKey?.includes('PUBLIC KEY') !== true) fail('JWT_PUBLIC_KEY_FILE must hold a PEM public key')
  }
  const corsOrigins = splitList(values.CORS_ORIGINS).map((origin) => {
    let url: URL | undefined
    try { url = new URL(origin) } catch {}
    // An origin is exactly scheme://host[:port], as browsers send it.
    if (url === undefined || url.origin === 'null' || url.origin !== origin) {
      return fail(`CORS_ORIGINS: "${origin}" is not an origin such as https://app.example.com`)
    }
    return origin
  })
  // The hub is served at /.well-known/mercure: its URL says where, seen from outside.
  if (!URL.canParse(values.MERCURE_HUB_URL) || new URL(values.MERCURE_HUB_URL).pathname !== '/.well-known/mercure') {
    fail('MERCURE_HUB_URL must be an absolute URL whose path is /.well-known/mercure, such as https://hub.example.com/.well-known/mercure')
  }
  const trustProxy = values.TRUST_PROXY === 'true' ? true : splitList(values.TRUST_PROXY)
  return Object.freeze({ ...values, publicChannels, corsOrigins, jwtPublicKey, trustProxy: Array.isArray(trustProxy) && trustProxy.length === 0 ? false : trustProxy })
}

function splitList (list: string): string[] {
  return list.split(',').map((item) => item.trim()).filter((item) => item !== '')
}
