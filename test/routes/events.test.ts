import t from 'tap'
import { LISTENER_APPLICATION_NAME } from '../../src/listener.js'
import { connect, errorBody, FRAMING_CASES, openStream, published, startGateway, type StreamClient, streamUrl, subscriber, type Test, waitFor, waitForData, within } from '../helper.js'

async function take (stream: StreamClient, n: number): Promise<Array<{ id: string | undefined, event: string | undefined, data: string }>> {
  return await within(stream.take(n), `${n} events`)
}

t.test('a stream answers with SSE headers and begins with retry', async (t) => {
  const gateway = await startGateway(t, { RETRY_MS: '1234' })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['news']), subscriber(gateway))
  t.equal(stream.response.status, 200)
  t.match(stream.response.headers.get('content-type'), /^text\/event-stream(;|$)/)
  t.equal(stream.response.headers.get('cache-control'), 'no-cache')
  t.equal(stream.response.headers.get('x-accel-buffering'), 'no')
  await within(stream.until(() => stream.retry !== undefined, 'retry'), 'retry')
  t.ok(stream.retry !== undefined && stream.retry >= 1234 && stream.retry < 2468, `retry (${stream.retry}) is drawn from [RETRY_MS, 2 × RETRY_MS)`)
  t.equal(stream.events.length, 0, 'retry comes before any event')
  await published(gateway, 'news', 'first')
  const [event] = await take(stream, 1)
  t.equal(event?.data, 'first')
})

t.test('the first bytes of the stream are the retry field', async (t) => {
  const gateway = await startGateway(t, { RETRY_MS: '2500' })
  const res = await fetch(streamUrl(gateway.baseUrl, ['news']), { headers: subscriber(gateway) })
  t.teardown(() => res.body?.cancel())
  const reader = (res.body as ReadableStream<Uint8Array>).getReader()
  const decoder = new TextDecoder()
  let text = ''
  while (!text.includes('\n\n')) {
    const { value, done } = await within(reader.read(), 'the first bytes')
    if (done) break
    text += decoder.decode(value, { stream: true })
  }
  t.match(text, /^retry: \d+\n\n/)
  reader.releaseLock()
})

t.test('each stream draws its retry afresh, so that clients do not all come back at once', async (t) => {
  const gateway = await startGateway(t, { RETRY_MS: '1000' })
  const retries = new Set<number>()
  for (let i = 0; i < 8; i++) {
    const stream = await openStream(t, streamUrl(gateway.baseUrl, ['jitter']), subscriber(gateway))
    await within(stream.until(() => stream.retry !== undefined, 'retry'), 'retry')
    const retry = stream.retry as number
    t.ok(retry >= 1000 && retry < 2000, `retry ${retry} in [1000, 2000)`)
    retries.add(retry)
    stream.close()
    await stream.done
  }
  // Eight draws from a thousand values: all alike would be a one-in-10^21 event.
  t.ok(retries.size > 1, `several values (${[...retries].join(', ')})`)
})

t.test('payloads arrive exactly through POST and the stream', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['frame.test']), subscriber(gateway))
  const cases = FRAMING_CASES
  const ids: string[] = []
  for (const [payload] of cases) ids.push(await published(gateway, 'frame.test', payload))
  const events = await take(stream, cases.length)
  cases.forEach(([payload, expected], i) => {
    t.equal(events[i]?.data, expected, `data of ${JSON.stringify(payload)}`)
    t.equal(events[i]?.event, 'frame.test', `event of ${JSON.stringify(payload)}`)
    t.equal(events[i]?.id, ids[i], `id of ${JSON.stringify(payload)}`)
  })
})

// A lone CR ends a line for the browser. fastify-sse-v2 4.2.2 writes it raw
// inside a data field, so "ok\rid: 999" sets the event's id (its issue #110):
// here each CR becomes its own data line and nothing else.
t.test('a lone CR in a payload never injects a field: each event arrives with the id it was published with', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['cr']), subscriber(gateway))
  const cases = [['ok\rid: 999', 'ok\nid: 999'], ['one\r\rtwo', 'one\n\ntwo'], ['end\r', 'end\n']] as const
  const ids: string[] = []
  for (const [payload] of cases) ids.push(await published(gateway, 'cr', payload))
  await published(gateway, 'cr', 'sentinel')
  await waitForData(stream, 'sentinel')
  t.same(stream.events.slice(0, -1), cases.map(([, expected], i) => ({ id: ids[i], event: 'cr', data: expected })), 'exact data, the published id, the channel as event')
  t.same(stream.control.map((e) => e.event), ['gateway/open'], 'no other event')
})

