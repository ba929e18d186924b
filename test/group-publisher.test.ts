import pg from 'pg'
import t from 'tap'
import { decodeNotification, migrate } from '../src/event-log.js'
import { GroupPublisher, nothingPublished, PublishNotSentError } from '../src/group-publisher.js'
import { connect, consecutive, createDatabase, holdIdLock, listenOn, readWireKey, refuseAtCommit, type Test, waitFor, within } from './helper.js'
import { startProxy } from './tcp-proxy.js'

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const key = await readWireKey(db)

const LIMITS = { maxEvents: 1000, maxBytes: 1024 * 1024, maxWaitMs: 30_000, stalledAfterMs: 30_000 }

function poolFor (t: Test, options: pg.PoolConfig = {}): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max: 4, ...options })
  t.teardown(() => pool.end())
  return pool
}

/** The transaction id that wrote each event, by event id. */
async function writers (ids: string[]): Promise<Map<string, string>> {
  const { rows } = await db.query<{ id: string, xmin: string }>(
    'SELECT id::text AS id, xmin::text AS xmin FROM sse_gateway.events WHERE id = ANY($1::bigint[])',
    [ids]
  )
  return new Map(rows.map((r) => [r.id, r.xmin]))
}

function events (channel: string, ...payloads: string[]): Array<{ channel: string, payload: string }> {
  return payloads.map((payload) => ({ channel, payload }))
}

t.test('publishes that wait while one commits go together, in one transaction, in arrival order', async (t) => {
  const inbox = await listenOn(t, url, 'grouped')
  const publisher = new GroupPublisher(poolFor(t), LIMITS)

  // The first goes out at once; the other four arrive while it commits.
  const publishes = [
    publisher.publish(events('grouped', 'first')),
    publisher.publish(events('grouped', 'a1', 'a2')),
    publisher.publish(events('grouped', 'b1')),
    publisher.publish(events('grouped', 'c1', 'c2', 'c3')),
    publisher.publish(events('grouped', 'd1'))
  ]
  const ids = await Promise.all(publishes)
  t.same(ids.map((i) => i.length), [1, 2, 1, 3, 1], 'each publish gets one id per event')
  const all = ids.flat()
  t.ok(consecutive(all), 'ids follow arrival order, with no gap')
  t.equal(publisher.groups, 2, 'two transactions: the first alone, then the four that waited')

  const writer = await writers(all)
  const [firstTx, ...groupTxs] = all.map((id) => writer.get(id))
  t.equal(new Set(groupTxs).size, 1, 'the four waiting publishes were written by one transaction')
  t.not(firstTx, groupTxs[0], 'the first publish had its own')

  await inbox.until(() => inbox.messages.length >= 8, 'eight notifications')
  const received = inbox.payloads('grouped')
  t.same(received.map((p) => decodeNotification('grouped', p, key)?.data), ['first', 'a1', 'a2', 'b1', 'c1', 'c2', 'c3', 'd1'], 'delivered in id order')
  t.same(received.map((p) => String(decodeNotification('grouped', p, key)?.id)), all, 'each with its id')
})

t.test('a group holds at most maxEvents events and maxBytes bytes; a larger publish goes alone', async (t) => {
  const publisher = new GroupPublisher(poolFor(t), { ...LIMITS, maxEvents: 3, maxBytes: 10 })
  const ids = await Promise.all([
    publisher.publish(events('limits', 'x')),
    publisher.publish(events('limits', 'a', 'b')),
    publisher.publish(events('limits', 'c')), // fills the group to 3 events
    publisher.publish(events('limits', 'd')), // would make 4: next group
    publisher.publish(events('limits', '12345678901')), // 11 bytes: alone, though over maxBytes
    publisher.publish(events('limits', 'e', 'f', 'g', 'h')) // 4 events: alone, though over maxEvents
  ])
  const writer = await writers(ids.flat())
  const tx = (i: number): string | undefined => writer.get((ids[i] as string[])[0] as string)
  t.equal(tx(1), tx(2), 'the second and third share a transaction')
  t.equal(new Set([tx(0), tx(1), tx(3), tx(4), tx(5)]).size, 5, 'the others each have their own')
  t.equal(publisher.groups, 5)
  t.same(ids[5]?.length, 4, 'the oversized publish is whole')
})

