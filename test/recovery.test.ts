// Failures of the listener connection, and of the server itself, proved
// through real streams on a real PostgreSQL: nothing committed is lost,
// nothing arrives twice, and the gateway recovers by itself.
import { chmod, mkdtemp, rm } from 'node:fs/promises'
import os from 'node:os'
import path from 'node:path'
import pg from 'pg'
import t from 'tap'
import { type EmbeddedDatabase, startEmbeddedPostgres } from '../src/embedded-postgres.js'
import { FORK_ID_GAP, pruneLog } from '../src/event-log.js'
import { type ConnectedInfo, LISTENER_APPLICATION_NAME, type ListenerConnection } from '../src/listener.js'
import { startProxy } from './tcp-proxy.js'
import { connect, createDatabase, openStream, published, publishedWithSql, type ReceivedEvent, readyStatus, setLastDrawnId, startGateway, type StreamClient, streamUrl, subscriber, type Test, type TestGateway, waitFor, waitForData, within } from './helper.js'

/** Publishes with SQL on `db`, bypassing the gateway; returns the id. */
async function publishSql (db: pg.Client, channel: string, payload: string): Promise<string> {
  return await publishedWithSql(db, channel, payload)
}

const gaps = (stream: StreamClient): ReceivedEvent[] => stream.control.filter((e) => e.event === 'gateway/gap')
const opens = (stream: StreamClient): ReceivedEvent[] => stream.control.filter((e) => e.event === 'gateway/open')

/** Ids only grow, one event per id. */
function strictlyIncreasing (ids: Array<string | undefined>): boolean {
  return ids.every((id, i) => i === 0 || Number(id) > Number(ids[i - 1]))
}

// events.once() would reject on the listener's 'error' events (a failed
// reconnect attempt is one), which are part of recovering.
function nextConnected (listener: ListenerConnection): Promise<ConnectedInfo> {
  return new Promise<ConnectedInfo>((resolve) => listener.once('connected', resolve))
}

function nextDisconnected (listener: ListenerConnection): Promise<number> {
  return new Promise<number>((resolve) => listener.once('disconnected', () => resolve(Date.now())))
}

interface Backend {
  pid: number
  clientPort: number
}

/** The listener's backends on the database `db` is connected to. */
async function listenerBackends (db: pg.Client): Promise<Backend[]> {
  const { rows } = await db.query<{ pid: number, client_port: number }>(
    'SELECT pid, client_port FROM pg_stat_activity WHERE datname = current_database() AND application_name = $1',
    [LISTENER_APPLICATION_NAME])
  return rows.map((r) => ({ pid: r.pid, clientPort: r.client_port }))
}

async function theListenerBackend (db: pg.Client): Promise<Backend> {
  const backends = await listenerBackends(db)
  if (backends.length !== 1) throw new Error(`expected one listener backend, found ${backends.length}`)
  return backends[0] as Backend
}

t.test('a NOTIFY forged to look like a logged event silences nothing: it arrives as text, and real events go on', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  // A role that may not read the log, as a trigger relaying user text would run.
  const role = `forger_${process.pid}_${Date.now()}`
  await db.query(`CREATE ROLE ${role} LOGIN PASSWORD 'forger'`)
  t.teardown(async () => { await db.query(`DROP ROLE IF EXISTS ${role}`) })
  const url = new URL(gateway.databaseUrl)
  url.username = role
  url.password = 'forger'
  const forger = await connect(t, url.toString())
  await t.rejects(forger.query('SELECT key FROM sse_gateway.wire_key'), { code: '42501' }, 'the forger cannot read the wire key')

  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['a', 'b']), subscriber(gateway))
  await forger.query("SELECT pg_notify('a', E'\\x1f900000000000\\nhello')")
  await forger.query("SELECT pg_notify('a', E'\\x1f900000000001:0123456789abcdef0123456789abcdef\\nhello')")
  const id = await published(gateway, 'b', 'x')
  await waitForData(stream, 'x')
  t.same(stream.events, [
    { id: undefined, event: 'a', data: '\x1f900000000000\nhello' },
    { id: undefined, event: 'a', data: '\x1f900000000001:0123456789abcdef0123456789abcdef\nhello' },
    { id, event: 'b', data: 'x' }
  ], 'the forgeries as text without an id, then the real event with its id')
  t.equal(gateway.app.listener.position, Number(id), 'the listener\'s position is the real event\'s')
})

