import { createSigner } from 'fast-jwt'
import t from 'tap'
import { MERCURE_DETAIL_TYPE } from '../../src/mercure/authorization.js'
import { connect, errorBody, JWT_SECRET, openStream, type StreamClient, startGateway, type Test, type TestGateway, waitFor, waitForData, within } from '../helper.js'
import { rawExchange } from '../security-helper.js'

// The Mercure hub over HTTP, as Mercure's publishers and subscribers use it.

const ANONYMOUS = { MERCURE_ANONYMOUS: 'true' }

/** A draft-07 token (the `mercure` claim), signed with the gateway's secret. */
function legacyToken (claim: Record<string, unknown>, extra: Record<string, unknown> = {}): string {
  return createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 3600_000 })({ mercure: claim, ...extra })
}

/** A Mercure 1.0 access token (`typ: at+jwt`, authorization_details). */
function accessToken (details: Array<{ actions: string[], topics: Array<{ match: string, match_type?: string }> }>): string {
  return createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 3600_000, header: { alg: 'HS256', typ: 'at+jwt' } })({
    authorization_details: details.map((d) => ({ type: MERCURE_DETAIL_TYPE, ...d }))
  })
}

const PUBLISHER = legacyToken({ publish: ['*'] })

function hubUrl (gateway: TestGateway, query: Array<[string, string]> = []): string {
  const url = new URL('/.well-known/mercure', gateway.baseUrl)
  for (const [name, value] of query) url.searchParams.append(name, value)
  return url.toString()
}

async function post (gateway: TestGateway, fields: Array<[string, string]>, headers: Record<string, string> = { authorization: `Bearer ${PUBLISHER}` }): Promise<Response> {
  return await fetch(hubUrl(gateway), { method: 'POST', headers, body: new URLSearchParams(fields) })
}

/** Publishes an update; resolves with its id. Any answer but 200 throws. */
async function publishUpdate (gateway: TestGateway, fields: Array<[string, string]>): Promise<string> {
  const res = await post(gateway, fields)
  const body = await res.text()
  if (res.status !== 200) throw new Error(`publish answered ${res.status}: ${body}`)
  return body
}

async function subscribe (t: Test, gateway: TestGateway, query: Array<[string, string]>, headers: Record<string, string> = {}): Promise<StreamClient> {
  const stream = await openStream(t, hubUrl(gateway, query), { accept: 'text/event-stream', ...headers })
  t.equal(stream.response.status, 200, 'the stream opens')
  return stream
}

t.test('publish and subscribe with either generation\'s selectors; framed as Mercure frames', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const legacy = await subscribe(t, gateway, [['topic', 'https://example.com/books/{id}'], ['topic', 'other']])
  const modern = await subscribe(t, gateway, [['match_urlpattern', 'https://example.com/books/:id'], ['match', 'exact-topic']])
  t.match(legacy.response.headers.get('content-type'), /^text\/event-stream/)
  t.equal(legacy.response.headers.get('x-accel-buffering'), 'no')

  const res = await post(gateway, [['topic', 'https://example.com/books/1'], ['data', 'line 1\r\nline 2\rline 3\nline 4']])
  t.equal(res.status, 200, 'a publish answers 200')
  t.match(res.headers.get('content-type'), /^text\/plain/)
  const id = await res.text()
  t.match(id, /^urn:uuid:[0-9a-f-]{14}7/, 'the hub makes a UUIDv7 id')
  for (const stream of [legacy, modern]) {
    const [event] = await within(stream.take(1), 'the update')
    t.same(event, { id, event: undefined, data: 'line 1\nline 2\nline 3\nline 4' }, 'no event: line without a type; data split on CR, LF and CRLF')
  }
  await publishUpdate(gateway, [['topic', 'exact-topic'], ['data', 'typed'], ['type', 'greeting'], ['id', 'given-id'], ['retry', '4321']])
  const [, typed] = await within(modern.take(2), 'the typed update')
  t.same(typed, { id: 'given-id', event: 'greeting', data: 'typed' }, 'the publisher\'s id and type')
  t.equal(modern.retry, 4321, 'the update\'s retry')
  await publishUpdate(gateway, [['topic', 'other'], ['topic', 'https://example.com/authors/1'], ['data', 'alternate']])
  await waitForData(legacy, 'alternate')
  t.equal(modern.events.length, 2, 'a subscriber matching none of its topics gets nothing')
  t.same([...legacy.control, ...modern.control], [], 'no gateway/* event on a Mercure stream')
  t.same(legacy.comments, ['mercure'], 'a comment opens the stream')
})

