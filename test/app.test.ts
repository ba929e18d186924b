import { Writable } from 'node:stream'
import t from 'tap'
import { build, loggerOptions, redactUrl } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { encodeEvent } from '../src/sse.js'
import { JWT_SECRET, createDatabase, openStream, publish, startGateway, streamUrl } from './helper.js'

t.test('GET /healthz answers while the process is up', async (t) => {
  const { app } = await startGateway(t)
  const response = await app.inject('/healthz')
  t.equal(response.statusCode, 200)
  t.same(response.json(), { status: 'ok' })
})

t.test('GET /readyz is 200 while the listener and the pool work, 503 when the listener is down', async (t) => {
  const { app } = await startGateway(t)
  const ready = await app.inject('/readyz')
  t.equal(ready.statusCode, 200)
  t.same(ready.json(), { status: 'ready', listener: true, database: true })

  await app.listener.close()
  const down = await app.inject('/readyz')
  t.equal(down.statusCode, 503)
  t.same(down.json(), { status: 'unavailable', listener: false, database: true })
})

t.test('GET /metrics is Prometheus text with the gateway figures', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['m'], { access_token: gateway.token({ subscribe: ['*'] }) }))
  t.equal((await publish(gateway, 'm', 'one')).status, 201)
  await stream.take(1)
  const response = await gateway.app.inject({ url: '/metrics', headers: { authorization: `Bearer ${gateway.token({ admin: true })}` } })
  t.equal(response.statusCode, 200)
  t.match(response.headers['content-type'], /^text\/plain/)
  t.match(response.body, /^pgsse_events_published_total 1$/m)
  t.match(response.body, /^pgsse_publish_transactions_total 1$/m, 'in one transaction')
  t.match(response.body, /^pgsse_events_delivered_total 1$/m)
  t.match(response.body, /^pgsse_events_received_total\{kind="logged"\} 1$/m)
  t.match(response.body, /^pgsse_listener_connected 1$/m)
  t.match(response.body, /^pgsse_publish_duration_seconds_count\{route="\/channels\/:channel"\} 1$/m, 'the publish was timed')
  t.match(response.body, /^pgsse_fanout_duration_seconds_count 1$/m, 'the fan-out was timed')
  const frame = encodeEvent({ id: '1', event: 'm', data: 'one' })
  t.match(response.body, new RegExp(`^pgsse_bytes_written_total ${Buffer.byteLength(frame)}$`, 'm'), 'the event\'s bytes were counted')
  t.match(response.body, /^pgsse_frames_dropped_total 0$/m)
  t.match(response.body, /^pgsse_pool_connections\{state="total"\} [1-9]/m, 'the pool has connections')
  t.match(response.body, /^pgsse_pool_connections\{state="waiting"\} \d+$/m)
  t.match(response.body, /^pgsse_process_nodejs_eventloop_lag_seconds /m, 'event-loop lag')
})

t.test('GET / serves the demo page; unknown paths are JSON 404s', async (t) => {
  const { app } = await startGateway(t)
  const page = await app.inject('/?channel=demo')
  t.equal(page.statusCode, 200)
  t.match(page.headers['content-type'], /^text\/html/)
  t.match(page.body, /<script src="\/demo.js"/)
  const script = await app.inject('/demo.js')
  t.equal(script.statusCode, 200)
  t.match(script.body, /new EventSource\(/)

  const missing = await app.inject('/nope')
  t.equal(missing.statusCode, 404)
  t.same(Object.keys(missing.json()).sort(), ['error', 'message', 'statusCode'])
  // Path traversal is tested in security.test.ts over a raw socket: inject
  // normalises `/../x` to `/x` before the server sees it.
})

t.test('a second instance on the same database migrates nothing twice and shares the log', async (t) => {
  const first = await startGateway(t)
  const second = await startGateway(t, {}, first.databaseUrl)
  const stream = await openStream(t, streamUrl(second.baseUrl, ['shared'], { access_token: second.token({ subscribe: ['*'] }) }))
  const response = await publish(first, 'shared', 'from the first')
  t.equal(response.status, 201)
  const [event] = await stream.take(1)
  t.same(event, { id: (await response.json()).id, event: 'shared', data: 'from the first' })
})

t.test('request logs never carry a token', async (t) => {
  const lines: string[] = []
  const sink = new Writable({ write (chunk, _encoding, done) { lines.push(String(chunk)); done() } })
  const url = await createDatabase(t)
  const config = loadConfig({ JWT_SECRET, DATABASE_URL: url }, false)
  const app = await build({ ...config, DATABASE_URL: url, JWT_SECRET }, { ...loggerOptions('info') as object, stream: sink })
  t.teardown(() => app.close())
  const token = app.jwt.sign({ publish: ['*'] })
  await app.inject({ url: `/channels/x?access_token=${token}`, method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, payload: 'hi' })
  await app.inject({ url: `/events?channel=bad%20name&access_token=${token}` })
  const log = lines.join('')
  t.match(log, /access_token=\[redacted\]/, 'the query token is redacted')
  t.notMatch(log, token, 'the token appears nowhere')
  t.notMatch(log, JWT_SECRET, 'nor the secret')
})

t.test('redactUrl hides access_token wherever it stands', async (t) => {
  t.equal(redactUrl('/events?access_token=abc&channel=x'), '/events?access_token=[redacted]&channel=x')
  t.equal(redactUrl('/events?channel=x&ACCESS_TOKEN=abc'), '/events?channel=x&ACCESS_TOKEN=[redacted]')
  t.equal(redactUrl('/events?channel=x'), '/events?channel=x')
})

t.test('errors of the server side do not leak internals', async (t) => {
  const url = await createDatabase(t)
  const app = await build({ ...loadConfig({ JWT_SECRET, DATABASE_URL: url }, false), DATABASE_URL: url, JWT_SECRET }, false)
  t.teardown(() => app.close())
  app.get('/boom', async () => { throw new Error('SELECT secret FROM internals') })
  const response = await app.inject('/boom')
  t.equal(response.statusCode, 500)
  t.same(response.json(), { statusCode: 500, error: 'Internal Server Error', message: 'Internal Server Error' })
})