t.test('a value the database refuses fails its own publish only: the group is split down to it', async (t) => {
  const inbox = await listenOn(t, url, 'refused')
  const publisher = new GroupPublisher(poolFor(t), LIMITS)

  const first = publisher.publish(events('refused', 'first'))
  const good1 = publisher.publish(events('refused', 'good 1'))
  // PostgreSQL text cannot hold NUL: the database refuses it (SQLSTATE 22021).
  const bad = publisher.publish(events('refused', 'fine', 'bad\u0000'))
  const good2 = publisher.publish(events('refused', 'good 2'))
  await t.rejects(bad, { code: '22021' }, 'the publish with the bad value fails with the database\'s code')
  const ids = [...await first, ...await good1, ...await good2]
  t.ok(consecutive(ids), 'the others commit, and the retry leaves no gap')
  t.equal(publisher.groups, 6, 'the first; the failed group of three; its first half of two, failing; each of that half alone; the second half')

  await inbox.until(() => inbox.messages.length >= 3, 'three notifications')
  const received = inbox.payloads('refused')
  t.same(received.map((p) => decodeNotification('refused', p, key)?.data), ['first', 'good 1', 'good 2'], 'nothing of the refused publish is delivered, not even its good half')
  const { rows } = await db.query("SELECT payload FROM sse_gateway.events WHERE channel = 'refused' ORDER BY id")
  t.same(rows.map((r) => r.payload), ['first', 'good 1', 'good 2'], 'nor logged')
})

t.test('an event a trigger refuses at COMMIT fails its own publish only', async (t) => {
  t.teardown(await refuseAtCommit(db, 'doomed'))
  const publisher = new GroupPublisher(poolFor(t), LIMITS)
  const results = await Promise.allSettled([
    publisher.publish(events('trigger', 'first')),
    publisher.publish(events('trigger', 'kept')),
    publisher.publish(events('trigger', 'doomed')),
    publisher.publish(events('trigger', 'kept too'))
  ])
  t.same(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'rejected', 'fulfilled'])
  t.match(results[2], { reason: { code: 'P0001' } })
  const { rows } = await db.query("SELECT payload FROM sse_gateway.events WHERE channel = 'trigger' ORDER BY id")
  t.same(rows.map((r) => r.payload), ['first', 'kept', 'kept too'])
})

t.test('a group that fails for another reason fails whole and is not retried', async (t) => {
  // A statement that waits longer than this is cancelled (SQLSTATE 57014):
  // not the events' fault, so no publish of the group is tried again.
  const publisher = new GroupPublisher(poolFor(t, { statement_timeout: 300 }), LIMITS)
  const blocker = await connect(t, url)
  await holdIdLock(blocker)
  const before = (await db.query<{ n: string }>('SELECT count(*)::text AS n FROM sse_gateway.events')).rows[0]?.n

  const results = await within(Promise.allSettled([
    publisher.publish(events('cancelled', 'first')),
    publisher.publish(events('cancelled', 'a')),
    publisher.publish(events('cancelled', 'b'))
  ]), 'the publishes to settle', 10_000)
  await blocker.query('ROLLBACK')
  t.same(results.map((r) => r.status), ['rejected', 'rejected', 'rejected'])
  t.same(results.map((r) => r.status === 'rejected' ? (r.reason as { code?: string }).code : undefined), ['57014', '57014', '57014'], 'each with the cancellation')
  t.equal(publisher.groups, 2, 'two transactions: the first, then the group; no retries')
  const after = (await db.query<{ n: string }>('SELECT count(*)::text AS n FROM sse_gateway.events')).rows[0]?.n
  t.equal(after, before, 'nothing logged')
})

t.test('a publish that waits longer than maxWaitMs for its group fails, never sent', async (t) => {
  const publisher = new GroupPublisher(poolFor(t), { ...LIMITS, maxWaitMs: 200 })
  const blocker = await connect(t, url)
  await holdIdLock(blocker)
  const first = publisher.publish(events('stalled', 'first')) // sent, waits for the lock
  const queued = publisher.publish(events('stalled', 'queued')) // waits behind it
  await t.rejects(within(queued, 'the queued publish to fail', 5000), { name: 'PublishQueueTimeoutError', code: 'GW_PUBLISH_QUEUE_TIMEOUT' })
  await blocker.query('ROLLBACK')
  const [id] = await first
  t.ok(id, 'the publish that was sent commits once the lock is free')
  t.equal(publisher.groups, 1, 'the queued one never reached the database')
  const { rows } = await db.query("SELECT payload FROM sse_gateway.events WHERE channel = 'stalled'")
  t.same(rows.map((r) => r.payload), ['first'])
})

