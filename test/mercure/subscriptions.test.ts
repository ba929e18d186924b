import { createSigner } from 'fast-jwt'
import pg from 'pg'
import t from 'tap'
import { migrate } from '../../src/event-log.js'
import { MERCURE_DETAIL_TYPE } from '../../src/mercure/authorization.js'
import { ActiveSubscriptions } from '../../src/mercure/subscriptions.js'
import { connect, createDatabase, errorBody, JWT_SECRET, openStream, startGateway, type StreamClient, type Test, type TestGateway, waitFor, within } from '../helper.js'

// Mercure's active subscriptions: events and API, shared by every instance through the database.

const ENV = { MERCURE_SUBSCRIPTIONS: 'true', MERCURE_ANONYMOUS: 'true' }
const sign = createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 3600_000 })
const LEGACY_WATCHER = sign({ mercure: { subscribe: ['/.well-known/mercure/subscriptions{/topic}{/subscriber}', '/.well-known/mercure/subscriptions'] } })
const MODERN_WATCHER = createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 3600_000, header: { alg: 'HS256', typ: 'at+jwt' } })({
  authorization_details: [{ type: MERCURE_DETAIL_TYPE, actions: ['subscribe'], topics: [{ match: '/.well-known/mercure/subscriptions/*', match_type: 'urlpattern' }] }]
})

async function subscribe (t: Test, gateway: TestGateway, query: Array<[string, string]>, token?: string): Promise<StreamClient> {
  const url = new URL('/.well-known/mercure', gateway.baseUrl)
  for (const [name, value] of query) url.searchParams.append(name, value)
  return await openStream(t, url.toString(), token === undefined ? {} : { authorization: `Bearer ${token}` })
}

/** Waits for the subscription event of a selector, active or ended; returns it with its document. */
async function eventFor (stream: StreamClient, selector: string, active: boolean): Promise<{ event: string | undefined, document: Record<string, unknown> }> {
  const find = (): { event: string | undefined, document: Record<string, unknown> } | undefined => stream.events
    .map((e) => ({ event: e.event, document: JSON.parse(e.data) as Record<string, unknown> }))
    .find(({ document }) => (document.topic ?? document.match) === selector && document.active === active)
  await within(stream.until(() => find() !== undefined, `${selector} ${active ? 'created' : 'ended'}`), `the event of ${selector}`)
  return find() as { event: string | undefined, document: Record<string, unknown> }
}

async function api (gateway: TestGateway, path: string, token?: string): Promise<Response> {
  return await fetch(`${gateway.baseUrl}/.well-known/mercure/subscriptions${path}`, { headers: token === undefined ? {} : { authorization: `Bearer ${token}` } })
}

t.test('draft-07: subscription events and the API, across instances', async (t) => {
  const a = await startGateway(t, ENV)
  const b = await startGateway(t, ENV, a.databaseUrl)
  const watcher = await subscribe(t, a, [['topic', '/.well-known/mercure/subscriptions{/topic}{/subscriber}']], LEGACY_WATCHER)
  const anonymousWatcher = await subscribe(t, a, [['topic', '/.well-known/mercure/subscriptions{/topic}{/subscriber}']])
  const subscriber = await subscribe(t, b, [['topic', 'https://example.com/books/{id}']], sign({ mercure: { subscribe: [], payload: { user: 'u1' } } }))
  const { event, document } = await eventFor(watcher, 'https://example.com/books/{id}', true)
  t.match(document, { '@context': 'https://mercure.rocks/', type: 'Subscription', topic: 'https://example.com/books/{id}', active: true, payload: { user: 'u1' } })
  t.match(document.subscriber, /^urn:uuid:/, 'the hub names the subscriber')
  t.equal(document.id, `/.well-known/mercure/subscriptions/${encodeURIComponent('https://example.com/books/{id}')}/${encodeURIComponent(document.subscriber as string)}`)
  t.equal(event, undefined, 'a draft-07 event has no type')

  const res = await api(a, '', LEGACY_WATCHER)
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^application\/ld\+json/)
  const list = await res.json() as { type: string, lastEventID: string, subscriptions: Array<Record<string, unknown>> }
  t.equal(list.type, 'Subscriptions')
  t.match(list.lastEventID, /^urn:uuid:/)
  t.same(list.subscriptions.map((s) => s.topic).sort(), ['/.well-known/mercure/subscriptions{/topic}{/subscriber}', '/.well-known/mercure/subscriptions{/topic}{/subscriber}', 'https://example.com/books/{id}'], 'every instance\'s subscriptions')
  const single = await api(a, `/${encodeURIComponent('https://example.com/books/{id}')}/${encodeURIComponent(document.subscriber as string)}`, LEGACY_WATCHER)
  t.equal(single.status, 200)
  t.match(await single.json(), { topic: 'https://example.com/books/{id}', active: true, lastEventID: /./ })

  subscriber.close()
  await subscriber.done
  t.match((await eventFor(watcher, 'https://example.com/books/{id}', false)).document, { subscriber: document.subscriber }, 'its end is told')
  t.equal((await api(a, `/${encodeURIComponent('https://example.com/books/{id}')}/${encodeURIComponent(document.subscriber as string)}`, LEGACY_WATCHER)).status, 404, 'an ended subscription is gone')
  t.equal(anonymousWatcher.events.length, 0, 'subscription events are private')
})

