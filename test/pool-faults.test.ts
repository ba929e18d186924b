// Failures of the publishing pool's connections, through a TCP proxy: a
// connection that goes silent costs a publish a bounded wait and an answer
// that says the outcome is unknown; a server that cannot be reached is
// answered "nothing was published"; and publishing heals by itself.
import type pg from 'pg'
import t from 'tap'
import { startProxy } from './tcp-proxy.js'
import { connect, createDatabase, errorBody, holdIdLock, openStream, poolWaitingOnLock, publish, published, readyStatus, startGateway, streamUrl, subscriber, type TestGateway, waitFor, waitForData, within } from './helper.js'

async function logged (db: pg.Client, payload: string): Promise<number> {
  const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM sse_gateway.events WHERE payload = $1', [payload])
  return rows[0]?.n ?? 0
}

function publishWithKey (gateway: TestGateway, channel: string, body: string, key: string): Promise<Response> {
  return fetch(`${gateway.baseUrl}/channels/${channel}`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', 'idempotency-key': key, authorization: `Bearer ${gateway.token({ publish: ['*'] })}` },
    body
  })
}

t.test('a publish on a connection gone silent fails within PG_QUERY_TIMEOUT_MS, outcome unknown; /readyz says 503 meanwhile; publishing heals', async (t) => {
  // The server cancels statements at two thirds of it (3 s): /readyz turns
  // 503 once the group is in flight that long, and the client gives up at 4.5 s.
  const QUERY_TIMEOUT_MS = 4500
  const database = await createDatabase(t)
  const { proxy, url } = await startProxy(t, database)
  const gateway = await startGateway(t, { PG_QUERY_TIMEOUT_MS: String(QUERY_TIMEOUT_MS) }, url)
  let poolErrors = 0
  const countError = (): void => { poolErrors++ }
  gateway.app.pg.pool.on('error', countError)
  t.teardown(() => gateway.app.pg.pool.off('error', countError))
  // Straight to PostgreSQL, not through the proxy.
  const db = await connect(t, database)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway))
  await published(gateway, 'orders', 'before')
  await waitForData(stream, 'before')
  t.equal(await readyStatus(gateway), 200, 'ready before')
  const { rows: [settings] } = await gateway.app.pg.query(`SELECT current_setting('statement_timeout') AS statement,
    current_setting('idle_in_transaction_session_timeout') AS idle, current_setting('tcp_user_timeout') AS unacknowledged,
    current_setting('tcp_keepalives_idle') AS keepalive`)
  t.same(settings, { statement: '3s', idle: '3s', unacknowledged: '4500', keepalive: '10' }, 'the server watches the pool\'s sessions too')

  // The log's lock, held: the next publish waits in the database, so its
  // connection can be found and frozen while the statement is in flight.
  const blocker = await connect(t, database)
  await holdIdLock(blocker)
  let settled = false
  const inDoubt = publish(gateway, 'orders', 'in doubt').finally(() => { settled = true })
  const [waiting] = await poolWaitingOnLock(db)
  const frozen = proxy.freezeByUpstreamPort(waiting?.clientPort as number)
  // The server commits the publish; its answer never reaches the gateway.
  await blocker.query('ROLLBACK')

  await waitFor(async () => await readyStatus(gateway) === 503, '/readyz to answer 503', QUERY_TIMEOUT_MS + 5000)
  t.notOk(settled, '/readyz answered 503 while the publish was stuck')
  const res = await within(inDoubt, 'the publish in doubt to be answered', QUERY_TIMEOUT_MS + 5000)
  const body = await errorBody(t, res, 503)
  t.match(body.message, /may or may not have been published/, 'the answer says the outcome is unknown')
  t.ok(frozen.dropped > 0, 'the server\'s answer was swallowed')
  t.equal(await logged(db, 'in doubt'), 1, 'and indeed it had committed')
  await waitForData(stream, 'in doubt')
  // The gateway closed its end: the connection was destroyed, not pooled.
  await waitFor(() => frozen.client.destroyed, 'the silent connection to be closed by the gateway')

  // Publishing goes on, through a new connection.
  await within(published(gateway, 'orders', 'after'), 'a publish after the failure', 10_000)
  await waitForData(stream, 'after')
  await waitFor(async () => await readyStatus(gateway) === 200, '/readyz to answer 200')
  t.equal(poolErrors, 0, 'no pool error along the way')
})

