import { type AddressInfo, connect as netConnect } from 'node:net'
import { Writable } from 'node:stream'
import { build, loggerOptions } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { createDatabase, JWT_SECRET, openStream, streamUrl, type Test, type TestGateway, within } from './helper.js'

/**
 * After hostile requests: the gateway is still ready, and a stream opened
 * now gets an event published now.
 */
export async function stillServing (t: Test, gateway: TestGateway, channel = 'still.serving'): Promise<void> {
  const ready = await fetch(`${gateway.baseUrl}/readyz`)
  t.equal(ready.status, 200, 'the gateway is still ready')
  const stream = await openStream(t, streamUrl(gateway.baseUrl, [channel]), { authorization: `Bearer ${gateway.token({ subscribe: ['*'] })}` })
  t.equal(stream.response.status, 200, 'a stream still opens')
  const res = await fetch(`${gateway.baseUrl}/channels/${channel}`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', authorization: `Bearer ${gateway.token({ publish: ['*'] })}` },
    body: 'still delivering'
  })
  t.equal(res.status, 201, 'a publish still succeeds')
  const [event] = await within(stream.take(1), 'the event after the hostile requests')
  t.equal(event?.data, 'still delivering', 'and is still delivered')
  stream.close()
  await stream.done
}

/**
 * Writes raw bytes to the gateway's socket and resolves with all it answers
 * until it closes the connection (or `ms` pass: then what arrived so far).
 */
export async function rawExchange (baseUrl: string, bytes: string | Buffer, ms = 5000): Promise<string> {
  const { hostname, port } = new URL(baseUrl)
  return await new Promise((resolve, reject) => {
    const socket = netConnect({ host: hostname, port: Number(port) })
    const chunks: Buffer[] = []
    const timer = setTimeout(() => socket.destroy(), ms)
    socket.on('data', (chunk) => chunks.push(chunk))
    socket.on('error', (err: NodeJS.ErrnoException) => {
      // The server may reset after answering: what it answered is what counts.
      if (err.code !== 'ECONNRESET' && err.code !== 'EPIPE') reject(err)
    })
    socket.on('close', () => {
      clearTimeout(timer)
      resolve(Buffer.concat(chunks).toString('latin1'))
    })
    socket.write(bytes)
  })
}

const base64url = (value: unknown): string => Buffer.from(JSON.stringify(value)).toString('base64url')

/** An unsigned token (`alg: none`) with the claims. */
export function unsignedToken (claims: Record<string, unknown>): string {
  return `${base64url({ alg: 'none', typ: 'JWT' })}.${base64url(claims)}.`
}

/** Seconds since the epoch, `offset` seconds from now. */
export const epoch = (offset = 0): number => Math.floor(Date.now() / 1000) + offset

/**
 * A gateway like startGateway's, logging everything (trace) into `lines`
 * through the gateway's own logger options, to check what reaches a log.
 */
export async function loggingGateway (t: Test): Promise<{ gateway: TestGateway, lines: string[] }> {
  const lines: string[] = []
  const sink = new Writable({ write (chunk, _encoding, done) { lines.push(String(chunk)); done() } })
  const url = await createDatabase(t)
  const config = loadConfig({ JWT_SECRET, DATABASE_URL: url, LOG_LEVEL: 'trace' }, false)
  const app = await build({ ...config, DATABASE_URL: url, JWT_SECRET }, { ...loggerOptions('trace'), stream: sink })
  t.teardown(() => app.close())
  await app.listen({ host: '127.0.0.1', port: 0 })
  const baseUrl = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  return { gateway: { app, baseUrl, databaseUrl: url, token: (claims, options) => app.jwt.sign(claims, options) }, lines }
}