t.test('a listener backend killed mid-stream loses no event and delivers none twice', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway))
  const killed = await theListenerBackend(db)
  const reconnected = nextConnected(gateway.app.listener)

  const TOTAL = 200
  const ids: string[] = []
  const publishing = (async () => {
    for (let i = 0; i < TOTAL; i++) ids.push(await published(gateway, 'orders', `event ${i}`))
  })()
  publishing.catch(() => {})

  // Ids then cross from two digits to three while the listener is away.
  await within(stream.until(() => stream.events.length >= 95, '95 events'), '95 events before the kill')
  const { rows } = await db.query<{ done: boolean }>('SELECT pg_terminate_backend($1) AS done', [killed.pid])
  const publishedAtKill = ids.length
  t.equal(rows[0]?.done, true, 'the listener backend was terminated')
  await within(publishing, `${TOTAL} publishes`, 30_000)
  t.ok(publishedAtKill < TOTAL, `the kill came while events were still being published (${publishedAtKill} of ${TOTAL} done)`)

  const info = await within(reconnected, 'the listener to reconnect', 10_000)
  t.equal(info.reconnected, true, 'the listener reconnected')
  t.comment(`caught up from the log: ${info.caughtUp}`)

  const sentinel = await published(gateway, 'orders', 'sentinel')
  await waitForData(stream, 'sentinel')
  const expected = [...ids, sentinel]
  t.ok(strictlyIncreasing(expected), 'publish ids grow')
  t.same(stream.events.map((e) => e.id), expected, 'every committed event exactly once, in id order')
  t.same(stream.events.map((e) => e.data), [...ids.map((_id, i) => `event ${i}`), 'sentinel'], 'with its payload')
  t.notOk(stream.ended, 'the stream stayed open')
  t.equal(opens(stream).length, 1, 'on the same response: one gateway/open')
  t.equal(gaps(stream).length, 1, 'the stream was told of the gap')

  const now = await theListenerBackend(db)
  t.not(now.pid, killed.pid, 'a new listener backend')
  await waitFor(async () => await readyStatus(gateway) === 200, '/readyz to answer 200')
  t.equal(await readyStatus(gateway), 200, '/readyz answers 200 again')
})

t.test('a half-open listener connection is noticed within the liveness timeout and nothing is lost', async (t) => {
  const INTERVAL = 200
  const TIMEOUT = 500
  const database = await createDatabase(t)
  const { proxy, url } = await startProxy(t, database)
  const gateway = await startGateway(t, {
    LISTENER_LIVENESS_INTERVAL_MS: String(INTERVAL),
    LISTENER_LIVENESS_TIMEOUT_MS: String(TIMEOUT),
    LISTENER_RECONNECT_MAX_MS: '200'
  }, url)
  const { listener } = gateway.app
  // Straight to PostgreSQL, not through the proxy.
  const db = await connect(t, database)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway))

  const before = [await publishSql(db, 'orders', 'before')]
  await waitForData(stream, 'before')

  const backend = await theListenerBackend(db)
  let disconnectedAt = 0
  const disconnected = nextDisconnected(listener).then((at) => { disconnectedAt = at })
  const reconnected = nextConnected(listener)

  const frozenAt = Date.now()
  const frozen = proxy.freezeByUpstreamPort(backend.clientPort)
  const pairsAtFreeze = proxy.pairs.length
  const during: string[] = []
  for (let i = 0; i < 20; i++) during.push(await publishSql(db, 'orders', `during ${i}`))
  t.equal(disconnectedAt, 0, 'the events were committed while the gateway still held the silent connection')

  await within(disconnected, 'the gateway to notice the silent connection', INTERVAL + TIMEOUT + 2000)
  const noticedIn = disconnectedAt - frozenAt
  t.ok(noticedIn <= INTERVAL + TIMEOUT + 500, `noticed in ${noticedIn} ms: within one liveness interval plus its timeout`)
  t.ok(frozen.dropped > 0, 'the gateway did talk on the silent connection')

  const info = await within(reconnected, 'the listener to reconnect', 5000)
  t.equal(info.reconnected, true)
  t.ok(proxy.pairs.length > pairsAtFreeze, 'the listener reconnected through a new proxied connection')
  // The server never heard of the loss: left alone, the silent backend would
  // linger for the kernel's retransmission timeout, pinning the NOTIFY queue.
  await waitFor(async () => !(await listenerBackends(db)).some((b) => b.pid === backend.pid), 'the silent backend to be ended')
  const pids = (await listenerBackends(db)).map((b) => b.pid)
  t.notOk(pids.includes(backend.pid), 'the gateway ended the silent backend once reconnected')
  t.equal(pids.length, 1, 'and a new listener backend serves the gateway')

  const after: string[] = []
  for (let i = 0; i < 5; i++) after.push(await publishSql(db, 'orders', `after ${i}`))
  const sentinel = await publishSql(db, 'orders', 'sentinel')
  await waitForData(stream, 'sentinel')

  const expected = [...before, ...during, ...after, sentinel]
  t.ok(strictlyIncreasing(expected), 'publish ids grow')
  t.same(stream.events.map((e) => e.id), expected, 'every event once, in id order')
  t.same(stream.events.map((e) => e.data), ['before', ...during.map((_id, i) => `during ${i}`), ...after.map((_id, i) => `after ${i}`), 'sentinel'])
  t.notOk(stream.ended, 'the stream stayed open')
  t.equal(opens(stream).length, 1, 'on the same response')
  t.equal(gaps(stream).length, 1, 'the stream was told of the gap')
  await waitFor(async () => await readyStatus(gateway) === 200, '/readyz to answer 200')
})