t.test('a stream on several channels gets each event named by its channel', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['a', 'b.c', 'Orders']), subscriber(gateway))
  await published(gateway, 'a', 'to a')
  await published(gateway, 'orders', 'not subscribed: another channel')
  await published(gateway, 'b.c', 'to b.c')
  await published(gateway, 'Orders', 'to Orders')
  const events = await take(stream, 3)
  t.same(events.map((e) => [e.event, e.data]), [['a', 'to a'], ['b.c', 'to b.c'], ['Orders', 'to Orders']])
  t.equal(stream.events.length, 3, 'the lower-case "orders" is another channel')
})

t.test('a channel named twice in a stream delivers each event once', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['dup', 'dup']), subscriber(gateway))
  await published(gateway, 'dup', 'one')
  await published(gateway, 'dup', 'sentinel')
  await waitForData(stream, 'sentinel')
  t.same(stream.events.map((e) => e.data), ['one', 'sentinel'])
})

t.test('a NOTIFY from another session arrives exact and without id', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['sql', 'Chan']), subscriber(gateway))
  const db = await connect(t, gateway.databaseUrl)
  await db.query('SELECT pg_notify($1, $2)', ['sql', '  spaced\r\nand ünïcödé'])
  await db.query('SELECT pg_notify($1, $2)', ['sql', ''])
  await db.query('NOTIFY "Chan", \'x\'')
  await db.query('NOTIFY chan, \'folded to lower case: not subscribed\'')
  await db.query('SELECT pg_notify($1, $2)', ['sql', 'sentinel'])
  await waitForData(stream, 'sentinel')
  t.same(stream.events, [
    { id: undefined, event: 'sql', data: '  spaced\nand ünïcödé' },
    { id: undefined, event: 'sql', data: '' },
    { id: undefined, event: 'Chan', data: 'x' },
    { id: undefined, event: 'sql', data: 'sentinel' }
  ])
})

t.test('sse_gateway.publish delivers on COMMIT, with the ids drawn then, and nothing on ROLLBACK', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['tx']), subscriber(gateway))
  const db = await connect(t, gateway.databaseUrl)

  await db.query('BEGIN')
  await db.query('SELECT sse_gateway.publish($1, $2)', ['tx', 'rolled back'])
  await db.query('ROLLBACK')

  await db.query('BEGIN')
  await db.query('SELECT sse_gateway.publish($1, $2)', ['tx', 'committed'])
  await db.query('SELECT sse_gateway.publish($1, $2)', ['tx', 'committed'])
  t.equal(stream.events.length, 0, 'nothing before COMMIT')
  await db.query('COMMIT')
  const { rows: [drawn] } = await db.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')

  const sentinel = await published(gateway, 'tx', 'sentinel')
  await waitForData(stream, 'sentinel')
  t.same(stream.events, [
    { id: drawn?.ids[0], event: 'tx', data: 'committed' },
    { id: drawn?.ids[1], event: 'tx', data: 'committed' },
    { id: sentinel, event: 'tx', data: 'sentinel' }
  ], 'both identical events of the committed transaction, none of the rolled back one')
})

t.test('a payload beyond the NOTIFY limit arrives complete, in order, with its id', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['big']), subscriber(gateway))
  const large = 'x'.repeat(9999) + '\r\n' + 'y'.repeat(9999)
  t.equal(Buffer.byteLength(large), 20000)
  const before = await published(gateway, 'big', 'small before')
  const id = await published(gateway, 'big', large)
  const after = await published(gateway, 'big', 'small after')
  const events = await take(stream, 3)
  t.same(events.map((e) => e.id), [before, id, after])
  t.equal(events[0]?.data, 'small before')
  t.equal(events[1]?.data, 'x'.repeat(9999) + '\n' + 'y'.repeat(9999), 'the large payload, complete')
  t.equal(events[2]?.data, 'small after')
})

// A short summary of a payload, so that a failure does not print 20 kB.
const summary = (data: string): string => data.length > 40 ? `${data.slice(0, 8)}… (${data.length} chars)` : data

