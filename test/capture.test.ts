import { chmodSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs'
import { tmpdir } from 'node:os'
import path from 'node:path'
import type pg from 'pg'
import t from 'tap'
import { decodeNotification, migrate, readEvents, recordSettings } from '../src/event-log.js'
import { connect, createDatabase, type Inbox, listenOn, openStream, readWireKey, startGateway, streamUrl, subscriber, type Teardown, within } from './helper.js'

// sse_gateway.capture_changes (migration 007): row changes of a table
// published as events, in the writing transaction.

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const wireKey = await readWireKey(db)

interface RowChange {
  op: string
  schema: string
  table: string
  new?: Record<string, unknown>
  old?: Record<string, unknown>
  truncated?: true
}

/** The captured events on a channel, parsed, in delivery order; their payloads read from the log when they travelled by reference. */
async function changes (inbox: Inbox, channel: string, count: number): Promise<RowChange[]> {
  await inbox.until(() => inbox.payloads(channel).length >= count, `${count} events on ${channel}`)
  const events = inbox.payloads(channel).map((p) => decodeNotification(channel, p, wireKey))
  const out: RowChange[] = []
  for (const event of events) {
    if (event === null) throw new Error('not a gateway event')
    const data = event.data ?? (await readEvents(db, [String(event.id)]))[0]?.payload
    out.push(JSON.parse(data as string) as RowChange)
  }
  return out
}

/** A fresh table `public.<name>` (id serial primary key, status text, total numeric), dropped at the end. */
async function table (t: Teardown, name: string, columns = 'id serial PRIMARY KEY, status text, total numeric'): Promise<void> {
  await db.query(`CREATE TABLE ${name} (${columns})`)
  t.teardown(() => db.query(`DROP TABLE IF EXISTS ${name}`))
}

const head = (op: string, name: string): RowChange => ({ op, schema: 'public', table: name })

t.test('INSERT, UPDATE and DELETE become events on the channel schema.table, in order, with to_jsonb values', async (t) => {
  await table(t, 'orders', 'id int PRIMARY KEY, status text, total numeric(10,2), placed timestamptz, paid boolean, meta jsonb, note text')
  const { rows: [capture] } = await db.query<{ channel: string }>("SELECT sse_gateway.capture_changes('public.orders') AS channel")
  t.equal(capture?.channel, 'public.orders', 'capture_changes returns the channel')
  const inbox = await listenOn(t, url, 'public.orders')
  await db.query("INSERT INTO orders VALUES (1, 'new', 9.5, '2026-11-30 10:00:00+00', false, '{\"a\": [1, 2]}', NULL)")
  await db.query("UPDATE orders SET status = 'shipped', paid = true WHERE id = 1")
  await db.query('DELETE FROM orders WHERE id = 1')
  const { rows: [jsonb] } = await db.query<{ row: Record<string, unknown> }>(
    "SELECT to_jsonb(r) AS row FROM (SELECT 1 AS id, 'new'::text AS status, 9.5::numeric(10,2) AS total, '2026-11-30 10:00:00+00'::timestamptz AS placed, false AS paid, '{\"a\": [1, 2]}'::jsonb AS meta, NULL::text AS note) r")
  const inserted = jsonb?.row as Record<string, unknown>
  const updated = { ...inserted, status: 'shipped', paid: true }
  t.same(await changes(inbox, 'public.orders', 3), [
    { ...head('INSERT', 'orders'), new: inserted },
    { ...head('UPDATE', 'orders'), new: updated, old: inserted },
    { ...head('DELETE', 'orders'), old: updated }
  ])
  t.equal(inserted.total, 9.5, 'numbers as JSON numbers')
  t.equal(inserted.placed, '2026-11-30T10:00:00+00:00', 'timestamps as to_jsonb writes them')
})

t.test('multi-row statements publish one event per row, in the order the statement changed them', async (t) => {
  await table(t, 'multi')
  await db.query("SELECT sse_gateway.capture_changes('multi')")
  const inbox = await listenOn(t, url, 'public.multi')
  await db.query("INSERT INTO multi (status, total) SELECT 'n' || i, i FROM generate_series(1, 50) AS i")
  // Every key changes: old and new must pair by row, not by key.
  await db.query('UPDATE multi SET id = id + 1000, total = total * 2')
  await db.query('DELETE FROM multi WHERE total > 60')
  const got = await changes(inbox, 'public.multi', 50 + 50 + 20)
  t.same(got.slice(0, 50).map((c) => c.new?.status), Array.from({ length: 50 }, (_, i) => `n${i + 1}`), 'inserts in order')
  const updates = got.slice(50, 100)
  t.ok(updates.every((c) => c.op === 'UPDATE' && c.new?.id === (c.old?.id as number) + 1000 && c.new?.total === (c.old?.total as number) * 2), 'each update pairs its old and new row')
  t.same(updates.map((c) => c.old?.id), Array.from({ length: 50 }, (_, i) => i + 1), 'updates in order')
  t.same(got.slice(100).map((c) => [c.op, c.old?.total]), Array.from({ length: 20 }, (_, i) => ['DELETE', 62 + 2 * i]), 'deletes in order')
})

t.test('COPY publishes one event per row, in order', async (t) => {
  await table(t, 'copied')
  await db.query("SELECT sse_gateway.capture_changes('public.copied')")
  const inbox = await listenOn(t, url, 'public.copied')
  // A server-side COPY: the test connects as a superuser, and the server runs on this machine.
  const dir = mkdtempSync(path.join(tmpdir(), 'pgsse-copy-'))
  t.teardown(() => rmSync(dir, { recursive: true, force: true }))
  chmodSync(dir, 0o755)
  const file = path.join(dir, 'rows.csv')
  writeFileSync(file, Array.from({ length: 200 }, (_, i) => `${i + 1},copied ${i + 1},${i}`).join('\n') + '\n')
  chmodSync(file, 0o644)
  const copied = await db.query(`COPY copied (id, status, total) FROM ${db.escapeLiteral(file)} WITH (FORMAT csv)`)
  t.equal(copied.rowCount, 200, 'COPY reports its rows as before')
  const got = await changes(inbox, 'public.copied', 200)
  t.same(got.map((c) => c.new?.id), Array.from({ length: 200 }, (_, i) => i + 1), 'one INSERT per row, in file order')
})

t.test('a rolled-back transaction or savepoint publishes none of its changes', async (t) => {
  await table(t, 'rolled')
  await db.query("SELECT sse_gateway.capture_changes('rolled')")
  const inbox = await listenOn(t, url, 'public.rolled')
  const client = await connect(t, url)
  await client.query('BEGIN')
  await client.query("INSERT INTO rolled (status) VALUES ('rolled back')")
  await client.query('ROLLBACK')
  await client.query('BEGIN')
  await client.query("INSERT INTO rolled (id, status) VALUES (1, 'kept')")
  await client.query('SAVEPOINT s')
  await client.query("UPDATE rolled SET status = 'undone'")
  await client.query("INSERT INTO rolled (id, status) VALUES (2, 'undone')")
  await client.query('ROLLBACK TO SAVEPOINT s')
  await client.query("UPDATE rolled SET status = 'kept and updated'")
  await client.query('COMMIT')
  const got = await changes(inbox, 'public.rolled', 2)
  t.same(got.map((c) => [c.op, c.new?.status]), [['INSERT', 'kept'], ['UPDATE', 'kept and updated']], 'only what committed')
  t.equal(inbox.messages.length, 2, 'nothing else')
})

t.test('TRUNCATE is one event without rows', async (t) => {
  await table(t, 'emptied')
  await db.query("SELECT sse_gateway.capture_changes('emptied')")
  const inbox = await listenOn(t, url, 'public.emptied')
  await db.query("INSERT INTO emptied (status) VALUES ('a'), ('b')")
  await db.query('TRUNCATE emptied')
  const got = await changes(inbox, 'public.emptied', 3)
  t.same(got[2], head('TRUNCATE', 'emptied'))
})

t.test('a row too large for MAX_PAYLOAD_BYTES becomes its primary key and "truncated": true; the write succeeds', async (t) => {
  await table(t, 'large', 'region text, n int, body text, PRIMARY KEY (region, n)')
  await db.query("SELECT sse_gateway.capture_changes('large')")
  await recordSettings(db, { maxPayloadBytes: 1000 })
  t.teardown(() => recordSettings(db, { maxPayloadBytes: 65536 }))
  const inbox = await listenOn(t, url, 'public.large')
  await db.query("INSERT INTO large VALUES ('eu', 1, repeat('x', 5000)), ('eu', 2, 'small')")
  await db.query("UPDATE large SET body = repeat('y', 3000) WHERE n = 2")
  await db.query('DELETE FROM large WHERE n = 1')
  const got = await changes(inbox, 'public.large', 4)
  t.same(got, [
    { ...head('INSERT', 'large'), truncated: true, new: { region: 'eu', n: 1 } },
    { ...head('INSERT', 'large'), new: { region: 'eu', n: 2, body: 'small' } },
    { ...head('UPDATE', 'large'), truncated: true, new: { region: 'eu', n: 2 }, old: { region: 'eu', n: 2 } },
    { ...head('DELETE', 'large'), truncated: true, old: { region: 'eu', n: 1 } }
  ])
  await table(t, 'keyless', 'body text')
  await db.query("SELECT sse_gateway.capture_changes('keyless')")
  const keyless = await listenOn(t, url, 'public.keyless')
  await db.query("INSERT INTO keyless VALUES (repeat('z', 5000))")
  t.same(await changes(keyless, 'public.keyless', 1), [{ ...head('INSERT', 'keyless'), truncated: true, new: {} }], 'without a primary key, no key')
})

t.test('options: another channel, some columns; capture_changes replaces, both calls are idempotent', async (t) => {
  await table(t, 'opts')
  const triggers = async (): Promise<string[]> =>
    (await db.query<{ name: string }>("SELECT tgname AS name FROM pg_trigger WHERE tgrelid = 'opts'::regclass ORDER BY 1")).rows.map((r) => r.name)
  await db.query("SELECT sse_gateway.capture_changes('opts')")
  const { rows: [again] } = await db.query<{ channel: string }>("SELECT sse_gateway.capture_changes('public.opts', 'shop:orders', ARRAY['status']) AS channel")
  t.equal(again?.channel, 'shop:orders')
  t.same(await triggers(), ['sse_gateway_capture_delete', 'sse_gateway_capture_insert', 'sse_gateway_capture_truncate', 'sse_gateway_capture_update'], 'one set of triggers')
  const inbox = await listenOn(t, url, 'shop:orders', 'public.opts')
  await db.query("INSERT INTO opts (status, total) VALUES ('picked', 5)")
  t.same(await changes(inbox, 'shop:orders', 1), [{ ...head('INSERT', 'opts'), new: { status: 'picked' } }], 'only the columns asked for, on the channel named')

  await db.query("SELECT sse_gateway.stop_capturing_changes('opts')")
  await db.query("SELECT sse_gateway.stop_capturing_changes('opts')")
  t.same(await triggers(), [], 'stop removes them, and may be called again')
  await db.query("INSERT INTO opts (status) VALUES ('not captured')")
  await db.query("SELECT pg_notify('shop:orders', 'sentinel')")
  await inbox.until(() => inbox.messages.length >= 2, 'the sentinel')
  t.same(inbox.messages.map((m) => m.payload?.startsWith('\x1f') === true ? 'event' : m.payload), ['event', 'sentinel'], 'nothing published after stop')
})

t.test('capture_changes refuses what the gateway could not deliver', async (t) => {
  await db.query('CREATE TABLE "with space" (id int)')
  t.teardown(() => db.query('DROP TABLE "with space"'))
  await t.rejects(db.query("SELECT sse_gateway.capture_changes('\"with space\"')"), { code: '22023' }, 'a table whose name is no channel name: name a channel')
  await db.query("SELECT sse_gateway.capture_changes('\"with space\"', 'spaced')")
  await db.query('INSERT INTO "with space" VALUES (1)')
  await t.rejects(db.query("SELECT sse_gateway.capture_changes('\"with space\"', 'bad channel')"), { code: '22023' }, 'a bad channel')
  await t.rejects(db.query("SELECT sse_gateway.capture_changes('\"with space\"', 'spaced', ARRAY['nope'])"), { code: '42703' }, 'a column the table lacks')
  await t.rejects(db.query("SELECT sse_gateway.capture_changes('no_such_table')"), { code: '42P01' }, 'a table that does not exist')
})

t.test('capturing changes none of the user\'s SQL: results, row counts and errors are as before', async (t) => {
  const twin = 'id int PRIMARY KEY, status text NOT NULL, total numeric CHECK (total >= 0)'
  await table(t, 'plain_twin', twin)
  await table(t, 'captured_twin', twin)
  await db.query("SELECT sse_gateway.capture_changes('captured_twin')")
  const run = async (name: string): Promise<unknown[]> => {
    const out: unknown[] = []
    const statements = [
      `INSERT INTO ${name} VALUES (1, 'a', 1), (2, 'b', 2) RETURNING *`,
      `INSERT INTO ${name} VALUES (2, 'c', 3) ON CONFLICT (id) DO UPDATE SET status = excluded.status RETURNING id, status`,
      `UPDATE ${name} SET total = total + 1 WHERE id > 0 RETURNING id, total`,
      `UPDATE ${name} SET total = 0 WHERE false`,
      `INSERT INTO ${name} VALUES (1, 'dup', 1)`,
      `INSERT INTO ${name} VALUES (3, NULL, 1)`,
      `UPDATE ${name} SET total = -1`,
      `DELETE FROM ${name} WHERE id = 1 RETURNING status`,
      `MERGE INTO ${name} AS t USING (VALUES (2), (5)) AS s(id) ON t.id = s.id WHEN MATCHED THEN UPDATE SET status = 'merged' WHEN NOT MATCHED THEN INSERT VALUES (s.id, 'new', 0)`,
      `SELECT * FROM ${name} ORDER BY id`
    ]
    for (const sql of statements) {
      try {
        const res = await db.query(sql)
        out.push({ command: res.command, rowCount: res.rowCount, rows: res.rows })
      } catch (err) {
        const e = err as pg.DatabaseError
        out.push({ code: e.code, message: e.message.replaceAll(name, 'T'), constraint: e.constraint?.replaceAll(name, 'T') })
      }
    }
    return out
  }
  t.same(await run('captured_twin'), await run('plain_twin'))
})

t.test('a role with no rights on the sse_gateway schema writes a captured table as before', async (t) => {
  await table(t, 'shared')
  await db.query("SELECT sse_gateway.capture_changes('shared')")
  const role = `pgsse_writer_${process.pid}`
  await db.query(`CREATE ROLE ${role}; GRANT INSERT, SELECT ON shared TO ${role}; GRANT USAGE ON SEQUENCE shared_id_seq TO ${role}`)
  t.teardown(async () => { await db.query(`DROP OWNED BY ${role}; DROP ROLE ${role}`) })
  const inbox = await listenOn(t, url, 'public.shared')
  const client = await connect(t, url)
  await client.query(`SET ROLE ${role}`)
  await t.rejects(client.query("SELECT sse_gateway.publish('x', 'y')"), { code: '42501' }, 'it may not publish itself')
  await client.query("INSERT INTO shared (status) VALUES ('by the app role')")
  t.same((await changes(inbox, 'public.shared', 1)).map((c) => c.new?.status), ['by the app role'])
})

t.test('through the gateway: a stream on the captured table\'s channel gets each change with an id, and resumes', async (t) => {
  const gateway = await startGateway(t)
  const sql = await connect(t, gateway.databaseUrl)
  await sql.query("CREATE TABLE orders (id int PRIMARY KEY, status text); SELECT sse_gateway.capture_changes('public.orders')")
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['public.orders']), subscriber(gateway))
  await sql.query("INSERT INTO orders VALUES (1, 'new'), (2, 'new')")
  await sql.query("UPDATE orders SET status = 'shipped' WHERE id = 2")
  const events = await within(stream.take(3), 'three changes')
  t.same(events.map((e) => e.event), ['public.orders', 'public.orders', 'public.orders'])
  t.same(events.map((e) => (JSON.parse(e.data) as RowChange).op), ['INSERT', 'INSERT', 'UPDATE'])
  t.same(JSON.parse(events[2]?.data ?? ''), { ...head('UPDATE', 'orders'), new: { id: 2, status: 'shipped' }, old: { id: 2, status: 'new' } })

  const resumed = await openStream(t, streamUrl(gateway.baseUrl, ['public.orders']), { ...subscriber(gateway), 'last-event-id': events[0]?.id as string })
  const replayed = await within(resumed.take(2), 'the replay')
  t.same(replayed, events.slice(1), 'a client resuming after the first change gets the other two, same ids and data')
})
