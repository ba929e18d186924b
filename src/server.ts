import { randomBytes } from 'node:crypto'
import closeWithGrace from 'close-with-grace'
import { build, loggerOptions } from './app.js'
import { ConfigError, loadConfig } from './config.js'
import { type EmbeddedDatabase, startEmbeddedPostgres } from './embedded-postgres.js'

function say (line: string): void {
  process.stdout.write(line + '\n')
}

async function main (): Promise<void> {
  const config = loadConfig()

  let embedded: EmbeddedDatabase | undefined
  let databaseUrl = config.DATABASE_URL
  if (databaseUrl === undefined) {
    say('DATABASE_URL is not set: starting an embedded PostgreSQL')
    embedded = await startEmbeddedPostgres(config.EMBEDDED_PG_DIR, say)
    databaseUrl = embedded.connectionString
  }
  const generatedSecret = config.JWT_SECRET === undefined
  const jwtSecret = config.JWT_SECRET ?? randomBytes(32).toString('base64url')

  // JSON lines for machines; readable lines for a person at a terminal.
  const logger = loggerOptions(config.LOG_LEVEL)
  const pretty = process.stdout.isTTY && process.env.NODE_ENV !== 'production'
  const app = await build(
    { ...config, DATABASE_URL: databaseUrl, JWT_SECRET: jwtSecret },
    pretty ? { ...logger, transport: { target: 'pino-pretty', options: { translateTime: 'HH:MM:ss.l', ignore: 'pid,hostname' } } } : logger
  )
  closeWithGrace({ delay: 10_000 }, async ({ err, signal }) => {
    if (err !== undefined) app.log.error({ err }, 'stopping on an error')
    else app.log.info({ signal }, 'stopping')
    await app.close()
    await embedded?.stop()
  })
  const address = await app.listen({ host: config.HOST, port: config.PORT })

  // With RS256/ES256 the gateway holds no signing key: tokens are minted elsewhere.
  if (generatedSecret && config.JWT_ALGORITHM === 'HS256') {
    // A secret made up for this run only: print tokens a newcomer can use now.
    const demoToken = app.jwt.sign({ sub: 'demo', subscribe: ['*'], publish: ['*'] }, { expiresIn: '12h' })
    say('')
    say('JWT_SECRET is not set: this run signs tokens with a random secret (set JWT_SECRET to keep them valid).')
    say(`Demo page:  ${address}/?channel=demo&access_token=${demoToken}`)
    say(`Subscribe:  curl -N '${address}/events?channel=demo&access_token=${demoToken}'`)
    say(`Publish:    curl -X POST -H 'Authorization: Bearer ${demoToken}' -H 'Content-Type: application/json' -d '{"hello":"world"}' ${address}/channels/demo`)
    // The operator token rides in the fragment, which the browser never
    // sends; the page drops it and opens its stream with a ticket.
    const operatorToken = app.jwt.sign({ sub: 'operator', admin: true }, { expiresIn: '12h' })
    say(`Dashboard:  ${address}/status.html#access_token=${operatorToken}`)
    say('')
  } else {
    say(`Dashboard:  ${address}/status.html (with an operator token: npm run -s token -- --admin)`)
  }
}

main().catch((err: unknown) => {
  process.stderr.write(`${err instanceof ConfigError ? err.message : `pg-sse-gateway failed to start: ${(err as Error).message}`}\n`)
  process.exit(1)
})
