// Publishing fails honestly and retries safely: a 201 only after COMMIT,
// a 503 with nothing published when COMMIT fails, and an Idempotency-Key
// that makes a retry publish nothing twice.
import t from 'tap'
import { connect, errorBody, holdIdLock, openStream, poolWaitingOnLock, publish, type ReceivedEvent, refuseAtCommit, startGateway, type StreamClient, streamUrl, subscriber, type Test, type TestGateway, within } from '../helper.js'

async function listen (t: Test, gateway: TestGateway, channel: string): Promise<StreamClient> {
  return await openStream(t, streamUrl(gateway.baseUrl, [channel]), subscriber(gateway))
}

/** POSTs one text event with an Idempotency-Key, as the subject `sub`. */
async function publishOnce (gateway: TestGateway, channel: string, body: string, key: string, sub = 'client-a'): Promise<Response> {
  return await fetch(`${gateway.baseUrl}/channels/${channel}`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', 'idempotency-key': key, authorization: `Bearer ${gateway.token({ sub, publish: ['*'] })}` },
    body
  })
}

/** Publishes a sentinel and returns what the stream got up to it: proves nothing else arrived. */
async function upToSentinel (t: Test, gateway: TestGateway, stream: StreamClient, channel: string): Promise<ReceivedEvent[]> {
  const sentinel = `sentinel ${Math.random()}`
  t.equal((await publish(gateway, channel, sentinel)).status, 201)
  await within(stream.until(() => stream.events.some((e) => e.data === sentinel), 'the sentinel'), 'the sentinel')
  return stream.events.filter((e) => e.data !== sentinel)
}

t.test('a repeated Idempotency-Key returns the first ids and publishes nothing twice', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, 'orders')

  const first = await publishOnce(gateway, 'orders', 'pay 10', 'key-1')
  t.equal(first.status, 201)
  const { id } = await first.json() as { id: string }
  const again = await publishOnce(gateway, 'orders', 'pay 10', 'key-1')
  t.equal(again.status, 201, 'the repeat is answered like the first')
  t.same(await again.json(), { id, channel: 'orders' }, 'with the first id')

  // Concurrent repeats of a new key: one publishes, the others wait for it.
  const racing = await Promise.all(Array.from({ length: 5 }, () => publishOnce(gateway, 'orders', 'pay 20', 'key-2')))
  const racingIds = await Promise.all(racing.map(async (res) => {
    t.equal(res.status, 201)
    return ((await res.json()) as { id: string }).id
  }))
  t.equal(new Set(racingIds).size, 1, 'concurrent repeats share one id')

  const got = await upToSentinel(t, gateway, stream, 'orders')
  t.same(got.map((e) => [e.id, e.data]), [[id, 'pay 10'], [racingIds[0], 'pay 20']], 'each request delivered once')
})

t.test('a key is the client\'s own: another subject with the same key publishes', async (t) => {
  const gateway = await startGateway(t)
  const a = await publishOnce(gateway, 'c', 'same', 'shared-key', 'client-a')
  const b = await publishOnce(gateway, 'c', 'same', 'shared-key', 'client-b')
  t.equal(a.status, 201)
  t.equal(b.status, 201)
  t.not(((await a.json()) as { id: string }).id, ((await b.json()) as { id: string }).id)
})

t.test('a key reused for another request is refused with 409, and nothing is published', async (t) => {
  const gateway = await startGateway(t)
  const stream = await listen(t, gateway, 'c')
  t.equal((await publishOnce(gateway, 'c', 'first', 'k')).status, 201)
  const other = await publishOnce(gateway, 'c', 'something else', 'k')
  t.equal(other.status, 409)
  t.match(await other.json(), { statusCode: 409, error: 'Conflict', message: /Idempotency-Key/ })
  t.same((await upToSentinel(t, gateway, stream, 'c')).map((e) => e.data), ['first'])
})

