import t from 'tap'
import { errorBody, openStream, publish, type ReceivedEvent, startGateway, type StreamClient, streamUrl, subscriber, type Test, type TestGateway, within } from '../helper.js'

async function take (stream: StreamClient, n: number): Promise<ReceivedEvent[]> {
  return await within(stream.take(n), `${n} events`)
}

const publisher = (gateway: TestGateway, patterns: string[] = ['*']): string => gateway.token({ publish: patterns })

/** A stream on the channels, open before the test publishes. */
async function listen (t: Test, gateway: TestGateway, channels: string[]): Promise<StreamClient> {
  return await openStream(t, streamUrl(gateway.baseUrl, channels), subscriber(gateway))
}

async function postBatch (gateway: TestGateway, body: unknown, token: string | null = publisher(gateway)): Promise<Response> {
  const headers: Record<string, string> = { 'content-type': 'application/json' }
  if (token !== null) headers.authorization = `Bearer ${token}`
  return await fetch(`${gateway.baseUrl}/events`, { method: 'POST', headers, body: typeof body === 'string' ? body : JSON.stringify(body) })
}

async function created (t: Test, res: Response): Promise<Record<string, unknown>> {
  const body = await res.json() as Record<string, unknown>
  t.equal(res.status, 201, `answers 201 (${JSON.stringify(body)})`)
  t.match(res.headers.get('content-type'), /^application\/json/)
  return body
}

/** The events a client reads for payloads published on `channel` with these ids. */
const eventsOf = (channel: string, ids: unknown[], data: string[]): unknown[] => data.map((d, i) => ({ id: ids[i], event: channel, data: d }))

/**
 * Proves nothing was published on the stream's channel since it had `seen`
 * events: publishes a sentinel and checks that it is the next event.
 */
async function nothingPublished (t: Test, gateway: TestGateway, stream: StreamClient, channel: string, seen = 0): Promise<void> {
  const res = await publish(gateway, channel, `sentinel ${seen}`)
  t.equal(res.status, 201, 'the sentinel is published')
  const events = await take(stream, seen + 1)
  t.same(events.slice(seen).map((e) => e.data), [`sentinel ${seen}`], 'only the sentinel arrived: nothing was published')
}

t.test('a JSON body is published as the JSON text sent', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['orders'])
  const bodies = ['{ "a" : [1, 2],\r\n  "b": "ü" }\n', '"just a string"', '  42', 'null']
  const ids: unknown[] = []
  for (const body of bodies) {
    const res = await publish(gateway, 'orders', body, { contentType: 'application/json' })
    const answer = await created(t, res)
    t.same(Object.keys(answer).sort(), ['channel', 'id'])
    t.equal(answer.channel, 'orders')
    t.match(answer.id, /^[1-9][0-9]*$/, 'the id is a decimal string')
    ids.push(answer.id)
  }
  const res = await publish(gateway, 'orders', '{"charset":true}', { contentType: 'application/json; charset=utf-8' })
  ids.push((await created(t, res)).id)
  const events = await take(stream, bodies.length + 1)
  t.same(events, eventsOf('orders', ids, ['{ "a" : [1, 2],\n  "b": "ü" }\n', '"just a string"', '  42', 'null', '{"charset":true}']))
})

t.test('a text/plain body is published verbatim', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['notes'])
  const bodies = ['  leading spaces', 'not { json', 'crlf\r\nand lf\nand cr\r', 'ünïcödé ✓ 🚀', '']
  const ids: unknown[] = []
  for (const body of bodies) ids.push((await created(t, await publish(gateway, 'notes', body, { contentType: 'text/plain; charset=utf-8' }))).id)
  const events = await take(stream, bodies.length)
  t.same(events, eventsOf('notes', ids, ['  leading spaces', 'not { json', 'crlf\nand lf\nand cr\n', 'ünïcödé ✓ 🚀', '']))
})

t.test('invalid JSON is refused with 400 and nothing is published', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['orders'])
  for (const body of ['{"a":', "{'single': 1}", 'undefined', '']) {
    await errorBody(t, await publish(gateway, 'orders', body, { contentType: 'application/json' }), 400)
  }
  await nothingPublished(t, gateway, stream, 'orders')
})