/**
 * A gateway whose listener can be cut off from the database and kept off
 * (through a proxy that goes silent on its connection and refuses new
 * ones), with a stream open on `orders` and a direct connection `db`.
 */
async function partitionableGateway (t: Test): Promise<{ gateway: TestGateway, database: string, db: pg.Client, stream: StreamClient, cut (): Promise<void>, heal (): Promise<void> }> {
  const database = await createDatabase(t)
  const { proxy, url } = await startProxy(t, database)
  const gateway = await startGateway(t, {
    LISTENER_LIVENESS_INTERVAL_MS: '200',
    LISTENER_LIVENESS_TIMEOUT_MS: '500',
    LISTENER_RECONNECT_MAX_MS: '200'
  }, url)
  const { listener } = gateway.app
  const db = await connect(t, database)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway))
  return {
    gateway,
    database,
    db,
    stream,
    async cut () {
      const disconnected = nextDisconnected(listener)
      proxy.refuseNew = true
      proxy.freezeByUpstreamPort((await theListenerBackend(db)).clientPort)
      await within(disconnected, 'the listener to notice the silent connection')
    },
    async heal () {
      const reconnected = nextConnected(listener)
      proxy.refuseNew = false
      await within(reconnected, 'the listener to come back')
    }
  }
}

const missedData = (stream: StreamClient): unknown[] => stream.control.filter((e) => e.event === 'gateway/missed').map((e) => JSON.parse(e.data))

t.test('a listener outage longer than retention: streams are told exactly what was pruned unread, then get the rest', async (t) => {
  const { database, db, stream, cut, heal } = await partitionableGateway(t)
  const pool = new pg.Pool({ connectionString: database, max: 2 })
  t.teardown(() => pool.end())
  const before = await publishSql(db, 'orders', 'before')
  await waitForData(stream, 'before')

  // The listener is away, and cannot come back until the log is pruned.
  await cut()
  const { rows } = await db.query<{ ids: string[] }>(
    "SELECT sse_gateway.publish_batch_now(array_fill('orders'::text, ARRAY[30]), ARRAY(SELECT 'during ' || i FROM generate_series(0, 29) AS i))::text[] AS ids")
  const during = rows[0]?.ids ?? []
  await pruneLog(pool, { maxAgeSeconds: 86_400, maxEvents: 5, idempotencyWindowSeconds: 60 })
  const kept = during.slice(-5)
  await heal()
  await waitForData(stream, 'during 29')

  t.same(stream.events.map((e) => e.id), [before, ...kept], 'the events still in the log, once each, in order')
  t.same(missedData(stream), [{ lastEventId: before, resumedAfter: String(Number(kept[0]) - 1) }], 'told once what was lost: from its last id to where the log resumes')
  t.notOk(stream.ended, 'the stream stayed open')
})

// What a lossy promotion leaves (test/failover.test.ts does one with real
// clusters): the last events are gone and the head is back before them.
async function loseEventsAfter (db: pg.Client, id: string): Promise<void> {
  await db.query('DELETE FROM sse_gateway.events WHERE id > $1', [id])
  await setLastDrawnId(db, id)
}

