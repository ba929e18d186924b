// `npm run token -- --publish 'orders.*' --subscribe '*' --ttl 1h`: mints a
// token signed with JWT_SECRET (from the environment or .env) for operators.
import { pathToFileURL } from 'node:url'
import { parseArgs } from 'node:util'
import { createSigner } from 'fast-jwt'
import { ChannelPatterns } from './channel.js'
import { type GatewayConfig, loadConfig } from './config.js'

const USAGE = 'usage: npm run token -- [--publish PATTERN]... [--subscribe PATTERN]... [--sub NAME] [--admin] [--ttl 1h] [--aud AUDIENCE] [--iss ISSUER]'

export interface MintOptions {
  publish?: readonly string[]
  subscribe?: readonly string[]
  sub?: string | undefined
  /** The operator's claim: reads GET /status. */
  admin?: boolean | undefined
  /** A duration such as `90s`, `15m`, `1h`, `7d`, or milliseconds. */
  ttl?: string | number
  /** Default: JWT_AUDIENCE. */
  aud?: string | undefined
  /** Default: JWT_ISSUER. */
  iss?: string | undefined
}

/** A token the gateway configured by `config` accepts. */
export function mintToken (config: GatewayConfig, options: MintOptions): string {
  if (config.JWT_ALGORITHM !== 'HS256') {
    throw new Error(`JWT_ALGORITHM is ${config.JWT_ALGORITHM}: tokens are minted by whoever holds the private key, not by this command`)
  }
  const secret = config.JWT_SECRET
  if (secret === undefined) throw new Error('JWT_SECRET is not set: the token must be signed with the secret the gateway uses')
  // Validates each pattern, so that a typo fails here and not at first use.
  const publish = new ChannelPatterns(options.publish ?? []).patterns
  const subscribe = new ChannelPatterns(options.subscribe ?? []).patterns
  if (publish.length === 0 && subscribe.length === 0 && options.admin !== true) throw new Error(`give at least one --publish or --subscribe pattern, or --admin\n${USAGE}`)
  const aud = options.aud ?? config.JWT_AUDIENCE
  const iss = options.iss ?? config.JWT_ISSUER
  // Every token expires: the gateway refuses one without exp.
  const sign = createSigner({
    key: secret,
    algorithm: 'HS256',
    expiresIn: options.ttl ?? '1h',
    ...(aud !== undefined ? { aud } : {}),
    ...(iss !== undefined ? { iss } : {})
  })
  const claims: Record<string, unknown> = { publish, subscribe }
  if (options.sub !== undefined) claims.sub = options.sub
  if (options.admin === true) claims.admin = true
  return sign(claims)
}

function main (): void {
  const { values } = parseArgs({
    options: {
      publish: { type: 'string', multiple: true, default: [] },
      subscribe: { type: 'string', multiple: true, default: [] },
      sub: { type: 'string' },
      admin: { type: 'boolean', default: false },
      ttl: { type: 'string', default: '1h' },
      aud: { type: 'string' },
      iss: { type: 'string' },
      help: { type: 'boolean', default: false }
    }
  })
  if (values.help === true) {
    process.stdout.write(USAGE + '\n')
    return
  }
  const ttl = /^\d+$/.test(values.ttl) ? Number(values.ttl) * 1000 : values.ttl
  process.stdout.write(mintToken(loadConfig(), { ...values, ttl }) + '\n')
}

// Run as a command, not when imported (by the tests).
if (process.argv[1] !== undefined && import.meta.url === pathToFileURL(process.argv[1]).href) {
  try {
    main()
  } catch (err) {
    process.stderr.write(`${(err as Error).message}\n`)
    process.exit(1)
  }
}