t.test('private updates reach only subscribers whose token allows one of their topics', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const query: Array<[string, string]> = [['topic', 'https://example.com/books/{id}']]
  const anonymous = await subscribe(t, gateway, query)
  const reader = await subscribe(t, gateway, query, { authorization: `Bearer ${legacyToken({ subscribe: ['https://example.com/users/1/{+any}'] })}` })
  const modernReader = await subscribe(t, gateway, [['match_urlpattern', 'https://example.com/books/:id']], {
    authorization: `Bearer ${accessToken([{ actions: ['subscribe'], topics: [{ match: 'https://example.com/books/1' }] }])}`
  })
  const other = await subscribe(t, gateway, query, { authorization: `Bearer ${legacyToken({ subscribe: ['https://example.com/users/2/{+any}'] })}` })

  await publishUpdate(gateway, [['topic', 'https://example.com/books/1'], ['topic', 'https://example.com/users/1/books/1'], ['private', 'on'], ['data', 'secret']])
  await publishUpdate(gateway, [['topic', 'https://example.com/books/1'], ['data', 'public']])
  await waitForData(reader, 'secret')
  await waitForData(modernReader, 'secret')
  for (const stream of [anonymous, other, reader, modernReader]) await waitForData(stream, 'public')
  t.same(anonymous.events.map((e) => e.data), ['public'], 'an anonymous subscriber gets public updates only')
  t.same(other.events.map((e) => e.data), ['public'], 'nor does a token for other topics')
  t.same(reader.events.map((e) => e.data), ['secret', 'public'], 'a token allowing an alternate topic reads it')
})

t.test('subscribing: anonymous only when allowed; 400 for what Mercure refuses', async (t) => {
  const closed = await startGateway(t)
  const res = await fetch(hubUrl(closed, [['topic', 'x']]))
  await errorBody(t, res, 401)
  t.equal(res.headers.get('www-authenticate'), 'Bearer', 'a bare challenge without a token')
  const bad = await fetch(hubUrl(closed, [['topic', 'x']]), { headers: { authorization: 'Bearer not.a.token' } })
  await errorBody(t, bad, 401)
  t.equal(bad.headers.get('www-authenticate'), 'Bearer error="invalid_token"')

  const open = await startGateway(t, ANONYMOUS)
  const refused: Array<[string, Array<[string, string]>]> = [
    ['no selector', [['other', 'x']]],
    ['a matcher type the hub does not know', [['match_uritemplate', 'x']]],
    ['a misspelt matcher', [['Match', 'x']]],
    ['an invalid URL pattern', [['match_urlpattern', 'https://e/:id(']]],
    ['a control character', [['match', 'a\u0001b']]]
  ]
  for (const [what, query] of refused) {
    t.comment(what)
    await errorBody(t, await fetch(hubUrl(open, query)), 400)
  }
  await errorBody(t, await fetch(`${open.baseUrl}/events?channel=${encodeURIComponent('mercure/updates')}`), 400)
})