t.test('a log that lost events the listener delivered: streams are told, rewound, and get the reissued ids', async (t) => {
  const { gateway, db, stream, cut, heal } = await partitionableGateway(t)
  const kept = await publishSql(db, 'orders', 'kept')
  const lost = [await publishSql(db, 'orders', 'lost 1'), await publishSql(db, 'orders', 'lost 2')]
  await waitForData(stream, 'lost 2')

  await cut()
  await loseEventsAfter(db, kept)
  await heal()
  // Published after the listener is back: the same ids again.
  const reissued = [await publishSql(db, 'orders', 'new 1'), await publishSql(db, 'orders', 'new 2')]
  t.same(reissued, lost, 'the log drew the lost ids again')
  await waitForData(stream, 'new 2')

  t.same(stream.events.map((e) => [e.id, e.data]), [[kept, 'kept'], [lost[0], 'lost 1'], [lost[1], 'lost 2'], [reissued[0], 'new 1'], [reissued[1], 'new 2']],
    'the new events reach the stream, though their ids were carried before')
  t.same(missedData(stream), [{ lastEventId: lost[1], resumedAfter: kept }], 'told that the log went back to the last event it kept')
  t.equal(gateway.app.listener.position, Number(reissued[1]), 'the listener follows the log again')
})

t.test('a fork recorded by the log: a running stream and a client resuming with a lost id are both told, and lose nothing after', async (t) => {
  const { gateway, db, stream, cut, heal } = await partitionableGateway(t)
  const kept = await publishSql(db, 'orders', 'kept')
  const lost = await publishSql(db, 'orders', 'lost')
  await waitForData(stream, 'lost')

  await cut()
  await loseEventsAfter(db, kept)
  // The next publish finds the log on another timeline than its last one,
  // as after a promotion, and leaves a hole over the ids the old one drew.
  await db.query("SELECT setval('sse_gateway.log_timeline', 0)")
  const after = await publishSql(db, 'orders', 'after')
  const { rows: forks } = await db.query<{ fork_id: string, resumed_after: string }>('SELECT fork_id::text, resumed_after::text FROM sse_gateway.log_forks')
  t.same(forks, [{ fork_id: kept, resumed_after: String(Number(kept) + FORK_ID_GAP) }], 'the fork is recorded')
  t.equal(after, String(Number(kept) + FORK_ID_GAP + 1), 'the next id is drawn past the hole')
  await heal()
  await waitForData(stream, 'after')
  t.same(stream.events.map((e) => e.data), ['kept', 'lost', 'after'], 'the running stream gets the new event')
  t.same(missedData(stream), [{ lastEventId: lost, resumedAfter: kept }], 'and is told')

  const resumed = await openStream(t, streamUrl(gateway.baseUrl, ['orders']), { ...subscriber(gateway), 'last-event-id': lost })
  await waitForData(resumed, 'after')
  t.same(missedData(resumed), [{ lastEventId: lost, resumedAfter: kept }], 'a client resuming with the lost id is told too')
  t.same(resumed.events.map((e) => e.data), ['after'], 'and gets every event after the fork')
})

t.test('a PostgreSQL restart under open streams is recovered from by itself', { timeout: 120_000 }, async (t) => {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'pg-sse-recovery-'))
  // As root, PostgreSQL runs as the postgres user, which must reach its data.
  await chmod(dir, 0o755)
  const dataDir = path.join(dir, 'data')
  const log = (line: string): void => t.comment(line)
  let server: EmbeddedDatabase = await startEmbeddedPostgres(dataDir, log)
  t.teardown(async () => {
    await server.stop()
    await rm(dir, { recursive: true, force: true })
  })
  const port = Number(new URL(server.connectionString).port)

  const gateway = await startGateway(t, {
    LISTENER_LIVENESS_INTERVAL_MS: '200',
    LISTENER_LIVENESS_TIMEOUT_MS: '1000',
    LISTENER_RECONNECT_MAX_MS: '300'
  }, server.connectionString)
  const { listener } = gateway.app
  const streams = await Promise.all([
    openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway)),
    openStream(t, streamUrl(gateway.baseUrl, ['orders', 'other']), subscriber(gateway))
  ])
  const first = await published(gateway, 'orders', 'before the restart')
  for (const stream of streams) await waitForData(stream, 'before the restart')

  const disconnected = nextDisconnected(listener)
  await within(server.stop(), 'the server to stop', 30_000)
  await within(disconnected, 'the listener to see the server go', 5000)
  t.not(await readyStatus(gateway), 200, '/readyz is not 200 while the server is down')
  for (const stream of streams) t.notOk(stream.ended, 'the stream stays open while the server is down')

  const reconnected = nextConnected(listener)
  server = await within(startEmbeddedPostgres(dataDir, log, port), 'the server to start again', 60_000)
  t.equal(server.connectionString, gateway.databaseUrl, 'on the same address')
  // Published at once: the listener may not be back yet, and must catch up.
  const ids = [first]
  for (let i = 0; i < 10; i++) ids.push(await published(gateway, 'orders', `after ${i}`))
  const info = await within(reconnected, 'the listener to reconnect', 10_000)
  t.equal(info.reconnected, true)

  const sentinel = await published(gateway, 'orders', 'sentinel')
  ids.push(sentinel)
  for (const [i, stream] of streams.entries()) {
    await waitForData(stream, 'sentinel')
    t.same(stream.events.map((e) => e.id), ids, `stream ${i}: every event once, in id order`)
    t.notOk(stream.ended, `stream ${i} stayed open`)
    t.equal(opens(stream).length, 1, `stream ${i}: on the same response`)
    t.ok(gaps(stream).length >= 1, `stream ${i} was told of the gap`)
  }
  await waitFor(async () => await readyStatus(gateway) === 200, '/readyz to answer 200', 10_000)
  t.equal(await readyStatus(gateway), 200, '/readyz answers 200 again')
})

