import { createParser, type EventSourceMessage } from 'eventsource-parser'
import { serializeSSEEvent } from 'fastify-sse-v2/lib/sse.js'
import t from 'tap'
import type { HistoryPoint, StatusSample } from '../../src/routes/status-stream.js'
import { errorBody, openStream, published, startGateway, type StreamClient, streamUrl, subscriber, type TestGateway, within } from '../helper.js'

function statusUrl (gateway: TestGateway, query = ''): string {
  return `${gateway.baseUrl}/status/stream${query}`
}

function operator (gateway: TestGateway): Record<string, string> {
  return { authorization: `Bearer ${gateway.token({ sub: 'ops', admin: true })}` }
}

/** The samples a dashboard stream carried so far. */
function samples (stream: StreamClient): StatusSample[] {
  return stream.events.filter((e) => e.event === 'status').map((e) => JSON.parse(e.data) as StatusSample)
}

async function sampleWhere (stream: StreamClient, predicate: (s: StatusSample) => boolean, what: string): Promise<StatusSample> {
  await within(stream.until(() => samples(stream).some(predicate), what), what, 10_000)
  return samples(stream).find(predicate) as StatusSample
}

async function operatorTicket (gateway: TestGateway, headers = operator(gateway)): Promise<Response> {
  return await fetch(`${gateway.baseUrl}/status/tickets`, { method: 'POST', headers })
}

t.test('GET /status/stream sends the figures once a second as JSON, and they move with the traffic', async (t) => {
  const gateway = await startGateway(t)
  const dashboard = await openStream(t, statusUrl(gateway), operator(gateway))
  t.equal(dashboard.response.status, 200)
  t.match(dashboard.response.headers.get('content-type'), /^text\/event-stream/)
  t.equal(dashboard.response.headers.get('x-accel-buffering'), 'no')
  t.equal(dashboard.response.headers.get('x-content-type-options'), 'nosniff', 'the API security headers')

  await within(dashboard.take(1), 'the history')
  t.equal(dashboard.events[0]?.event, 'status/history', 'the chart history comes first')
  t.ok(Array.isArray(JSON.parse(dashboard.events[0]?.data ?? '')))
  const first = await sampleWhere(dashboard, () => true, 'a first sample')
  t.match(first, {
    streams: 0,
    channels: { listened: 0, top: [] },
    totals: { published: 0, delivered: 0, cutOffs: 0 },
    listener: { state: 'live', reconnects: 0 },
    pool: { max: 10 },
    // The NOTIFY queue is the cluster's: other sessions' notifications count.
    notifyQueueUsage: Number
  })
  t.type(first.eventLoopLagMs, 'number')

  const subscribers = [
    await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway)),
    await openStream(t, streamUrl(gateway.baseUrl, ['orders', 'chat']), subscriber(gateway))
  ]
  for (let i = 0; i < 5; i++) await published(gateway, 'orders', `event ${i}`)
  await within(Promise.all(subscribers.map(async (s) => await s.take(5))), 'the events')
  const moved = await sampleWhere(dashboard, (s) => s.totals.delivered === 10, 'the deliveries counted')
  t.match(moved, {
    streams: 2,
    channels: { listened: 2, top: [{ name: 'orders', subscribers: 2 }, { name: 'chat', subscribers: 1 }] },
    totals: { published: 5, delivered: 10 }
  })
  const rated = await sampleWhere(dashboard, (s) => (s.rates.published ?? 0) > 0, 'a publish rate')
  t.ok((rated.rates.delivered ?? 0) > 0, 'a delivery rate')
  for (const event of dashboard.events) {
    t.ok(event.data.length > 0 && !/[\r\n]/.test(event.data), `${event.event} data is one non-empty line`)
  }

  // A dashboard opened later gets the history for its charts at once.
  const later = await openStream(t, statusUrl(gateway), operator(gateway))
  await within(later.take(1), 'the history')
  const history = JSON.parse(later.events[0]?.data ?? '') as HistoryPoint[]
  t.ok(history.some((p) => (p.published ?? 0) > 0), 'the history holds the publish rate')
})