t.test('a body of another media type is refused with 415 and nothing is published', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['orders'])
  for (const type of ['application/xml', 'application/octet-stream', 'application/x-www-form-urlencoded', 'text/html']) {
    await errorBody(t, await publish(gateway, 'orders', 'a=1', { contentType: type }), 415)
  }
  await nothingPublished(t, gateway, stream, 'orders')
})

t.test('a NUL character in a payload is refused with 400', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['orders'])
  await errorBody(t, await publish(gateway, 'orders', 'a\u0000b'), 400)
  await errorBody(t, await postBatch(gateway, { events: [{ channel: 'orders', data: 'fine' }, { channel: 'orders', data: 'a\u0000b' }] }), 400)
  await nothingPublished(t, gateway, stream, 'orders')
})

t.test('a body larger than MAX_PAYLOAD_BYTES is refused with 413', async (t) => {
  const gateway = await startGateway(t, { MAX_PAYLOAD_BYTES: '100' })
  const stream = await listen(t, gateway, ['big'])
  await errorBody(t, await publish(gateway, 'big', 'x'.repeat(101)), 413)
  await errorBody(t, await publish(gateway, 'big', JSON.stringify('x'.repeat(99)), { contentType: 'application/json' }), 413)
  await errorBody(t, await publish(gateway, 'big', '€'.repeat(34)), 413)
  await nothingPublished(t, gateway, stream, 'big')

  const fits = '€'.repeat(33) + 'x'
  t.equal(Buffer.byteLength(fits), 100)
  const id = (await created(t, await publish(gateway, 'big', fits))).id
  const events = await take(stream, 2)
  t.same(events[1], { id, event: 'big', data: fits }, 'exactly MAX_PAYLOAD_BYTES is published')
})

t.test('a payload beyond the NOTIFY limit is published whole', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['big'])
  const large = 'ü'.repeat(10000)
  t.equal(Buffer.byteLength(large), 20000)
  const id = (await created(t, await publish(gateway, 'big', large))).id
  const [event] = await take(stream, 1)
  t.equal(event?.id, id)
  t.ok(event?.data === large, 'the 20000-byte payload arrives complete')
})

t.test('an invalid channel name is refused with 400', async (t) => {
  const gateway = await startGateway(t)
  const invalid = ['x'.repeat(64), 'has space', 'ünï', 'a"b', 'a;b', 'a*', 'a/b', "it's"]
  for (const name of invalid) {
    await t.test(`channel ${JSON.stringify(name)}`, async (t) => {
      await errorBody(t, await publish(gateway, name, 'x'), 400)
      await errorBody(t, await postBatch(gateway, { events: [{ channel: name, data: 'x' }] }), 400)
    })
  }
  await errorBody(t, await postBatch(gateway, { events: [{ channel: '', data: 'x' }] }), 400)
  await errorBody(t, await publish(gateway, '', 'x'), 400)

  const longest = 'x'.repeat(63)
  const stream = await listen(t, gateway, [longest])
  const id = (await created(t, await publish(gateway, longest, 'long'))).id
  t.same(await take(stream, 1), [{ id, event: longest, data: 'long' }], 'a 63-byte name is fine')
})

t.test('channel names are case-sensitive', async (t) => {
  const gateway = await startGateway(t)
  const upper = await listen(t, gateway, ['Orders'])
  const lower = await listen(t, gateway, ['orders'])
  const res = await publish(gateway, 'Orders', 'to Orders')
  t.equal((await created(t, res)).channel, 'Orders')
  await publish(gateway, 'orders', 'to orders')
  t.same((await take(upper, 1)).map((e) => [e.event, e.data]), [['Orders', 'to Orders']])
  t.same((await take(lower, 1)).map((e) => [e.event, e.data]), [['orders', 'to orders']])
  await nothingPublished(t, gateway, upper, 'Orders', 1)
})