t.test('large payloads committed together all arrive, in order', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['big']), subscriber(gateway))
  const db = await connect(t, gateway.databaseUrl)
  const payloads = ['small 1', 'a'.repeat(20000), 'b'.repeat(20000), 'small 2', 'c'.repeat(9000)]
  await db.query('BEGIN')
  for (const payload of payloads) await db.query('SELECT sse_gateway.publish($1, $2)', ['big', payload])
  await db.query('COMMIT')
  await published(gateway, 'big', 'sentinel')
  await waitForData(stream, 'sentinel')
  t.same(stream.events.map((e) => summary(e.data)), [...payloads, 'sentinel'].map(summary))
})

t.test('every stream on a channel gets the event', async (t) => {
  const gateway = await startGateway(t)
  const streams = await Promise.all(Array.from({ length: 5 }, async () =>
    await openStream(t, streamUrl(gateway.baseUrl, ['fan']), subscriber(gateway))))
  const id = await published(gateway, 'fan', 'to all')
  for (const [i, stream] of streams.entries()) {
    const [event] = await take(stream, 1)
    t.same(event, { id, event: 'fan', data: 'to all' }, `stream ${i}`)
  }
})

t.test('the gateway LISTENs once per channel and UNLISTENs when the last stream leaves', async (t) => {
  const gateway = await startGateway(t)
  const { app } = gateway
  t.notOk(app.listener.channels.has('shared'), 'nothing listened before a stream')
  const streams = await Promise.all(Array.from({ length: 3 }, async () =>
    await openStream(t, streamUrl(gateway.baseUrl, ['shared']), subscriber(gateway))))
  t.ok(app.listener.channels.has('shared'), 'LISTENed once the streams opened')
  t.same([...app.listener.channels], ['shared'], 'one LISTEN for three streams')
  t.equal(app.hub.subscriberCount('shared'), 3)

  const db = await connect(t, gateway.databaseUrl)
  const { rows } = await db.query<{ n: number }>(
    'SELECT count(*)::int AS n FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1',
    [LISTENER_APPLICATION_NAME])
  t.equal(rows[0]?.n, 1, 'one listener connection')

  const [first, second, last] = streams as [StreamClient, StreamClient, StreamClient]
  first.close()
  second.close()
  await waitFor(() => app.hub.subscriberCount('shared') === 1, 'two streams to leave')
  t.ok(app.listener.channels.has('shared'), 'still LISTENed while a stream remains')
  await published(gateway, 'shared', 'still here')
  t.same((await take(last, 1)).map((e) => e.data), ['still here'])

  last.close()
  await waitFor(() => !app.listener.channels.has('shared'), 'UNLISTEN after the last stream left')
  t.equal(app.hub.subscriberCount('shared'), 0)

  const again = await openStream(t, streamUrl(gateway.baseUrl, ['shared']), subscriber(gateway))
  t.ok(app.listener.channels.has('shared'), 'LISTENed again for a new stream')
  await published(gateway, 'shared', 'back')
  t.same((await take(again, 1)).map((e) => e.data), ['back'])
})

t.test('a heartbeat comment comes every HEARTBEAT_MS', async (t) => {
  const gateway = await startGateway(t, { HEARTBEAT_MS: '50' })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['quiet']), subscriber(gateway))
  await within(stream.until(() => stream.comments.length >= 3, '3 heartbeats'), '3 heartbeats', 2000)
  t.ok(stream.comments.every((c) => c === 'heartbeat'), 'heartbeat comments')
  t.equal(stream.events.length, 0, 'a heartbeat dispatches no event')
})

t.test('subscribing needs a token allowing every channel of the stream', async (t) => {
  const gateway = await startGateway(t)
  const url = streamUrl(gateway.baseUrl, ['orders.eu', 'chat'])

  await errorBody(t, await fetch(url), 401)
  await errorBody(t, await fetch(url, { headers: { authorization: 'Bearer not.a.token' } }), 401)
  await errorBody(t, await fetch(url, { headers: { authorization: 'Basic dXNlcjpwYXNz' } }), 401)
  const expired = gateway.token({ subscribe: ['*'] }, { expiresIn: -10 })
  await errorBody(t, await fetch(url, { headers: { authorization: `Bearer ${expired}` } }), 401)
  const other = gateway.token({ subscribe: ['*'] }).split('.')
  const forged = `${other[0]}.${other[1]}.${Buffer.from('x'.repeat(32)).toString('base64url')}`
  await errorBody(t, await fetch(url, { headers: { authorization: `Bearer ${forged}` } }), 401)

  await errorBody(t, await fetch(url, { headers: subscriber(gateway, ['orders.*']) }), 403)
  await errorBody(t, await fetch(url, { headers: { authorization: `Bearer ${gateway.token({ publish: ['*'] })}` } }), 403)
  await errorBody(t, await fetch(url, { headers: { authorization: `Bearer ${gateway.token({})}` } }), 403)

  const stream = await openStream(t, url, subscriber(gateway, ['orders.*', 'chat']))
  t.equal(stream.response.status, 200, 'patterns covering every channel open the stream')
  await published(gateway, 'chat', 'hello')
  t.same((await take(stream, 1)).map((e) => e.data), ['hello'])
})

