import t from 'tap'
import { connect, openStream, publish, startGateway, streamUrl, subscriber } from '../helper.js'

interface Status {
  streams: number
  listener: { state: string, reconnects: number, lastEventId: string, channels: number }
  channels: Array<{ name: string, subscribers: number, lastEventAt: string | null, lastEventId: string | null }>
  log: { head: string, prunedThrough: string, retention: { maxAgeSeconds: number, maxEvents: number } }
}

t.test('GET /status shows the listener, each channel with its subscribers and last event, and the log', async (t) => {
  const gateway = await startGateway(t, { RETENTION_MAX_EVENTS: '500' })
  const admin = { authorization: `Bearer ${gateway.token({ admin: true })}` }
  const a = await openStream(t, streamUrl(gateway.baseUrl, ['orders', 'chat']), subscriber(gateway))
  await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway))
  const before = Date.now()
  const id = ((await (await publish(gateway, 'orders', 'one')).json()) as { id: string }).id
  await a.take(1)

  const res = await fetch(`${gateway.baseUrl}/status`, { headers: admin })
  t.equal(res.status, 200)
  const status = await res.json() as Status
  t.equal(status.streams, 2)
  t.same(status.listener, { state: 'live', reconnects: 0, lastEventId: id, channels: 2 })
  t.match(status.channels, [
    { name: 'chat', subscribers: 1, lastEventAt: null, lastEventId: null },
    { name: 'orders', subscribers: 2, lastEventId: id }
  ])
  const at = Date.parse(status.channels[1]?.lastEventAt ?? '')
  t.ok(at >= before - 1000 && at <= Date.now(), 'the last event time is when it arrived')
  t.same(status.log, { head: id, prunedThrough: '0', retention: { maxAgeSeconds: 86400, maxEvents: 500 } })
})

t.test('GET /status counts listener reconnects', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  await openStream(t, streamUrl(gateway.baseUrl, ['c']), subscriber(gateway))
  const reconnected = new Promise((resolve) => gateway.app.listener.once('connected', resolve))
  await db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg-sse-gateway:listener' AND datname = current_database()")
  await reconnected
  const status = await (await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: `Bearer ${gateway.token({ admin: true })}` } })).json() as Status
  t.match(status.listener, { state: 'live', reconnects: 1, channels: 1 })
})

t.test('GET /status needs an operator token', async (t) => {
  const gateway = await startGateway(t)
  const missing = await fetch(`${gateway.baseUrl}/status`)
  t.equal(missing.status, 401)
  t.match(await missing.json(), { statusCode: 401, error: 'Unauthorized' })
  const bad = await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: 'Bearer not.a.token' } })
  t.equal(bad.status, 401)
  const notAdmin = await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: `Bearer ${gateway.token({ subscribe: ['*'], publish: ['*'] })}` } })
  t.equal(notAdmin.status, 403)
  t.match(await notAdmin.json(), { statusCode: 403, error: 'Forbidden', message: /admin/ })
})

t.test('GET /metrics needs an operator token, which Prometheus sends as its bearer token', async (t) => {
  const gateway = await startGateway(t)
  await openStream(t, streamUrl(gateway.baseUrl, ['counted']), subscriber(gateway))
  const missing = await fetch(`${gateway.baseUrl}/metrics`)
  t.equal(missing.status, 401)
  const refused = await missing.text()
  t.match(JSON.parse(refused), { statusCode: 401, error: 'Unauthorized', message: /Authorization: Bearer/ })
  t.notMatch(refused, /pgsse_/, 'nothing of the figures')
  const bad = await fetch(`${gateway.baseUrl}/metrics`, { headers: { authorization: 'Bearer not.a.token' } })
  t.equal(bad.status, 401)
  t.notMatch(await bad.text(), /pgsse_/)
  const notAdmin = await fetch(`${gateway.baseUrl}/metrics`, { headers: subscriber(gateway) })
  t.equal(notAdmin.status, 403)
  t.match(await notAdmin.json(), { statusCode: 403, error: 'Forbidden', message: /admin/ })
  const inQuery = await fetch(`${gateway.baseUrl}/metrics?access_token=${gateway.token({ admin: true })}`)
  t.equal(inQuery.status, 401, 'the operator token goes in the header, not in a URL')
  await inQuery.arrayBuffer()

  const scraped = await fetch(`${gateway.baseUrl}/metrics`, { headers: { authorization: `Bearer ${gateway.token({ admin: true }, { expiresIn: '30d' })}` } })
  t.equal(scraped.status, 200)
  t.match(scraped.headers.get('content-type'), /^text\/plain/)
  t.match(await scraped.text(), /^pgsse_streams_open 1$/m)
})