t.test('a batch is published in order, strings verbatim and other values as compact JSON', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['a', 'b'])
  const res = await postBatch(gateway, JSON.stringify({
    events: [
      { channel: 'a', data: 'a string' },
      { channel: 'b', data: { x: 1, nested: [1, 'two', null] } },
      { channel: 'a', data: 42 },
      { channel: 'b', data: null },
      { channel: 'a', data: true },
      { channel: 'b', data: '  spaced\r\nlines' },
      { channel: 'a', data: '' },
      { channel: 'b', data: '{"already": "json"}' }
    ]
  }, null, 2))
  const body = await created(t, res)
  t.same(Object.keys(body), ['ids'])
  const ids = body.ids as string[]
  t.equal(ids.length, 8)
  const events = await take(stream, 8)
  t.same(events, [
    { id: ids[0], event: 'a', data: 'a string' },
    { id: ids[1], event: 'b', data: '{"x":1,"nested":[1,"two",null]}' },
    { id: ids[2], event: 'a', data: '42' },
    { id: ids[3], event: 'b', data: 'null' },
    { id: ids[4], event: 'a', data: 'true' },
    { id: ids[5], event: 'b', data: '  spaced\nlines' },
    { id: ids[6], event: 'a', data: '' },
    { id: ids[7], event: 'b', data: '{"already": "json"}' }
  ])
})

t.test('identical events in one batch are all delivered', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['dup'])
  const events = Array.from({ length: 5 }, () => ({ channel: 'dup', data: 'same' }))
  const { ids } = await created(t, await postBatch(gateway, { events })) as { ids: string[] }
  t.equal(new Set(ids).size, 5, 'five distinct ids')
  t.same(await take(stream, 5), ids.map((id) => ({ id, event: 'dup', data: 'same' })))
  await nothingPublished(t, gateway, stream, 'dup', 5)
})

t.test('a batch with one bad event publishes nothing', async (t) => {
  const gateway = await startGateway(t, { MAX_PAYLOAD_BYTES: '100', MAX_BATCH_EVENTS: '3' })
  const stream = await listen(t, gateway, ['ok', 'other'])
  const good = { channel: 'ok', data: 'good' }
  const cases: Array<[string, unknown, number]> = [
    ['a bad channel name', { events: [good, { channel: 'bad name', data: 'x' }] }, 400],
    ['a channel name of 64 bytes', { events: [good, { channel: 'x'.repeat(64), data: 'x' }] }, 400],
    ['a payload too large', { events: [good, { channel: 'ok', data: 'x'.repeat(101) }] }, 413],
    ['a JSON value too large', { events: [good, { channel: 'ok', data: { big: 'x'.repeat(95) } }] }, 413],
    ['missing data', { events: [good, { channel: 'ok' }] }, 400],
    ['missing channel', { events: [good, { data: 'x' }] }, 400],
    ['a channel that is not a string', { events: [good, { channel: { name: 'ok' }, data: 'x' }] }, 400],
    ['too many events', { events: [good, good, good, good] }, 400],
    ['no events', { events: [] }, 400],
    ['no events array', { event: [good] }, 400],
    ['invalid JSON', '{"events": [', 400]
  ]
  for (const [what, body, status] of cases) {
    await t.test(what, async (t) => {
      await errorBody(t, await postBatch(gateway, body), status)
    })
  }
  const notAllowed = await postBatch(gateway, { events: [good, { channel: 'other', data: 'x' }] }, publisher(gateway, ['ok']))
  await errorBody(t, notAllowed, 403)
  await nothingPublished(t, gateway, stream, 'ok')
  t.equal(stream.events.filter((e) => e.event === 'other').length, 0, 'nothing on the other channel either')

  const { ids } = await created(t, await postBatch(gateway, { events: [good, good, { channel: 'other', data: 'x'.repeat(100) }] })) as { ids: string[] }
  t.equal(ids.length, 3, 'MAX_BATCH_EVENTS events of MAX_PAYLOAD_BYTES are fine')
})