t.test('a malformed Idempotency-Key is refused with 400', async (t) => {
  const gateway = await startGateway(t)
  for (const key of ['has space', 'ü', 'x'.repeat(256)]) {
    const res = await publishOnce(gateway, 'c', 'x', key)
    t.equal(res.status, 400, JSON.stringify(key.slice(0, 10)))
    t.match(await res.json(), { statusCode: 400, message: /Idempotency-Key/ })
  }
})

t.test('a batch is idempotent as a whole', async (t) => {
  const gateway = await startGateway(t)
  const post = async (): Promise<Response> => await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', 'idempotency-key': 'batch-1', authorization: `Bearer ${gateway.token({ sub: 'b', publish: ['*'] })}` },
    body: JSON.stringify({ events: [{ channel: 'x', data: 1 }, { channel: 'y', data: 2 }] })
  })
  const first = await post()
  const again = await post()
  t.equal(first.status, 201)
  t.equal(again.status, 201)
  t.same(await again.json(), await first.json())
})

t.test('when COMMIT fails the POST answers 503 and nothing is delivered', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  await refuseAtCommit(db, 'doomed')
  const stream = await listen(t, gateway, 'c')

  const res = await publish(gateway, 'c', 'doomed')
  t.equal(res.status, 503)
  const body = await res.json() as { message: string }
  t.match(body, { statusCode: 503, error: 'Service Unavailable', message: /nothing was published/ })
  t.notMatch(body.message, /refused at commit|sse_gateway|trigger/, 'no SQL or internals in the message')

  const batch = await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${gateway.token({ publish: ['*'] })}` },
    body: JSON.stringify({ events: [{ channel: 'c', data: 'fine' }, { channel: 'c', data: 'doomed' }] })
  })
  t.equal(batch.status, 503, 'a batch with one event failing at commit is refused whole')
  t.same(await upToSentinel(t, gateway, stream, 'c'), [], 'nothing of the failed commits arrived')

  // Concurrent publishes may share a transaction; the one at fault fails alone.
  const racing = await Promise.all(['kept 1', 'kept 2', 'doomed', 'kept 3', 'kept 4'].map(async (body) => (await publish(gateway, 'c', body)).status))
  t.same(racing, [201, 201, 503, 201, 201], 'among concurrent POSTs only the doomed one fails')
  const kept = await upToSentinel(t, gateway, stream, 'c')
  t.same(kept.map((e) => e.data).filter((d) => !d.startsWith('sentinel')).sort(), ['kept 1', 'kept 2', 'kept 3', 'kept 4'], 'the others are delivered, the doomed one is not')

  const { rows } = await db.query<{ n: number }>("SELECT count(*)::int AS n FROM sse_gateway.events WHERE payload IN ('doomed', 'fine')")
  t.equal(rows[0]?.n, 0, 'and nothing is in the log')
})

t.test('pool connections killed while idle: the process stays up and the next publish succeeds', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const stream = await listen(t, gateway, 'c')
  t.equal((await publish(gateway, 'c', 'before')).status, 201)
  const { rowCount } = await db.query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = 'pg-sse-gateway:pool' AND datname = current_database()")
  t.ok((rowCount ?? 0) > 0, 'the pool had idle connections to kill')
  t.equal((await publish(gateway, 'c', 'after')).status, 201)
  t.same((await upToSentinel(t, gateway, stream, 'c')).map((e) => e.data), ['before', 'after'])
  t.equal((await gateway.app.inject('/readyz')).statusCode, 200)
})

t.test('a publish whose connection is ended mid-statement answers 503 saying the outcome is unknown', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  // Holding the lock of the draw keeps the publish in the database.
  await holdIdLock(db)
  const answer = publish(gateway, 'c', 'cut')
  const waiting = await poolWaitingOnLock(db)
  // The server ends the session (57P01): whether a COMMIT had been done is
  // not the client's to know in general.
  await db.query('SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) AS pid', [waiting.map((w) => w.pid)])
  await db.query('ROLLBACK')
  const body = await errorBody(t, await answer, 503)
  t.match(body.message, /may or may not have been published/)
  t.match(body.message, /Idempotency-Key/)
  t.equal((await publish(gateway, 'c', 'next')).status, 201, 'the next publish goes through')
})
