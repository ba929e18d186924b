import { type ChildProcess, spawn } from 'node:child_process'
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { openStream, waitFor } from './helper.js'

// The entry point as a newcomer meets it: no DATABASE_URL, no JWT_SECRET.
const SERVER = path.resolve('src/server.ts')

function startServer (env: Record<string, string>): { child: ChildProcess, output: () => string, exited: Promise<number | null> } {
  const childEnv: Record<string, string | undefined> = { ...process.env, LOG_LEVEL: 'warn', ...env }
  delete childEnv.DATABASE_URL
  delete childEnv.JWT_SECRET
  for (const [k, v] of Object.entries(env)) childEnv[k] = v
  const child = spawn(process.execPath, ['--import', 'tsx', SERVER], { env: childEnv, stdio: ['ignore', 'pipe', 'pipe'] })
  let output = ''
  child.stdout?.on('data', (chunk) => { output += String(chunk) })
  child.stderr?.on('data', (chunk) => { output += String(chunk) })
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)))
  return { child, output: () => output, exited }
}

async function waitForOutput (output: () => string, exited: Promise<unknown>, pattern: RegExp): Promise<RegExpMatchArray> {
  let done = false
  exited.then(() => { done = true }, () => {})
  // No deadline of its own: the test's timeout bounds the start of PostgreSQL.
  await waitFor(() => {
    if (pattern.test(output())) return true
    if (done) throw new Error(`server exited before ${pattern}:\n${output()}`)
    return false
  }, String(pattern), Infinity)
  return output().match(pattern) as RegExpMatchArray
}

t.test('with no DATABASE_URL and no JWT_SECRET it runs an embedded PostgreSQL and prints working tokens', { timeout: 120_000 }, async (t) => {
  // World-traversable, so that PostgreSQL may run as another user when we are root.
  const dir = await mkdtemp(path.join(tmpdir(), 'pgsse-server-'))
  await chmod(dir, 0o755)
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const server = startServer({ PORT: '0', EMBEDDED_PG_DIR: path.join(dir, 'postgres') })
  t.teardown(() => { server.child.kill('SIGKILL') })

  const [, demoUrl] = await waitForOutput(server.output, server.exited, /Demo page: +(\S+)\n/) as [string, string]
  const [, token, publishUrl] = await waitForOutput(server.output, server.exited, /Publish: +curl .*Bearer (\S+)' .* (\S+)\n/) as [string, string, string]
  const demo = new URL(demoUrl)
  t.equal(demo.searchParams.get('channel'), 'demo')

  const page = await fetch(demoUrl)
  t.equal(page.status, 200, 'the demo link opens the demo page')

  const stream = await openStream(t, `${demo.origin}/events?channel=demo&access_token=${demo.searchParams.get('access_token')}`)
  const published = await fetch(publishUrl, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' }, body: '{"hello":"world"}' })
  t.equal(published.status, 201)
  const [event] = await stream.take(1)
  t.same(event, { id: (await published.json()).id, event: 'demo', data: '{"hello":"world"}' })

  // The operator view: its token in the fragment, traded for a ticket as the page does.
  const [, dashboardUrl] = await waitForOutput(server.output, server.exited, /Dashboard: +(\S+)\n/) as [string, string]
  const dashboard = new URL(dashboardUrl)
  t.equal((await fetch(dashboard)).status, 200, 'the dashboard link opens the dashboard')
  const operatorToken = new URLSearchParams(dashboard.hash.slice(1)).get('access_token')
  const issued = await fetch(`${dashboard.origin}/status/tickets`, { method: 'POST', headers: { authorization: `Bearer ${operatorToken}` } })
  t.equal(issued.status, 201, 'the token of the link is an operator token')
  const status = await openStream(t, `${dashboard.origin}/status/stream?access_token=${(await issued.json()).ticket}`)
  t.equal(status.response.status, 200)

  server.child.kill('SIGTERM')
  t.equal(await server.exited, 0, 'SIGTERM stops it cleanly, streams open and all')
  await stream.done
  t.ok(stream.ended, 'the open stream was ended')
})

t.test('an invalid variable stops the start with a message naming it', async (t) => {
  const server = startServer({ PORT: 'not-a-port' })
  t.teardown(() => { server.child.kill('SIGKILL') })
  t.equal(await server.exited, 1)
  t.match(server.output(), /invalid configuration: PORT must be integer/)
})