t.test('two gateways on one database: both deliver, and a client resumes on the other one', async (t) => {
  const a = await startGateway(t)
  const b = await startGateway(t, {}, a.databaseUrl)
  const onA = await openStream(t, streamUrl(a.baseUrl, ['orders']), subscriber(a))
  const onB = await openStream(t, streamUrl(b.baseUrl, ['orders']), subscriber(b))

  const shared = await published(a, 'orders', 'through A')
  for (const [name, stream] of [['A', onA], ['B', onB]] as const) {
    await waitForData(stream, 'through A')
    t.same(stream.events, [{ id: shared, event: 'orders', data: 'through A' }], `a stream on ${name} got it`)
  }

  const client = await openStream(t, streamUrl(a.baseUrl, ['orders']), subscriber(a))
  const seen = [await published(a, 'orders', 'seen 1'), await published(a, 'orders', 'seen 2')]
  await waitForData(client, 'seen 2')
  t.same(client.events.map((e) => e.id), seen, 'the client got its events from A')
  const lastEventId = client.events.at(-1)?.id as string
  client.close()
  await within(client.done, 'the client to leave A')

  const missed = [await published(a, 'orders', 'missed 1'), await published(b, 'orders', 'missed 2')]
  await published(a, 'elsewhere', 'another channel')
  const resumed = await openStream(t, streamUrl(b.baseUrl, ['orders']), { ...subscriber(b), 'last-event-id': lastEventId })
  t.equal(resumed.response.status, 200)
  await waitForData(resumed, 'missed 2')
  t.same(opens(resumed).map((e) => e.id), [lastEventId], 'the stream on B starts where the client left A')

  const live = await published(a, 'orders', 'live')
  const sentinel = await published(b, 'orders', 'sentinel')
  await waitForData(resumed, 'sentinel')
  t.same(resumed.events.map((e) => [e.id, e.data]),
    [[missed[0], 'missed 1'], [missed[1], 'missed 2'], [live, 'live'], [sentinel, 'sentinel']],
    'exactly the events it missed, then live ones')
  t.equal(resumed.control.filter((e) => e.event === 'gateway/missed').length, 0, 'nothing was out of reach')
})

t.test('a graceful shutdown ends open streams and closes the listener backend', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const streams = await Promise.all([
    openStream(t, streamUrl(gateway.baseUrl, ['one']), subscriber(gateway)),
    openStream(t, streamUrl(gateway.baseUrl, ['one', 'two']), subscriber(gateway))
  ])
  await published(gateway, 'two', 'before closing')
  await waitForData(streams[1] as StreamClient, 'before closing')
  const backend = await theListenerBackend(db)

  await within(gateway.app.close(), 'app.close()')
  for (const [i, stream] of streams.entries()) {
    await within(stream.done, `stream ${i} to end`)
    t.ok(stream.ended, `the client sees stream ${i} end`)
  }
  t.equal(gateway.app.streams.size, 0, 'no stream left')
  let left: Backend[] = [backend]
  await waitFor(async () => {
    left = await listenerBackends(db)
    return left.length === 0
  }, 'the listener backend to go', 5000).catch(() => {})
  t.same(left, [], 'the listener backend is gone from pg_stat_activity')
  t.notOk(gateway.app.listener.connected, 'the listener reports itself closed')
})