t.test('publishing needs a token allowing every channel it writes', async (t) => {
  const gateway = await startGateway(t, { PUBLIC_CHANNELS: 'public.*' })
  const stream = await listen(t, gateway, ['orders.eu', 'chat', 'public.news'])
  const url = `${gateway.baseUrl}/channels/orders.eu`
  const post = async (headers: Record<string, string>): Promise<Response> =>
    await fetch(url, { method: 'POST', headers: { 'content-type': 'text/plain', ...headers }, body: 'x' })

  await t.test('no token', async (t) => errorBody(t, await post({}), 401))
  await t.test('not a token', async (t) => errorBody(t, await post({ authorization: 'Bearer not.a.token' }), 401))
  await t.test('not a bearer token', async (t) => errorBody(t, await post({ authorization: 'Basic dXNlcjpwYXNz' }), 401))
  await t.test('an empty bearer token', async (t) => errorBody(t, await post({ authorization: 'Bearer ' }), 401))
  await t.test('an expired token', async (t) => {
    const expired = gateway.token({ publish: ['*'] }, { expiresIn: -10 })
    const res = await post({ authorization: `Bearer ${expired}` })
    await errorBody(t, res.clone(), 401)
    t.match(await res.json(), { message: /expired/ }, 'the message says the token expired')
  })
  await t.test('a token signed with another secret', async (t) => {
    const stranger = await startGateway(t, { JWT_SECRET: 'another-secret-that-is-at-least-32-bytes' })
    await errorBody(t, await post({ authorization: `Bearer ${stranger.token({ publish: ['*'] })}` }), 401)
  })
  await t.test('a subscribe-only token', async (t) =>
    errorBody(t, await post({ authorization: `Bearer ${gateway.token({ subscribe: ['*'] })}` }), 403))
  await t.test('a token whose patterns miss the channel', async (t) =>
    errorBody(t, await post({ authorization: `Bearer ${publisher(gateway, ['orders.us', 'orders', 'chat'])}` }), 403))
  await t.test('a public channel still needs a token to publish', async (t) =>
    errorBody(t, await publish(gateway, 'public.news', 'x', { token: '' }), 401))
  await t.test('a batch with one channel the token does not cover', async (t) => {
    const token = publisher(gateway, ['orders.*'])
    await errorBody(t, await postBatch(gateway, { events: [{ channel: 'orders.eu', data: 'x' }, { channel: 'chat', data: 'x' }] }, token), 403)
    await errorBody(t, await postBatch(gateway, { events: [{ channel: 'orders.eu', data: 'x' }] }, null), 401)
  })
  await nothingPublished(t, gateway, stream, 'chat')

  const allowed = publisher(gateway, ['orders.*', 'chat'])
  const ids: unknown[] = []
  ids.push((await created(t, await post({ authorization: `Bearer ${allowed}` }))).id)
  ids.push((await created(t, await publish(gateway, 'chat', 'pattern chat', { token: allowed }))).id)
  const viaQuery = await fetch(`${url}?access_token=${allowed}`, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'via query' })
  ids.push((await created(t, viaQuery)).id)
  const events = await take(stream, 4)
  t.same(events.slice(1), [
    { id: ids[0], event: 'orders.eu', data: 'x' },
    { id: ids[1], event: 'chat', data: 'pattern chat' },
    { id: ids[2], event: 'orders.eu', data: 'via query' }
  ], 'a token whose patterns cover the channel publishes')
})

t.test('ids increase with every event published', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['seq'])
  const ids: bigint[] = []
  ids.push(BigInt((await created(t, await publish(gateway, 'seq', 'one'))).id as string))
  const { ids: batch } = await created(t, await postBatch(gateway, { events: [{ channel: 'seq', data: 'two' }, { channel: 'seq', data: 'three' }] })) as { ids: string[] }
  ids.push(...batch.map(BigInt))
  ids.push(BigInt((await created(t, await publish(gateway, 'seq', 'four'))).id as string))
  for (let i = 1; i < ids.length; i++) t.ok((ids[i] as bigint) > (ids[i - 1] as bigint), `id ${ids[i]} follows ${ids[i - 1]}`)
  const events = await take(stream, 4)
  t.same(events.map((e) => e.id), ids.map(String), 'the stream carries the same ids, in order')
})

t.test('concurrent publishes arrive in id order', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, ['race'])
  const answers = await Promise.all(Array.from({ length: 20 }, async (_, i) => await publish(gateway, 'race', `event ${i}`)))
  const ids = await Promise.all(answers.map(async (res) => (await created(t, res)).id as string))
  const events = await take(stream, 20)
  const arrived = events.map((e) => BigInt(e.id as string))
  t.same([...arrived].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)), arrived, 'ids increase in arrival order')
  t.same(new Set(events.map((e) => e.id)), new Set(ids), 'every answered id arrived')
  for (const e of events) t.equal(e.data, `event ${ids.indexOf(e.id as string)}`, `event ${e.id} carries its own payload`)
})
