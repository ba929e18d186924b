import pg from 'pg'
import t from 'tap'
import { decodeNotification, ID_LOCK_KEY, migrate, publishEvents, readEvents } from '../src/event-log.js'
import { connect, consecutive, createDatabase, type Inbox, listenOn, publishedWithSql, readWireKey, type Teardown, waitFor } from './helper.js'

// Migration 007: a publish from SQL stages its events, and a deferred
// constraint trigger draws their ids, writes the log and NOTIFYs just
// before COMMIT. These tests hold transactions open and read what they
// hold and wait on from pg_locks and pg_stat_activity, never the clock.

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const wireKey = await readWireKey(db)
const pool = new pg.Pool({ connectionString: url, max: 2 })
t.teardown(() => pool.end())

async function pidOf (client: pg.ClientBase): Promise<number> {
  const { rows } = await client.query<{ pid: number }>('SELECT pg_backend_pid() AS pid')
  return (rows[0] as { pid: number }).pid
}

/** The locks a backend holds that block other draws: the advisory lock ID_LOCK_KEY (one bigint key: objsubid 1). */
async function headLocks (pid: number): Promise<string[]> {
  const { rows } = await db.query<{ mode: string }>(
    "SELECT mode FROM pg_locks WHERE pid = $1 AND granted AND locktype = 'advisory' AND classid = 0 AND objid = $2 AND objsubid = 1", [pid, ID_LOCK_KEY])
  return rows.map((r) => r.mode)
}

/** Resolves once the backend waits on a lock (pg_stat_activity.wait_event_type). */
async function waitsOnLock (pid: number, what: string): Promise<void> {
  await waitFor(async () => {
    const { rows } = await db.query<{ wait: string | null }>('SELECT wait_event_type AS wait FROM pg_stat_activity WHERE pid = $1', [pid])
    return rows[0]?.wait === 'Lock'
  }, what)
}

/** The events the inbox got on a channel, decoded: ids and payloads, in the order PostgreSQL delivered them. */
function received (inbox: Inbox, channel: string): Array<{ id: number, data: string | undefined }> {
  return inbox.payloads(channel).map((p) => {
    const event = decodeNotification(channel, p, wireKey)
    if (event === null) throw new Error(`not a gateway event: ${p}`)
    return event
  })
}

/** The last id drawn (committed or not). */
async function lastId (): Promise<number> {
  const { rows } = await db.query<{ id: string }>("SELECT pg_sequence_last_value('sse_gateway.event_ids')::text AS id")
  return Number(rows[0]?.id)
}

/** The head: the last committed id. */
async function headId (): Promise<number> {
  const { rows } = await db.query<{ id: string }>('SELECT sse_gateway.log_head_id()::text AS id')
  return Number(rows[0]?.id)
}

async function stagedCount (): Promise<number> {
  const { rows } = await db.query<{ n: number }>('SELECT count(*)::int AS n FROM sse_gateway.pending_events')
  return rows[0]?.n ?? -1
}

async function openTransaction (t: Teardown, ...statements: string[]): Promise<{ client: pg.Client, pid: number }> {
  const client = await connect(t, url)
  const pid = await pidOf(client)
  await client.query('BEGIN')
  for (const sql of statements) await client.query(sql)
  return { client, pid }
}

t.test('a transaction that has published blocks no other publisher until it commits', async (t) => {
  const inbox = await listenOn(t, url, 'open')
  const open = await openTransaction(t, "SELECT sse_gateway.publish('open', 'held open')")
  t.same(await headLocks(open.pid), [], 'the open transaction holds no lock on the log head')

  const sql = await publishedWithSql(db, 'open', 'from SQL meanwhile')
  const http = (await publishEvents(pool, [{ channel: 'open', payload: 'from the gateway meanwhile' }])).ids[0] as string
  t.equal(Number(http), Number(sql) + 1, 'a SQL publish and a gateway publish both committed while it was open')
  const { rows: [activity] } = await db.query<{ state: string }>('SELECT state FROM pg_stat_activity WHERE pid = $1', [open.pid])
  t.equal(activity?.state, 'idle in transaction', 'the first transaction is still open')

  await open.client.query('COMMIT')
  await inbox.until(() => inbox.messages.length >= 3, 'three events')
  t.same(received(inbox, 'open'), [
    { id: Number(sql), data: 'from SQL meanwhile' },
    { id: Number(http), data: 'from the gateway meanwhile' },
    { id: Number(http) + 1, data: 'held open' }
  ], 'the transaction that published first but committed last has the last id')
})

