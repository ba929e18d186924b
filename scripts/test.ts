// `npm test` after lint and type-check: runs tap against DATABASE_URL, or,
// when it is not set, against an embedded PostgreSQL started for the run and
// stopped after it. Ends with a plain "N passed, N failed" line.
import { spawn } from 'node:child_process'
import { startEmbeddedPostgres } from '../src/embedded-postgres.js'

let embedded: Awaited<ReturnType<typeof startEmbeddedPostgres>> | undefined
const env = { ...process.env }
if (env.DATABASE_URL === undefined || env.DATABASE_URL === '') {
  process.stdout.write('DATABASE_URL is not set: the tests run against an embedded PostgreSQL\n')
  embedded = await startEmbeddedPostgres('.data/test-postgres', (line) => process.stdout.write(line + '\n'))
  env.DATABASE_URL = embedded.connectionString
}

const tap = spawn('npx', ['tap', ...process.argv.slice(2)], { stdio: ['ignore', 'pipe', 'inherit'], env })
// tap's closing line, e.g. "# { total: 98, pass: 97, fail: 1 }"; a line may
// straddle two chunks, so the search runs over the output's tail.
let tail = ''
let summary = ''
tap.stdout.on('data', (chunk: Buffer) => {
  process.stdout.write(chunk)
  tail = (tail + String(chunk)).slice(-4096)
  const match = /# \{ total: \d+[^}]*\}/.exec(tail)
  if (match !== null) summary = match[0]
})
const code = await new Promise<number>((resolve) => tap.on('close', (c) => resolve(c ?? 1)))
await embedded?.stop()

const count = (name: string): number => Number(new RegExp(`${name}: (\\d+)`).exec(summary)?.[1] ?? 0)
process.stdout.write(`\ntests: ${count('pass')} passed, ${count('fail')} failed\n`)
process.exit(code === 0 && summary === '' ? 1 : code)
