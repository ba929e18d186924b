import { Type, type Static } from '@sinclair/typebox'
import envSchema from 'env-schema'
import { ChannelPatterns } from './channel.js'

const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'] as const

// Every variable the gateway reads, with its default; .env.example mirrors it.
export const ConfigSchema = Type.Object({
  DATABASE_URL: Type.Optional(Type.String({ minLength: 1 })),
  HOST: Type.String({ default: '127.0.0.1', minLength: 1 }),
  PORT: Type.Integer({ default: 3000, minimum: 0, maximum: 65535 }),
  // 32 characters are at least 32 bytes: enough for HS256.
  JWT_SECRET: Type.Optional(Type.String({ minLength: 32 })),
  PUBLIC_CHANNELS: Type.String({ default: '' }),
  HEARTBEAT_MS: Type.Integer({ default: 15000, minimum: 10 }),
  RETRY_MS: Type.Integer({ default: 3000, minimum: 0 }),
  LOG_LEVEL: Type.Unsafe<typeof LOG_LEVELS[number]>({ type: 'string', enum: [...LOG_LEVELS], default: 'info' }),
  MAX_PAYLOAD_BYTES: Type.Integer({ default: 65536, minimum: 1, maximum: 100 * 1024 * 1024 }),
  MAX_BATCH_EVENTS: Type.Integer({ default: 1000, minimum: 1 }),
  MAX_BATCH_BYTES: Type.Integer({ default: 1024 * 1024, minimum: 1024 }),
  MAX_CHANNELS_PER_STREAM: Type.Integer({ default: 32, minimum: 1 }),
  STREAM_BUFFER_BYTES: Type.Integer({ default: 1024 * 1024, minimum: 1024 }),
  PG_POOL_SIZE: Type.Integer({ default: 10, minimum: 1 }),
  LISTENER_LIVENESS_INTERVAL_MS: Type.Integer({ default: 10000, minimum: 10 }),
  LISTENER_LIVENESS_TIMEOUT_MS: Type.Integer({ default: 5000, minimum: 10 }),
  LISTENER_RECONNECT_MAX_MS: Type.Integer({ default: 10000, minimum: 10 }),
  RETENTION_MAX_AGE_SECONDS: Type.Integer({ default: 86400, minimum: 1 }),
  RETENTION_MAX_EVENTS: Type.Integer({ default: 1_000_000, minimum: 1 }),
  RETENTION_INTERVAL_MS: Type.Integer({ default: 60000, minimum: 10 }),
  IDEMPOTENCY_WINDOW_SECONDS: Type.Integer({ default: 86400, minimum: 1 }),
  EMBEDDED_PG_DIR: Type.String({ default: '.data/postgres', minLength: 1 })
})

export type Env = Static<typeof ConfigSchema>

export interface GatewayConfig extends Readonly<Env> {
  /** PUBLIC_CHANNELS, compiled. */
  readonly publicChannels: ChannelPatterns
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
  return Object.freeze({ ...values, publicChannels })
}