t.test('ids follow commit order when a commit waits: the later commit draws later', async (t) => {
  const inbox = await listenOn(t, url, 'waits')
  // SET CONSTRAINTS ALL IMMEDIATE makes the flush run at the end of the
  // statement, as publishing did before version 7: the lock is held to COMMIT.
  const early = await openTransaction(t, 'SET CONSTRAINTS ALL IMMEDIATE', "SELECT sse_gateway.publish('waits', 'drawn early')")
  t.same(await headLocks(early.pid), ['ExclusiveLock'], 'IMMEDIATE draws at once, and holds the lock')
  const late = await openTransaction(t, "SELECT sse_gateway.publish('waits', 'drawn at commit')")
  const committed = late.client.query('COMMIT')
  await waitsOnLock(late.pid, 'the later commit to wait for the head')
  await early.client.query('COMMIT')
  await committed
  await inbox.until(() => inbox.messages.length >= 2, 'both events')
  const events = received(inbox, 'waits')
  t.same(events.map((e) => e.data), ['drawn early', 'drawn at commit'], 'delivered in commit order')
  t.equal(events[1]?.id, (events[0]?.id as number) + 1, 'with the next id')
})

t.test('savepoints: what a rolled-back savepoint staged is never published, the rest is, in order', async (t) => {
  const inbox = await listenOn(t, url, 'sp')
  const before = await lastId()
  const { client } = await openTransaction(t,
    "SELECT sse_gateway.publish('sp', 'a')",
    'SAVEPOINT one',
    "SELECT sse_gateway.publish('sp', 'rolled back')",
    'ROLLBACK TO SAVEPOINT one',
    "SELECT sse_gateway.publish('sp', 'b')",
    'SAVEPOINT two',
    "SELECT sse_gateway.publish('sp', 'c')",
    'RELEASE SAVEPOINT two')
  await client.query('COMMIT')
  await inbox.until(() => inbox.messages.length >= 3, 'three events')
  t.same(received(inbox, 'sp'), [{ id: before + 1, data: 'a' }, { id: before + 2, data: 'b' }, { id: before + 3, data: 'c' }], 'a, b, c with consecutive ids')
  t.equal(await stagedCount(), 0, 'nothing left staged')
})

t.test('savepoints: a first publish rolled back with its savepoint does not disarm the next one', async (t) => {
  const inbox = await listenOn(t, url, 'sp2')
  const { client } = await openTransaction(t,
    'SAVEPOINT s',
    "SELECT sse_gateway.publish('sp2', 'gone')",
    'ROLLBACK TO SAVEPOINT s',
    "SELECT sse_gateway.publish('sp2', 'kept')")
  await client.query('COMMIT')
  await inbox.until(() => inbox.messages.length >= 1, 'the kept event')
  t.same(received(inbox, 'sp2').map((e) => e.data), ['kept'])

  const before = await lastId()
  const nothing = await openTransaction(t, 'SAVEPOINT s', "SELECT sse_gateway.publish('sp2', 'all gone')", 'ROLLBACK TO SAVEPOINT s')
  await nothing.client.query('COMMIT')
  t.equal(await lastId(), before, 'a transaction whose every publish was rolled back draws no id')
  t.equal(await stagedCount(), 0, 'and leaves nothing staged')
})

t.test('savepoints: a flush run inside a rolled-back savepoint runs again at commit', async (t) => {
  const inbox = await listenOn(t, url, 'sp3')
  const before = await lastId()
  const { client } = await openTransaction(t,
    "SELECT sse_gateway.publish('sp3', 'before the savepoint')",
    'SAVEPOINT s',
    'SET CONSTRAINTS ALL IMMEDIATE',
    "SELECT sse_gateway.publish('sp3', 'flushed, then rolled back')",
    'ROLLBACK TO SAVEPOINT s',
    "SELECT sse_gateway.publish('sp3', 'after the savepoint')")
  await client.query('COMMIT')
  await inbox.until(() => inbox.messages.length >= 2, 'two events')
  const events = received(inbox, 'sp3')
  t.same(events.map((e) => e.data), ['before the savepoint', 'after the savepoint'], 'nothing of the savepoint')
  // The flush in the savepoint drew two ids (a sequence is not rolled
  // back): a hole, which the flush at commit draws past.
  t.same(events.map((e) => e.id), [before + 3, before + 4], 'drawn past the savepoint\'s draw, consecutive')
})

