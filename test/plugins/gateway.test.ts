// What an operator sees when the listener connection is killed: the logs,
// the metrics and /readyz tell the story, and every stream hears of the gap.
import type { AddressInfo } from 'node:net'
import { Writable } from 'node:stream'
import Fastify from 'fastify'
import t from 'tap'
import { build, loggerOptions } from '../../src/app.js'
import { loadConfig } from '../../src/config.js'
import { LISTENER_APPLICATION_NAME } from '../../src/listener.js'
import gatewayPlugin from '../../src/plugins/gateway.js'
import metricsPlugin from '../../src/plugins/metrics.js'
import { JWT_SECRET, connect, createDatabase, openStream, streamUrl, within } from '../helper.js'

interface LogLine {
  level: number
  msg: string
  [key: string]: unknown
}

t.test('a killed listener shows in the logs, the metrics and /readyz, and streams get gateway/gap', async (t) => {
  const lines: LogLine[] = []
  const sink = new Writable({
    write (chunk, _encoding, done) {
      for (const line of String(chunk).split('\n')) if (line !== '') lines.push(JSON.parse(line) as LogLine)
      done()
    }
  })
  const url = await createDatabase(t)
  const config = loadConfig({ JWT_SECRET, DATABASE_URL: url }, false)
  const app = await build({ ...config, DATABASE_URL: url, JWT_SECRET }, { ...loggerOptions('info') as object, stream: sink })
  t.teardown(() => app.close())
  await app.listen({ host: '127.0.0.1', port: 0 })
  const baseUrl = `http://127.0.0.1:${(app.server.address() as AddressInfo).port}`
  const stream = await openStream(t, streamUrl(baseUrl, ['a', 'b']), { authorization: `Bearer ${app.jwt.sign({ subscribe: ['*'] })}` })
  await within(stream.until(() => stream.control.length > 0, 'gateway/open'), 'gateway/open')
  t.ok(lines.some((l) => l.msg === 'listener connected'), 'the first connection is logged')

  const db = await connect(t, url)
  const lost = new Promise<void>((resolve) => app.listener.once('disconnected', () => resolve()))
  const back = new Promise<void>((resolve) => app.listener.once('connected', () => resolve()))
  await db.query('SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database()', [LISTENER_APPLICATION_NAME])
  await within(lost, 'the listener to notice')
  await within(back, 'the listener to come back', 10_000)

  const lostLine = lines.find((l) => l.msg === 'listener connection lost; reconnecting')
  t.ok(lostLine, 'the loss is logged')
  t.equal(lostLine?.level, 40, 'as a warning')
  t.match(lines.find((l) => l.msg === 'listener reconnected, re-LISTENed its channels and caught up'), { channels: 2, caughtUp: 0, streamsTold: 1 }, 'the recovery is logged with its counts')

  await within(stream.until(() => stream.control.some((e) => e.event === 'gateway/gap'), 'gateway/gap'), 'gateway/gap')
  t.notOk(stream.ended, 'the stream stayed open')
  const metrics = (await app.inject({ url: '/metrics', headers: { authorization: `Bearer ${app.jwt.sign({ admin: true })}` } })).body
  t.match(metrics, /^pgsse_listener_reconnects_total 1$/m)
  t.match(metrics, /^pgsse_listener_connected 1$/m)
  t.match(metrics, /^pgsse_channels_listened 2$/m)
  t.equal((await app.inject('/readyz')).statusCode, 200, 'ready again')
})

t.test('the gateway plugin refuses a heartbeat or pruning interval that is not a positive whole number of milliseconds', async (t) => {
  const retention = { maxAgeSeconds: 60, maxEvents: 10, idempotencyWindowSeconds: 60, intervalMs: 1000 }
  for (const [what, options] of [
    ['heartbeatMs', { heartbeatMs: 0, retention }],
    ['heartbeatMs', { heartbeatMs: Number.NaN, retention }],
    ['retention.intervalMs', { heartbeatMs: 1000, retention: { ...retention, intervalMs: 0.5 } }]
  ] as const) {
    const app = Fastify()
    t.teardown(() => app.close())
    await app.register(metricsPlugin)
    // Refused before the listener connects: this database does not exist.
    await t.rejects(async () => { await app.register(gatewayPlugin, { listener: { connectionString: 'postgres://127.0.0.1:1/none' }, streams: { maxHeldBytes: 1024, retryMs: 1000 }, ...options }) }, { name: 'TypeError', message: `${what} must be a positive whole number` })
  }
})