t.test('publishing: 401 without a valid token, 403 for a topic it may not publish, 400 for a bad update', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const none = await post(gateway, [['topic', 'x']], {})
  await errorBody(t, none, 401)
  t.equal(none.headers.get('www-authenticate'), 'Bearer')
  const invalid = await post(gateway, [['topic', 'x']], { authorization: 'Bearer nope' })
  await errorBody(t, invalid, 401)
  t.equal(invalid.headers.get('www-authenticate'), 'Bearer error="invalid_token"')
  const subscriberOnly = legacyToken({ subscribe: ['*'] })
  const forbidden = await post(gateway, [['topic', 'x']], { authorization: `Bearer ${subscriberOnly}` })
  await errorBody(t, forbidden, 403)
  t.equal(forbidden.headers.get('www-authenticate'), 'Bearer error="insufficient_scope"')
  const narrow = accessToken([{ actions: ['publish'], topics: [{ match: 'https://e/:id', match_type: 'urlpattern' }] }])
  t.equal((await post(gateway, [['topic', 'https://e/1']], { authorization: `Bearer ${narrow}` })).status, 200)
  await errorBody(t, await post(gateway, [['topic', 'https://e/1'], ['topic', 'https://other/1']], { authorization: `Bearer ${narrow}` }), 403)
  for (const fields of [[['data', 'no topic']], [['topic', 'x'], ['type', 'mercure']], [['topic', '/.well-known/mercure/subscriptions/a/b']], [['topic', 'x'], ['retry', 'soon']]] as Array<Array<[string, string]>>) {
    await errorBody(t, await post(gateway, fields), 400)
  }
  const json = await fetch(hubUrl(gateway), { method: 'POST', headers: { authorization: `Bearer ${PUBLISHER}`, 'content-type': 'application/json' }, body: '{"topic":"x"}' })
  await errorBody(t, json, 415)
  const noExp = createSigner({ key: JWT_SECRET, algorithm: 'HS256' })({ mercure: { publish: ['*'] } })
  await errorBody(t, await post(gateway, [['topic', 'x']], { authorization: `Bearer ${noExp}` }), 401)
  const lenient = await startGateway(t, { JWT_REQUIRE_EXP: 'false' })
  t.equal((await post(lenient, [['topic', 'x']], { authorization: `Bearer ${noExp}` })).status, 200, 'a token without exp, when JWT_REQUIRE_EXP=false')
})

t.test('tokens in cookies (either generation\'s name) and in the authorization parameter', async (t) => {
  const gateway = await startGateway(t)
  const reader = legacyToken({ subscribe: ['secret-topic'] })
  const viaLegacyCookie = await subscribe(t, gateway, [['topic', 'secret-topic']], { cookie: `mercureAuthorization=${reader}` })
  const viaModernCookie = await subscribe(t, gateway, [['match', 'secret-topic']], { cookie: `__Secure-mercure_access_token=${accessToken([{ actions: ['subscribe'], topics: [{ match: 'secret-topic' }] }])}` })
  const viaQuery = await subscribe(t, gateway, [['topic', 'secret-topic'], ['authorization', reader]])
  await publishUpdate(gateway, [['topic', 'secret-topic'], ['private', ''], ['data', 'for cookie holders']])
  for (const stream of [viaLegacyCookie, viaModernCookie, viaQuery]) await waitForData(stream, 'for cookie holders')

  const cookie = `mercureAuthorization=${PUBLISHER}`
  await errorBody(t, await post(gateway, [['topic', 'x']], { cookie }), 403)
  t.equal((await post(gateway, [['topic', 'x']], { cookie, origin: gateway.baseUrl })).status, 200, 'a cookie publishes from the gateway\'s own origin')
  await errorBody(t, await post(gateway, [['topic', 'x']], { cookie, origin: 'https://evil.example' }), 403)
})