t.test('a publish after the flush (from a deferred trigger of the user\'s) is published by the same commit', async (t) => {
  const inbox = await listenOn(t, url, 'late')
  await db.query(`
    CREATE TABLE late_work (id int);
    CREATE FUNCTION late_publish() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN PERFORM sse_gateway.publish('late', 'from a deferred trigger'); RETURN NULL; END $$;
    CREATE CONSTRAINT TRIGGER late_publish AFTER INSERT ON late_work DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION late_publish();
  `)
  t.teardown(() => db.query('DROP TABLE late_work; DROP FUNCTION late_publish()'))
  const { client } = await openTransaction(t, "SELECT sse_gateway.publish('late', 'first')", 'INSERT INTO late_work VALUES (1)')
  await client.query('COMMIT')
  const { rows: [drawn] } = await client.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')
  await inbox.until(() => inbox.messages.length >= 2, 'both events')
  const events = received(inbox, 'late')
  t.same(events.map((e) => e.data), ['first', 'from a deferred trigger'])
  t.ok(consecutive(events.map((e) => String(e.id))), 'consecutive ids: the transaction held the head from its first flush')
  t.same(drawn?.ids, events.map((e) => String(e.id)), 'published_ids() names both')
  t.equal(await stagedCount(), 0, 'nothing left staged')
})

t.test('a publish from a session with session_replication_role = replica is published too', async (t) => {
  const inbox = await listenOn(t, url, 'replica')
  const { client } = await openTransaction(t, 'SET LOCAL session_replication_role = replica', "SELECT sse_gateway.publish('replica', 'still published')")
  await client.query('COMMIT')
  await inbox.until(() => inbox.messages.length >= 1, 'the event')
  t.same(received(inbox, 'replica').map((e) => e.data), ['still published'])
  t.equal(await stagedCount(), 0, 'nothing left staged')
})

for (const level of ['REPEATABLE READ', 'SERIALIZABLE']) {
  t.test(`${level}: a commit succeeds though another publish committed after its snapshot, and its event gets the next id`, async (t) => {
    // Drawing reads no row through the snapshot and updates none: the
    // advisory lock and the sequence are outside MVCC.
    const channel = level === 'SERIALIZABLE' ? 'ser' : 'rr'
    const inbox = await listenOn(t, url, channel)
    await db.query(`CREATE TABLE ${channel}_captured (id int PRIMARY KEY, note text)`)
    await db.query(`SELECT sse_gateway.capture_changes('${channel}_captured', '${channel}')`)
    t.teardown(() => db.query(`DROP TABLE ${channel}_captured`))
    const { client } = await openTransaction(t, `SET TRANSACTION ISOLATION LEVEL ${level}`,
      // The snapshot is taken here, by the first statement.
      `SELECT count(*) FROM ${channel}_captured`,
      `SELECT sse_gateway.publish('${channel}', 'published')`,
      `INSERT INTO ${channel}_captured VALUES (1, 'captured')`)
    const meanwhile = await publishedWithSql(db, channel, 'meanwhile')
    const { rows: [seen] } = await client.query<{ n: number }>('SELECT count(*)::int AS n FROM sse_gateway.events WHERE id = $1', [meanwhile])
    t.equal(seen?.n, 0, 'the other publish committed after the snapshot')
    await client.query('COMMIT')
    const { rows: [drawn] } = await client.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')
    await inbox.until(() => inbox.messages.length >= 3, 'three events')
    const events = received(inbox, channel)
    t.same(events.map((e) => e.id), [Number(meanwhile), Number(meanwhile) + 1, Number(meanwhile) + 2], 'delivered in commit order, with the next ids')
    t.same(events.map((e) => e.data?.startsWith('{') === true ? JSON.parse(e.data).op : e.data), ['meanwhile', 'published', 'INSERT'])
    t.same(drawn?.ids, [String(Number(meanwhile) + 1), String(Number(meanwhile) + 2)], 'published_ids() names them')
    t.equal(await stagedCount(), 0, 'nothing left staged')
    const rows = await readEvents(db, drawn?.ids ?? [])
    t.equal(rows.length, 2, 'the log holds them')
  })
}