t.test('Mercure 1.0: typed events and the API with its Link cursor', async (t) => {
  const gateway = await startGateway(t, ENV)
  const watcher = await subscribe(t, gateway, [['match_urlpattern', '/.well-known/mercure/subscriptions/:type/:match/:subscriber']], MODERN_WATCHER)
  await subscribe(t, gateway, [['match', 'https://example.com/a-topic']])
  const { event, document } = await eventFor(watcher, 'https://example.com/a-topic', true)
  t.equal(event, 'mercure', 'subscription events have the type mercure')
  t.match(document, { type: 'subscription', match_type: 'exact', match: 'https://example.com/a-topic', active: true })
  t.equal(document.id, `/.well-known/mercure/subscriptions/exact/${encodeURIComponent('https://example.com/a-topic')}/${encodeURIComponent(document.subscriber as string)}`)

  const res = await api(gateway, `/exact/${encodeURIComponent('https://example.com/a-topic')}`, MODERN_WATCHER)
  t.equal(res.status, 200)
  t.match(res.headers.get('content-type'), /^application\/json/)
  t.match(res.headers.get('link'), /rel="mercure"; last-event-id="urn:uuid:[^"]+"/)
  t.match(await res.json(), { type: 'subscriptions', subscriptions: [{ match: 'https://example.com/a-topic', match_type: 'exact', active: true }] })

  await errorBody(t, await api(gateway, ''), 401)
  await errorBody(t, await api(gateway, '', sign({ mercure: { subscribe: ['https://example.com/{x}'] } })), 403)
})

t.test('an instance that stops without a word is swept by the others: its subscriptions are told ended', async (t) => {
  const database = await createDatabase(t)
  const client = await connect(t, database)
  await migrate(client)
  const pool = new pg.Pool({ connectionString: database, max: 2 })
  t.teardown(() => pool.end())
  const errors: Error[] = []
  // The crashed one never beats again (an hour between beats); the live one beats every 20 ms.
  const crashed = new ActiveSubscriptions({ pool, hubPath: '/.well-known/mercure', heartbeatMs: 3_600_000, onError: (err) => errors.push(err) })
  await crashed.start()
  await crashed.add([{ subscriber: 'urn:uuid:gone', type: 'exact', match: 'https://example.com/x' }])
  await client.query("UPDATE sse_gateway.mercure_instances SET seen_at = now() - interval '1 minute' WHERE instance = $1", [crashed.instance])
  const live = new ActiveSubscriptions({ pool, hubPath: '/.well-known/mercure', heartbeatMs: 20, onError: (err) => errors.push(err) })
  await live.start()
  t.teardown(() => live.close())
  await waitFor(async () => (await live.list()).length === 0, 'the sweep')
  const { rows } = await client.query<{ payload: string }>("SELECT payload FROM sse_gateway.events WHERE channel = 'mercure/updates' ORDER BY id")
  const told = rows.map((r) => JSON.parse(JSON.parse(r.payload).data as string) as { subscriber: string, active: boolean })
  t.same(told.map((d) => [d.subscriber, d.active]), [['urn:uuid:gone', true], ['urn:uuid:gone', false]], 'created, then ended by the sweep')
  t.same((await client.query('SELECT instance FROM sse_gateway.mercure_instances')).rows, [{ instance: live.instance }], 'the stale instance is gone')
  t.same(errors, [])
})