t.test('a token signed with another secret is refused with 401', async (t) => {
  const gateway = await startGateway(t)
  const stranger = await startGateway(t, { JWT_SECRET: 'another-secret-that-is-at-least-32-bytes' })
  const token = stranger.token({ subscribe: ['*'] })
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['chat']), { headers: { authorization: `Bearer ${token}` } }), 401)
})

t.test('the token may come as ?access_token=', async (t) => {
  const gateway = await startGateway(t)
  const token = gateway.token({ subscribe: ['chat'] })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['chat'], { access_token: token }))
  t.equal(stream.response.status, 200)
  await published(gateway, 'chat', 'via query')
  t.same((await take(stream, 1)).map((e) => e.data), ['via query'])

  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['other'], { access_token: token })), 403)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['chat'], { access_token: 'garbage' })), 401)
})

t.test('channels matching PUBLIC_CHANNELS need no token', async (t) => {
  const gateway = await startGateway(t, { PUBLIC_CHANNELS: 'public.*' })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['public.news', 'public.sport']))
  t.equal(stream.response.status, 200, 'public channels open without a token')
  await published(gateway, 'public.sport', 'goal')
  t.same((await take(stream, 1)).map((e) => e.data), ['goal'])

  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['public.news', 'private'])), 401)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['public'])), 401)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['public.news', 'private']), { headers: subscriber(gateway, ['other']) }), 403)

  const mixed = await openStream(t, streamUrl(gateway.baseUrl, ['public.news', 'private']), subscriber(gateway, ['private']))
  t.equal(mixed.response.status, 200, 'a token for the private channels suffices')
  await published(gateway, 'public.news', 'public')
  await published(gateway, 'private', 'private')
  t.same((await take(mixed, 2)).map((e) => e.data), ['public', 'private'])
})

t.test('an invalid channel name is refused with 400', async (t) => {
  const gateway = await startGateway(t)
  const headers = subscriber(gateway)
  const invalid = ['', 'x'.repeat(64), 'has space', 'ünï', 'a"b', 'a;b', 'a/b', 'a*', "it's"]
  for (const name of invalid) {
    await t.test(`channel ${JSON.stringify(name)}`, async (t) => {
      await errorBody(t, await fetch(streamUrl(gateway.baseUrl, [name]), { headers }), 400)
      await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['valid', name]), { headers }), 400)
    })
  }
  await errorBody(t, await fetch(new URL('/events', gateway.baseUrl), { headers }), 400)
  t.same([...gateway.app.listener.channels], [], 'nothing was LISTENed')

  const longest = 'x'.repeat(63)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, [longest, 'A-z_0.9:-']), headers)
  t.equal(stream.response.status, 200, '63 bytes and every allowed character are fine')
  await published(gateway, longest, 'long')
  await published(gateway, 'A-z_0.9:-', 'odd')
  t.same((await take(stream, 2)).map((e) => [e.event, e.data]), [[longest, 'long'], ['A-z_0.9:-', 'odd']])
})

t.test('a stream may have at most MAX_CHANNELS_PER_STREAM channels', async (t) => {
  const gateway = await startGateway(t, { MAX_CHANNELS_PER_STREAM: '3' })
  const headers = subscriber(gateway)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a', 'b', 'c', 'd']), { headers }), 400)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['a', 'b', 'c', 'c']), headers)
  t.equal(stream.response.status, 200, 'the limit itself is fine, repeated names count once')
})

t.test('app.close() ends open streams and resolves', async (t) => {
  const gateway = await startGateway(t)
  const streams = await Promise.all([
    openStream(t, streamUrl(gateway.baseUrl, ['one']), subscriber(gateway)),
    openStream(t, streamUrl(gateway.baseUrl, ['one', 'two']), subscriber(gateway))
  ])
  await within(gateway.app.close(), 'app.close()')
  for (const stream of streams) {
    await within(stream.done, 'the stream to end')
    t.ok(stream.ended, 'the client sees its stream end')
  }
  t.equal(gateway.app.streams.size, 0, 'no stream left')
})