t.test('resuming: Last-Event-ID and both query parameters, earliest, unknown ids, repeated ids', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const query: Array<[string, string]> = [['topic', 'news']]
  const first = await publishUpdate(gateway, [['topic', 'news'], ['data', 'one'], ['id', 'first']])
  await publishUpdate(gateway, [['topic', 'elsewhere'], ['data', 'skip']])
  await publishUpdate(gateway, [['topic', 'news'], ['data', 'two'], ['id', 'repeated']])
  await publishUpdate(gateway, [['topic', 'news'], ['data', 'three']])
  await publishUpdate(gateway, [['topic', 'news'], ['data', 'four'], ['id', 'repeated']])
  const data = (stream: StreamClient): string[] => stream.events.map((e) => e.data)

  for (const [how, extraQuery, headers] of [
    ['Last-Event-ID', [], { 'last-event-id': first }],
    ['lastEventID', [['lastEventID', first]], {}],
    ['last_event_id', [['last_event_id', first]], {}],
    ['the header over the parameter', [['lastEventID', 'repeated']], { 'last-event-id': first }]
  ] as Array<[string, Array<[string, string]>, Record<string, string>]>) {
    const stream = await subscribe(t, gateway, [...query, ...extraQuery], headers)
    await within(stream.take(3), how)
    t.same(data(stream), ['two', 'three', 'four'], `${how}: what came after, in order`)
    t.equal(stream.response.headers.get('last-event-id'), first, `${how}: Last-Event-ID says where it starts`)
    t.equal(stream.response.headers.get('mercure-last-event-id'), first)
  }
  const repeated = await subscribe(t, gateway, query, { 'last-event-id': 'repeated' })
  await within(repeated.take(2), 'after the first use of a repeated id')
  t.same(data(repeated), ['three', 'four'], 'a repeated id resumes from its earliest use')

  const earliest = await subscribe(t, gateway, [...query, ['lastEventID', 'earliest']])
  await within(earliest.take(4), 'everything')
  t.same(data(earliest), ['one', 'two', 'three', 'four'])
  t.equal(earliest.response.headers.get('mercure-last-event-id'), 'earliest')

  const unknown = await subscribe(t, gateway, query, { 'last-event-id': 'never-published' })
  t.equal(unknown.response.headers.get('last-event-id'), 'earliest', 'an id the log does not hold: live from now on')
  await publishUpdate(gateway, [['topic', 'news'], ['data', 'five']])
  await waitForData(unknown, 'five')
  t.same(data(unknown), ['five'])
  const fresh = await subscribe(t, gateway, query)
  t.equal(fresh.response.headers.get('mercure-last-event-id'), null, 'no header when nothing was asked')

  // 3,000 bytes of UTF-8, more than a B-tree index entry holds; a browser
  // sends Last-Event-ID as UTF-8 bytes.
  const long = await publishUpdate(gateway, [['topic', 'news'], ['data', 'six'], ['id', '✓'.repeat(1000)]])
  await publishUpdate(gateway, [['topic', 'news'], ['data', 'seven']])
  const afterLong = await subscribe(t, gateway, query, { 'last-event-id': Buffer.from(long).toString('latin1') })
  await waitForData(afterLong, 'seven')
  t.same(data(afterLong), ['seven'], 'a long id in UTF-8 resumes too')
  t.equal(Buffer.from(afterLong.response.headers.get('mercure-last-event-id') ?? '', 'latin1').toString(), long, 'and is said back in UTF-8')
})

t.test('several instances on one database: publish on one, subscribe and resume on another', async (t) => {
  const a = await startGateway(t, ANONYMOUS)
  const b = await startGateway(t, ANONYMOUS, a.databaseUrl)
  const onA = await subscribe(t, a, [['match', 'shared']])
  const id = await publishUpdate(b, [['topic', 'shared'], ['data', 'from b']])
  await waitForData(onA, 'from b')
  await publishUpdate(a, [['topic', 'shared'], ['data', 'from a']])
  const resumedOnB = await subscribe(t, b, [['match', 'shared']], { 'last-event-id': id })
  await waitForData(resumedOnB, 'from a')
  t.same(resumedOnB.events.map((e) => e.data), ['from a'], 'an id seen on one instance resumes on another')
})

