// `npm run token -- --publish 'orders.*' --subscribe '*' --ttl 1h`: mints a
// token signed with JWT_SECRET (from the environment or .env) for operators.
import { parseArgs } from 'node:util'
import { createSigner } from 'fast-jwt'
import { ChannelPatterns } from './channel.js'
import { loadConfig } from './config.js'

const USAGE = 'usage: npm run token -- [--publish PATTERN]... [--subscribe PATTERN]... [--sub NAME] [--ttl 1h]'

function main (): void {
  const { values } = parseArgs({
    options: {
      publish: { type: 'string', multiple: true, default: [] },
      subscribe: { type: 'string', multiple: true, default: [] },
      sub: { type: 'string' },
      ttl: { type: 'string', default: '1h' },
      help: { type: 'boolean', default: false }
    }
  })
  if (values.help === true) {
    process.stdout.write(USAGE + '\n')
    return
  }
  const secret = loadConfig().JWT_SECRET
  if (secret === undefined) throw new Error('JWT_SECRET is not set: the token must be signed with the secret the gateway uses')
  // Validates each pattern, so that a typo fails here and not at first use.
  const publish = new ChannelPatterns(values.publish).patterns
  const subscribe = new ChannelPatterns(values.subscribe).patterns
  if (publish.length === 0 && subscribe.length === 0) throw new Error(`give at least one --publish or --subscribe pattern\n${USAGE}`)
  const sign = createSigner({ key: secret, algorithm: 'HS256', expiresIn: values.ttl })
  const claims: Record<string, unknown> = { publish, subscribe }
  if (values.sub !== undefined) claims.sub = values.sub
  process.stdout.write(sign(claims) + '\n')
}

try {
  main()
} catch (err) {
  process.stderr.write(`${(err as Error).message}\n`)
  process.exit(1)
}