t.test('a commit that fails after drawing leaves a hole: the next commit draws past it, and the head is the last committed id', async (t) => {
  const inbox = await listenOn(t, url, 'hole')
  await db.query(`
    CREATE TABLE hole_work (id int);
    CREATE FUNCTION hole_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'refused after the flush'; END $$;
    CREATE CONSTRAINT TRIGGER hole_refuse AFTER INSERT ON hole_work DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION hole_refuse();
  `)
  t.teardown(() => db.query('DROP TABLE hole_work; DROP FUNCTION hole_refuse()'))
  const committed = await publishedWithSql(db, 'hole', 'before')
  // The flush was queued first, so it runs first at COMMIT; the trigger after it fails the commit.
  const { client } = await openTransaction(t, "SELECT sse_gateway.publish('hole', 'never')", 'INSERT INTO hole_work VALUES (1)')
  await t.rejects(client.query('COMMIT'), { message: /refused after the flush/ })
  t.equal(await lastId(), Number(committed) + 1, 'the failed commit drew an id')
  t.equal(await headId(), Number(committed), 'the head is the last committed id')
  const after = await publishedWithSql(db, 'hole', 'after')
  t.equal(Number(after), Number(committed) + 2, 'the next commit draws past the hole')
  await inbox.until(() => inbox.messages.length >= 2, 'two events')
  t.same(received(inbox, 'hole').map((e) => e.data), ['before', 'after'], 'nothing of the failed commit is delivered')
})

t.test('a publish checks its arguments at once, not at commit', async (t) => {
  const { client } = await openTransaction(t)
  await t.rejects(client.query("SELECT sse_gateway.publish('not valid', 'x')"), { code: '22023' }, 'a bad channel fails the call')
  await client.query('ROLLBACK')
})

t.test('PREPARE TRANSACTION of a publishing transaction fails and publishes nothing', async (t) => {
  const head = await headId()
  const { client } = await openTransaction(t, "SELECT sse_gateway.publish('twophase', 'never')")
  // Refused either way: a NOTIFYing transaction cannot be prepared, nor
  // any when max_prepared_transactions is 0.
  await t.rejects(client.query("PREPARE TRANSACTION 'pgsse_publish'"), { code: /^(0A000|55000)$/ })
  await client.query('ROLLBACK').catch(() => {})
  t.equal(await headId(), head, 'nothing published: the head did not move (the flush, run by PREPARE, may have drawn an id: a hole)')
  t.equal(await stagedCount(), 0, 'nothing left staged')
})

t.test('concurrent publishing transactions: ids in delivery order are consecutive, and each commit is whole', async (t) => {
  const sessions = 6
  const transactions = 15
  const inbox = await listenOn(t, url, 'many')
  const clients = await Promise.all(Array.from({ length: sessions }, async () => await connect(t, url)))
  const before = await lastId()
  let expected = 0
  const drawn: string[][] = []
  await Promise.all(clients.map(async (client, s) => {
    for (let i = 0; i < transactions; i++) {
      const events = 1 + ((s + i) % 3)
      expected += events
      await client.query('BEGIN')
      for (let k = 0; k < events; k++) await client.query("SELECT sse_gateway.publish('many', $1)", [`${s}/${i}/${k}`])
      // Work after publishing, while other sessions publish and commit.
      await client.query('SELECT count(*) FROM generate_series(1, 2000)')
      await client.query('COMMIT')
      const { rows: [ids] } = await client.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')
      drawn.push(ids?.ids ?? [])
    }
  }))
  await inbox.until(() => inbox.messages.length >= expected, `${expected} events`)
  const events = received(inbox, 'many')
  t.same(events.map((e) => e.id), Array.from({ length: expected }, (_, i) => before + 1 + i), 'delivered in id order, no gap (no commit failed): a client resuming after any id misses no later commit')
  const byId = new Map(events.map((e) => [String(e.id), e.data]))
  for (const ids of drawn) {
    const data = ids.map((id) => byId.get(id) as string)
    const transaction = data[0]?.split('/').slice(0, 2).join('/')
    t.ok(consecutive(ids) && data.every((d, k) => d === `${transaction}/${k}`), `${transaction}: its events, consecutive and in order`)
  }
  const rows = await readEvents(db, [String(before + 1), String(before + expected)])
  t.equal(rows.length, 2, 'the log holds them')
})
