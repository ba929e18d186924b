// `npm test`: runs tap against DATABASE_URL, or, when it is not set, against
// an embedded PostgreSQL started for the run and stopped after it.
import { spawn } from 'node:child_process'
import { startEmbeddedPostgres } from '../src/embedded-postgres.js'

let embedded: Awaited<ReturnType<typeof startEmbeddedPostgres>> | undefined
const env = { ...process.env }
if (env.DATABASE_URL === undefined || env.DATABASE_URL === '') {
  process.stdout.write('DATABASE_URL is not set: the tests run against an embedded PostgreSQL\n')
  embedded = await startEmbeddedPostgres('.data/test-postgres', (line) => process.stdout.write(line + '\n'))
  env.DATABASE_URL = embedded.connectionString
}

const tap = spawn('npx', ['tap', ...process.argv.slice(2)], { stdio: 'inherit', env })
const code = await new Promise<number>((resolve) => tap.on('close', (c) => resolve(c ?? 1)))
await embedded?.stop()
process.exit(code)