t.test('sse_gateway.mercure_publish: in the caller\'s transaction, delivered on commit, dropped on rollback', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const db = await connect(t, gateway.databaseUrl)
  const stream = await subscribe(t, gateway, [['topic', 'https://example.com/orders/{id}']])
  await db.query('BEGIN')
  const { rows } = await db.query<{ id: string }>("SELECT sse_gateway.mercure_publish(ARRAY['https://example.com/orders/7'], 'rolled back') AS id")
  t.match(rows[0]?.id, /^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-7/, 'a UUIDv7 id made in SQL')
  await db.query('ROLLBACK')
  await db.query('BEGIN')
  await db.query("SELECT sse_gateway.mercure_publish(ARRAY['https://example.com/orders/8', 'alt'], E'committed\\nline', private => false, id => 'order-8', type => 'order', retry => 900)")
  await db.query('COMMIT')
  const [event] = await within(stream.take(1), 'the committed update')
  t.same(event, { id: 'order-8', event: 'order', data: 'committed\nline' }, 'the one committed, as published')
  t.equal(stream.retry, 900)
  await publishUpdate(gateway, [['topic', 'https://example.com/orders/9'], ['data', 'after']])
  await waitForData(stream, 'after')
  t.notOk(stream.events.some((e) => e.data === 'rolled back'), 'the rolled back one never arrives')
  await t.rejects(db.query("SELECT sse_gateway.mercure_publish(ARRAY['x'], type => 'mercure')"), { code: '22023' })
})

t.test('a stream ends when its token expires, without a gateway event; a full gateway says retry in a comment', async (t) => {
  const gateway = await startGateway(t, { MAX_STREAMS: '1', RETRY_MS: '100' })
  const short = createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 1500 })({ mercure: { subscribe: ['*'] } })
  const stream = await subscribe(t, gateway, [['topic', '*']], { authorization: `Bearer ${short}` })
  const refused = await fetch(hubUrl(gateway, [['topic', '*']]), { headers: { accept: 'text/event-stream', authorization: `Bearer ${short}` } })
  t.equal(refused.status, 200, 'an EventSource is told to come back, not refused')
  const body = await refused.text()
  t.match(body, /^retry: \d+\n\n: .+\n\n$/, 'with a retry and a comment only')
  t.notMatch(body, /gateway\//)
  await within(stream.done, 'the stream to end at exp', 6000)
  t.same(stream.control, [], 'it ends without a word')
})

t.test('Mercure stream requests pipelined on one connection take nothing: the connection is closed', async (t) => {
  const gateway = await startGateway(t, ANONYMOUS)
  const request = 'GET /.well-known/mercure?topic=x HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n'
  const started = Date.now()
  await rawExchange(gateway.baseUrl, request.repeat(100), 10_000)
  t.ok(Date.now() - started < 5000, 'the gateway closed the connection, rather than leave it to the client')
  const { app } = gateway
  await waitFor(() => app.streamLimits.total === 0 && app.streams.size === 0 && app.hub.channelCount === 0, 'nothing held')
  t.equal(app.streamLimits.count('127.0.0.1'), 0, 'the address has its whole share')
  const stream = await subscribe(t, gateway, [['topic', 'x']])
  await publishUpdate(gateway, [['topic', 'x'], ['data', 'still serving']])
  await waitForData(stream, 'still serving')
})

t.test('heartbeats are comments; CORS with credentials for the listed origins only', async (t) => {
  const gateway = await startGateway(t, { ...ANONYMOUS, HEARTBEAT_MS: '50', CORS_ORIGINS: 'https://app.example' })
  const listed = await subscribe(t, gateway, [['topic', 'x'], ['lastEventID', 'earliest']], { origin: 'https://app.example' })
  await within(listed.until(() => listed.comments.includes('heartbeat'), 'a heartbeat'), 'a heartbeat')
  t.equal(listed.response.headers.get('access-control-allow-origin'), 'https://app.example')
  t.equal(listed.response.headers.get('access-control-allow-credentials'), 'true')
  t.match(listed.response.headers.get('access-control-expose-headers'), /Mercure-Last-Event-ID/, 'a page may read where its stream starts')
  t.match(listed.response.headers.get('cache-control'), /no-store/)
  const other = await subscribe(t, gateway, [['topic', 'x']], { origin: 'https://evil.example' })
  t.equal(other.response.headers.get('access-control-allow-origin'), null, 'no CORS for another origin')
})