t.test('an empty publish resolves at once; drain waits for every publish handed over', async (t) => {
  const publisher = new GroupPublisher(poolFor(t), LIMITS)
  t.same(await publisher.publish([]), [])
  t.equal(publisher.groups, 0, 'no transaction for nothing')
  await publisher.drain()

  let settled = 0
  for (let i = 0; i < 5; i++) publisher.publish(events('drained', String(i))).then(() => settled++, () => {})
  await publisher.drain()
  t.equal(settled, 5, 'all five had settled when drain resolved')
})

t.test('a statement without an answer fails at query_timeout, outcome unknown; its connection and older ones are dropped, and the next publish goes through a new one', async (t) => {
  const { proxy, url: proxied } = await startProxy(t, url)
  const pool = poolFor(t, { connectionString: proxied, query_timeout: 1000 })
  const publisher = new GroupPublisher(pool, LIMITS)
  t.teardown(() => publisher.close())
  // Three connections open and idle, then silent.
  const clients = await Promise.all([pool.connect(), pool.connect(), pool.connect()])
  for (const client of clients) client.release()
  for (const pair of proxy.pairs) pair.frozen = true

  const err = await within(publisher.publish(events('silent', 'lost')).catch((e: unknown) => e), 'the publish to fail', 10_000)
  t.match(err, { message: 'Query read timeout' })
  t.notOk(nothingPublished(err), 'its outcome is unknown')
  const opened = proxy.pairs.length
  const [id] = await within(publisher.publish(events('silent', 'next')), 'the next publish', 10_000)
  t.ok(id, 'the next publish commits')
  t.equal(proxy.pairs.length, opened + 1, 'through one new connection')
  t.equal(pool.totalCount, 1, 'the silent connections are no longer the pool\'s')
  await waitFor(() => proxy.pairs.slice(0, opened).every((pair) => pair.client.destroyed), 'the silent connections to be closed')
})

t.test('a publish that gets no connection fails as never sent', async (t) => {
  const { proxy, url: proxied } = await startProxy(t, url)
  proxy.stopListening()
  const publisher = new GroupPublisher(poolFor(t, { connectionString: proxied }), LIMITS)
  t.teardown(() => publisher.close())
  const err = await publisher.publish(events('unreachable', 'x')).catch((e: unknown) => e)
  t.type(err, PublishNotSentError)
  t.match(err, { code: 'GW_PUBLISH_NOT_SENT', cause: { code: 'ECONNREFUSED' } })
  t.ok(nothingPublished(err))
})

t.test('the publisher is stalled while a group waits longer than stalledAfterMs, and no longer once it settles', async (t) => {
  const publisher = new GroupPublisher(poolFor(t), { ...LIMITS, stalledAfterMs: 100 })
  t.teardown(() => publisher.close())
  const blocker = await connect(t, url)
  await holdIdLock(blocker)
  t.notOk(publisher.stalled)
  const waiting = publisher.publish(events('stalled-flag', 'x'))
  await waitFor(() => publisher.stalled, 'the publisher to be stalled')
  await blocker.query('ROLLBACK')
  await waiting
  t.notOk(publisher.stalled, 'not once the group committed')
})

t.test('an idempotent publish goes alone, publishes once, and drain waits for it', async (t) => {
  const publisher = new GroupPublisher(poolFor(t), LIMITS)
  const blocker = await connect(t, url)
  await holdIdLock(blocker)
  const idempotency = { key: 'alone', requestHash: 'first' }
  let answered = false
  const first = publisher.publishIdempotent(events('alone', 'once'), idempotency).then((result) => { answered = true; return result })
  let drained = false
  const drain = publisher.drain().then(() => { drained = true })
  await waitFor(async () => (await db.query("SELECT 1 FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'")).rowCount === 1, 'the publish to wait for the lock')
  t.notOk(drained, 'drain waits while the idempotent publish is under way')
  await blocker.query('ROLLBACK')
  await within(drain, 'drain')
  t.ok(answered, 'the publish had its answer when drain resolved')
  const { ids, replayed } = await first
  t.equal(replayed, false)
  t.same(await publisher.publishIdempotent(events('alone', 'once'), idempotency), { ids, replayed: true }, 'a repeat gets the first ids')
  await t.rejects(publisher.publishIdempotent(events('alone', 'other'), { ...idempotency, requestHash: 'other' }), { name: 'IdempotencyConflictError' })
  t.equal(publisher.groups, 0, 'never in a group')
  const { rows } = await db.query("SELECT payload FROM sse_gateway.events WHERE channel = 'alone'")
  t.same(rows.map((r) => r.payload), ['once'])
})