t.test('the status stream needs an operator: a header token, or a single-use operator ticket, never a token in the URL', async (t) => {
  const gateway = await startGateway(t)
  await errorBody(t, await fetch(statusUrl(gateway)), 401)
  const notAdmin = gateway.token({ subscribe: ['*'], publish: ['*'] })
  await errorBody(t, await fetch(statusUrl(gateway), { headers: { authorization: `Bearer ${notAdmin}` } }), 403)
  const admin = gateway.token({ admin: true })
  const inUrl = await errorBody(t, await fetch(statusUrl(gateway, `?access_token=${admin}`)), 401)
  t.match(inUrl.message, /no token in a URL.*POST \/status\/tickets/, 'a token in the URL is refused, pointing to tickets')

  await errorBody(t, await operatorTicket(gateway, {}), 401)
  await errorBody(t, await operatorTicket(gateway, { authorization: `Bearer ${notAdmin}` }), 403)
  const issued = await operatorTicket(gateway)
  t.equal(issued.status, 201)
  const { ticket, expiresIn } = await issued.json() as { ticket: string, expiresIn: number }
  t.match(ticket, /^tkt_/)
  t.equal(expiresIn, 30)
  const dashboard = await openStream(t, statusUrl(gateway, `?access_token=${ticket}`))
  t.equal(dashboard.response.status, 200, 'the ticket opens the stream')
  await within(dashboard.take(1), 'the history')
  await errorBody(t, await fetch(statusUrl(gateway, `?access_token=${ticket}`)), 401)

  // An operator ticket opens no channel stream, and a channel ticket no status.
  const another = (await (await operatorTicket(gateway)).json() as { ticket: string }).ticket
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders'], { access_token: another })), 403)
  const channelTicket = await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', ...subscriber(gateway) },
    body: JSON.stringify({ channels: ['orders'] })
  })
  const forChannels = (await channelTicket.json() as { ticket: string }).ticket
  await errorBody(t, await fetch(statusUrl(gateway, `?access_token=${forChannels}`)), 403)
})

t.test('at most 32 status streams are open at once, and a closed one frees its place', async (t) => {
  const gateway = await startGateway(t)
  const headers = operator(gateway)
  const dashboards = await Promise.all(Array.from({ length: 32 }, async () => await openStream(t, statusUrl(gateway), headers)))
  t.ok(dashboards.every((d) => d.response.status === 200), '32 open')
  const refused = await errorBody(t, await fetch(statusUrl(gateway), { headers }), 503)
  t.match(refused.message, /at most 32/)
  dashboards[0]?.close()
  // The server learns of the close when the socket does: ask until it has.
  let tries = 0
  const reopened = await within((async () => {
    for (;;) {
      const res = await fetch(statusUrl(gateway), { headers })
      tries++
      if (res.status === 200) return res
      await res.body?.cancel()
    }
  })(), 'a place freed')
  t.teardown(() => reopened.body?.cancel())
  t.equal(reopened.status, 200, `after ${tries} tries`)
})

t.test('a status stream ends when the operator token expires', async (t) => {
  const gateway = await startGateway(t)
  const headers = { authorization: `Bearer ${gateway.token({ admin: true }, { expiresIn: 2 })}` }
  const ticket = (await (await operatorTicket(gateway, headers)).json() as { ticket: string }).ticket
  const dashboard = await openStream(t, statusUrl(gateway, `?access_token=${ticket}`))
  await within(dashboard.done, 'the end of the stream', 10_000)
  t.same(dashboard.control.map((e) => e.event), ['gateway/expired'], 'told why')
})

t.test('the app closes with a dashboard open, and the dashboard stream ends', async (t) => {
  const gateway = await startGateway(t)
  const dashboard = await openStream(t, statusUrl(gateway), operator(gateway))
  await sampleWhere(dashboard, () => true, 'a sample')
  await within(gateway.app.close(), 'the app to close')
  await within(dashboard.done, 'the end of the stream')
  t.ok(dashboard.ended)
})

// What README "Choices worth knowing" says of fastify-sse-v2 4.2.2, pinned:
// if a release fixes it, this fails and the record is updated.
t.test('fastify-sse-v2 frames CRLF right, but a lone CR injects fields and empty data vanishes', async (t) => {
  function parse (frame: string): EventSourceMessage[] {
    const events: EventSourceMessage[] = []
    const parser = createParser({ onEvent: (e) => events.push(e) })
    parser.feed(frame)
    return events
  }
  t.match(parse(serializeSSEEvent({ id: '1', event: 'c', data: 'two\r\nlines' })), [{ id: '1', event: 'c', data: 'two\nlines' }], 'CRLF: right')
  t.match(parse(serializeSSEEvent({ id: '1', event: 'c', data: 'ok\rid: 999' })), [{ id: '999', event: 'c', data: 'ok' }], 'a lone CR: the payload set the id')
  t.match(parse(serializeSSEEvent({ id: '1', event: 'c', data: 'x\revent: spoof' })), [{ id: '1', event: 'spoof', data: 'x' }], 'a lone CR: the payload set the event')
  t.same(serializeSSEEvent({ id: '1', event: 'c', data: '' }), 'id: 1\nevent: c\n\n', 'empty data: no data line, so the browser dispatches nothing')
  t.same(parse(serializeSSEEvent({ id: '1', event: 'c', data: '' })), [], 'and the event is lost')
})