/** Opens a stream as EventSource does (`Accept: text/event-stream`), and reads it to its end. */
async function eventSourceAnswer (t: Test, url: string, headers: Record<string, string> = {}): Promise<StreamClient> {
  const stream = await openStream(t, url, { ...headers, accept: 'text/event-stream' })
  await within(stream.done, 'the answer to end')
  return stream
}

/** Checks an answer EventSource retries: a 200 event stream that advises retry, says why, and ends. */
function checkRetryLater (t: Test, stream: StreamClient, retryMs: number, status: number, reason: RegExp): void {
  t.equal(stream.response.status, 200, 'a 200, which EventSource retries')
  t.match(stream.response.headers.get('content-type'), /^text\/event-stream/)
  const retry = stream.retry as number
  t.ok(retry >= 2 * retryMs && retry < 4 * retryMs, `retry ${retry} is drawn from [2 × RETRY_MS, 4 × RETRY_MS)`)
  t.equal(Number(stream.response.headers.get('retry-after')), Math.ceil(retry / 1000), 'Retry-After says the same, in seconds')
  t.equal(stream.control.length, 1)
  const [event] = stream.control
  t.equal(event?.event, 'gateway/unavailable')
  t.equal(event?.id, undefined, 'no id: the client keeps its place')
  t.match(JSON.parse(event?.data ?? '{}'), { status, reason, retry })
  t.equal(stream.events.length, 0)
}

t.test('a stream the gateway cannot open now is a 200 that says retry, and ends: EventSource comes back', async (t) => {
  const gateway = await startGateway(t, { MAX_STREAMS: '1', RETRY_MS: '1000' })
  const url = streamUrl(gateway.baseUrl, ['full'])
  const first = await openStream(t, url, subscriber(gateway))
  checkRetryLater(t, await eventSourceAnswer(t, url, subscriber(gateway)), 1000, 503, /as many streams as it can/)
  const plain = await fetch(url, { headers: subscriber(gateway) })
  t.ok(Number(plain.headers.get('retry-after')) >= 2, 'curl and fetch see Retry-After')
  await errorBody(t, plain, 503)
  t.equal(gateway.app.streamLimits.total, 1, 'the refusals hold no slot')

  first.close()
  await waitFor(() => gateway.app.streamLimits.total === 0, 'the slot to be free')
  const again = await openStream(t, url, { ...subscriber(gateway), accept: 'text/event-stream' })
  await within(again.until(() => again.control.some((e) => e.event === 'gateway/open'), 'gateway/open'), 'the stream to open')
  t.pass('the same request, retried, opens the stream')
})

t.test('an address past MAX_STREAMS_PER_IP is told to retry too', async (t) => {
  const gateway = await startGateway(t, { MAX_STREAMS_PER_IP: '1', RETRY_MS: '500' })
  const url = streamUrl(gateway.baseUrl, ['per.address'])
  await openStream(t, url, subscriber(gateway))
  checkRetryLater(t, await eventSourceAnswer(t, url, subscriber(gateway)), 500, 429, /streams per client address/)
  await errorBody(t, await fetch(url, { headers: subscriber(gateway) }), 429)
})

t.test('while the gateway cannot LISTEN, a stream is told to retry', async (t) => {
  const gateway = await startGateway(t, { RETRY_MS: '500' })
  await gateway.app.listener.close()
  const url = streamUrl(gateway.baseUrl, ['no.listener'])
  checkRetryLater(t, await eventSourceAnswer(t, url, subscriber(gateway)), 500, 503, /cannot listen to the database/)
  await errorBody(t, await fetch(url, { headers: subscriber(gateway) }), 503)
  t.equal(gateway.app.streamLimits.total, 0, 'and holds no slot')
})

t.test('a bad request or a refused token stays final for EventSource', async (t) => {
  const gateway = await startGateway(t)
  const accept = { accept: 'text/event-stream' }
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['bad name']), { headers: { ...accept, ...subscriber(gateway) } }), 400)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a']), { headers: accept }), 401)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a']), { headers: { ...accept, ...subscriber(gateway, ['b']) } }), 403)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a'], { lastEventId: 'x' }), { headers: { ...accept, ...subscriber(gateway) } }), 400)
  t.equal(gateway.app.streamLimits.total, 0)
})