t.test('a publish that cannot reach the database says that nothing was published; publishing heals', async (t) => {
  const database = await createDatabase(t)
  const { proxy, url } = await startProxy(t, database)
  const gateway = await startGateway(t, {}, url)
  const port = Number(new URL(url).port)
  const db = await connect(t, database)
  await published(gateway, 'orders', 'before')

  // Every connection ends and new ones are refused: the pool's idle clients
  // hear it ('error' on the pool, handled) and are dropped.
  proxy.stopListening()
  proxy.cutAll()
  await waitFor(() => gateway.app.pg.pool.totalCount === 0, 'the pool to drop its closed connections')

  const refused = await errorBody(t, await publish(gateway, 'orders', 'refused'), 503)
  t.match(refused.message, /nothing was published/, 'connection refused: nothing was published')
  t.notMatch(refused.message, /may or may not/)
  const refusedWithKey = await errorBody(t, await publishWithKey(gateway, 'orders', 'refused with a key', 'k1'), 503)
  t.match(refusedWithKey.message, /nothing was published/, 'likewise with an Idempotency-Key')
  t.equal(await readyStatus(gateway), 503, '/readyz answers 503')

  // A server starting up answers connections with SQLSTATE 57P03.
  proxy.startingUp = true
  await proxy.listen(port)
  const startingUp = await errorBody(t, await publish(gateway, 'orders', 'starting up'), 503)
  t.match(startingUp.message, /nothing was published/, 'SQLSTATE 57P03 at connect: nothing was published')
  const startingUpWithKey = await errorBody(t, await publishWithKey(gateway, 'orders', 'starting up with a key', 'k2'), 503)
  t.match(startingUpWithKey.message, /nothing was published/, 'likewise with an Idempotency-Key')

  proxy.startingUp = false
  await within(published(gateway, 'orders', 'after'), 'a publish once the server is back', 10_000)
  await waitFor(async () => await readyStatus(gateway) === 200, '/readyz to answer 200')
  for (const payload of ['refused', 'refused with a key', 'starting up', 'starting up with a key']) {
    t.equal(await logged(db, payload), 0, `"${payload}" is not in the log`)
  }
  t.equal(await logged(db, 'after'), 1)
})

t.test('a pool connection that dies while out of the pool, mid-transaction, fails its publish and nothing else', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  // The log's lock, held: the publish with a key waits inside its transaction.
  const blocker = await connect(t, gateway.databaseUrl)
  await holdIdLock(blocker)
  const killed = publishWithKey(gateway, 'orders', 'killed', 'k3')
  const [waiting] = await poolWaitingOnLock(db)
  await db.query('SELECT pg_terminate_backend($1)', [waiting?.pid])
  const body = await errorBody(t, await within(killed, 'the publish to be answered'), 503)
  t.match(body.message, /may or may not have been published/, 'the server ended the session: outcome unknown')
  await blocker.query('ROLLBACK')
  await within(published(gateway, 'orders', 'after'), 'a publish after it')
  t.equal(await readyStatus(gateway), 200, 'and the gateway is still up')
})

t.test('a publish with an Idempotency-Key on a connection gone silent fails too, outcome unknown, and its retry publishes once', async (t) => {
  const QUERY_TIMEOUT_MS = 1500
  const database = await createDatabase(t)
  const { proxy, url } = await startProxy(t, database)
  const gateway = await startGateway(t, { PG_QUERY_TIMEOUT_MS: String(QUERY_TIMEOUT_MS) }, url)
  const db = await connect(t, database)
  const blocker = await connect(t, database)
  await holdIdLock(blocker)
  const inDoubt = publishWithKey(gateway, 'orders', 'keyed', 'k4')
  const [waiting] = await poolWaitingOnLock(db)
  proxy.freezeByUpstreamPort(waiting?.clientPort as number)
  await blocker.query('ROLLBACK')
  // Its transaction is left open on the server, with the log's lock, until
  // idle_in_transaction_session_timeout ends the session.
  const body = await errorBody(t, await within(inDoubt, 'the keyed publish to be answered', 3 * QUERY_TIMEOUT_MS + 5000), 503)
  t.match(body.message, /may or may not have been published/)
  const retry = await within(publishWithKey(gateway, 'orders', 'keyed', 'k4'), 'the retry', 3 * QUERY_TIMEOUT_MS + 5000)
  t.equal(retry.status, 201, 'the retry with the same key is answered 201')
  t.equal(await logged(db, 'keyed'), 1, 'published once')
})
