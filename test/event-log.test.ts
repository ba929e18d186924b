import pg from 'pg'
import t from 'tap'
import { MAX_EVENT_ID } from '../src/event-id.js'
import { INLINE_PAYLOAD_BYTES, SCHEMA_VERSION, decodeNotification, encodeNotification, migrate, publishEvents, readEvents } from '../src/event-log.js'
import { connect, consecutive, createDatabase, holdIdLock, listenOn, publishedWithSql, readWireKey, setLastDrawnId, type Teardown, waitFor } from './helper.js'

function poolFor (t: Teardown, url: string): pg.Pool {
  const pool = new pg.Pool({ connectionString: url, max: 4 })
  t.teardown(() => pool.end())
  return pool
}

// In a transaction of its own; the id is drawn at its commit.
async function publishSql (client: pg.ClientBase, channel: string | null, payload: string | null): Promise<string> {
  return await publishedWithSql(client, channel as string, payload as string)
}

async function publishedIds (client: pg.ClientBase): Promise<string[]> {
  const { rows } = await client.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')
  return (rows[0] as { ids: string[] }).ids
}

/** The last id drawn, committed or not. */
async function lastId (client: pg.ClientBase): Promise<bigint> {
  const { rows } = await client.query<{ id: string }>("SELECT pg_sequence_last_value('sse_gateway.event_ids')::text AS id")
  return BigInt((rows[0] as { id: string }).id)
}

// The log tests share one database, migrated once; the migration tests make their own.
const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const pool = poolFor(t, url)
const wireKey = await readWireKey(db)
/** The notification publish_batch sends for an inline event. */
const wire = (channel: string, id: string, payload: string): string => encodeNotification(wireKey, Number(id), channel, payload)

t.test('decodeNotification', async (t) => {
  const key = Buffer.alloc(32, 7)
  const genuine = (id: number, channel: string, data: string | undefined): string => encodeNotification(key, id, channel, data)

  t.test('a payload without the marker is plain', async (t) => {
    for (const payload of ['', 'plain', '42\nx', ' \x1f42\nx', 'x\x1f42\ny', '{"id":1}']) {
      t.equal(decodeNotification('c', payload, key), null, JSON.stringify(payload))
    }
  })

  t.test('a marker followed by anything but an id and a MAC is plain', async (t) => {
    const mac = genuine(1, 'c', 'x').slice(3, 35)
    const cases = [
      '\x1f', '\x1f\n', '\x1f\nx', '\x1fabc', '\x1fabc\nx', '\x1f1\nx', '\x1f1', `\x1f0:${mac}\nx`, `\x1f-1:${mac}\nx`,
      `\x1f 1:${mac}\nx`, `\x1f1 :${mac}\nx`, `\x1f1:${mac}0\nx`, `\x1f1:${mac.slice(1)}\nx`, `\x1f:${mac}\nx`,
      '\x1f' + '1'.repeat(20) + `:${mac}\nx`, `\x1f9007199254740992:${mac}\nx`, `\x1f\x1f1:${mac}\nx`
    ]
    for (const payload of cases) t.equal(decodeNotification('c', payload, key), null, JSON.stringify(payload))
  })

  t.test('a forged event is plain: any role may NOTIFY, only the key makes the MAC', async (t) => {
    t.equal(decodeNotification('c', genuine(9, 'c', 'x').replace('\nx', '\ny'), key), null, 'another payload')
    t.equal(decodeNotification('d', genuine(9, 'c', 'x'), key), null, 'another channel')
    t.equal(decodeNotification('c', genuine(9, 'c', 'x').replace('9:', '10:'), key), null, 'another id')
    t.equal(decodeNotification('c', genuine(9, 'c', undefined) + '\nx', key), null, 'a reference made inline')
    t.equal(decodeNotification('c', genuine(9, 'c', 'x').replace('\nx', ''), key), null, 'an inline event made a reference')
    t.equal(decodeNotification('c', encodeNotification(Buffer.alloc(32, 8), 9, 'c', 'x'), key), null, 'another key')
    t.equal(decodeNotification('c', genuine(9, 'c', 'x'), undefined), null, 'no key: no log, every notification is plain')
  })

  t.test('an inline event carries its id and its payload verbatim', async (t) => {
    t.same(decodeNotification('c', genuine(42, 'c', 'hello'), key), { id: 42, data: 'hello' })
    t.same(decodeNotification('c', genuine(1, 'c', ''), key), { id: 1, data: '' }, 'an empty payload is still inline')
    t.same(decodeNotification('c', genuine(7, 'c', 'a\nb\r\n'), key), { id: 7, data: 'a\nb\r\n' }, 'only the first newline separates')
    t.same(decodeNotification('c', genuine(7, 'c', '\x1f8\nx'), key), { id: 7, data: '\x1f8\nx' }, 'a payload may itself look like a marker')
    t.same(decodeNotification('c', genuine(MAX_EVENT_ID, 'c', 'max'), key), { id: MAX_EVENT_ID, data: 'max' }, 'the largest id')
  })

  t.test('a reference carries its id and no payload', async (t) => {
    const decoded = decodeNotification('c', genuine(123, 'c', undefined), key)
    t.same(decoded, { id: 123, data: undefined })
    t.equal(decoded?.data, undefined)
  })
})

const ALL_VERSIONS = Array.from({ length: SCHEMA_VERSION }, (_, i) => i + 1)

t.test('migrate', async (t) => {
  t.test('is idempotent: a second run changes nothing and keeps the log', async (t) => {
    const url = await createDatabase(t)
    const client = await connect(t, url)
    await migrate(client)
    const first = await publishSql(client, 'm', 'before')
    await migrate(client)
    const { rows } = await client.query<{ version: number }>('SELECT version FROM sse_gateway.schema_version ORDER BY version')
    t.same(rows.map((r) => r.version), ALL_VERSIONS, 'each migration recorded once')
    t.same(await readEvents(client, [first]), [{ id: first, channel: 'm', payload: 'before' }], 'the log survives')
    const second = await publishSql(client, 'm', 'after')
    t.equal(BigInt(second), BigInt(first) + 1n, 'the id sequence goes on where it was')
  })

  t.test('upgrades a log written by an older version, keeping its events and ids', async (t) => {
    const url = await createDatabase(t)
    const client = await connect(t, url)
    await migrate(client, 3)
    // Before version 7, publish drew its id at once and returned it.
    const publishOld = async (payload: string): Promise<string> =>
      (await client.query<{ id: string }>("SELECT sse_gateway.publish('upgrade', $1)::text AS id", [payload])).rows[0]?.id as string
    const old = [await publishOld('one'), await publishOld('two')]
    await migrate(client)
    t.same(await readEvents(client, old), [{ id: old[0], channel: 'upgrade', payload: 'one' }, { id: old[1], channel: 'upgrade', payload: 'two' }], 'the events survive')
    t.equal(await publishSql(client, 'upgrade', 'three'), String(BigInt(old[1] as string) + 1n), 'the ids go on')
    const { rows: [column] } = await client.query<{ collation: string }>(
      "SELECT collation_name AS collation FROM information_schema.columns WHERE table_schema = 'sse_gateway' AND table_name = 'events' AND column_name = 'channel'"
    )
    t.equal(column?.collation, 'C', 'channel names compare byte by byte')
  })

  t.test('version 7 changes what publish returns and keeps who may call it', async (t) => {
    const url = await createDatabase(t)
    const client = await connect(t, url)
    await migrate(client, 6)
    const role = `pgsse_app_${process.pid}`
    await client.query(`CREATE ROLE ${role}`)
    t.teardown(async () => {
      await client.query(`DROP OWNED BY ${role}`)
      await client.query(`DROP ROLE ${role}`)
    })
    await client.query(`REVOKE EXECUTE ON FUNCTION sse_gateway.publish(text, text) FROM PUBLIC;
      GRANT EXECUTE ON FUNCTION sse_gateway.publish(text, text) TO ${role}`)
    await migrate(client)
    const { rows: [may] } = await client.query<{ role: boolean, public: boolean, batch: boolean }>(
      `SELECT has_function_privilege($1, 'sse_gateway.publish(text, text)', 'EXECUTE') AS role,
        has_function_privilege('public', 'sse_gateway.publish(text, text)', 'EXECUTE') AS public,
        has_function_privilege($1, 'sse_gateway.publish_batch(text[], text[])', 'EXECUTE') AS batch`, [role])
    t.same(may, { role: true, public: false, batch: true }, 'the role keeps publish, PUBLIC does not get it back, publish_batch keeps the default')
    const { rows: [returns] } = await client.query<{ type: string }>("SELECT prorettype::regtype::text AS type FROM pg_proc WHERE oid = 'sse_gateway.publish(text, text)'::regprocedure")
    t.equal(returns?.type, 'void', 'publish returns nothing: the id is drawn at commit')
    const { rows: [now] } = await client.query<{ public: boolean }>(
      "SELECT has_function_privilege('public', 'sse_gateway.publish_batch_now(text[], text[])', 'EXECUTE') AS public")
    t.equal(now?.public, false, 'the gateway\'s own publish, which draws ids at once, is not for other roles')
  })

  t.test('is safe when run concurrently from several connections', async (t) => {
    const url = await createDatabase(t)
    const clients = await Promise.all([1, 2, 3, 4].map(() => connect(t, url)))
    const results = await Promise.allSettled(clients.map((c) => migrate(c)))
    t.same(results.map((r) => r.status), ['fulfilled', 'fulfilled', 'fulfilled', 'fulfilled'],
      results.map((r) => r.status === 'rejected' ? String(r.reason) : 'ok').join('; '))
    const client = clients[0] as pg.Client
    const { rows } = await client.query<{ version: number }>('SELECT version FROM sse_gateway.schema_version ORDER BY version')
    t.same(rows.map((r) => r.version), ALL_VERSIONS, 'each migration recorded once')
    t.equal(await lastId(client), 0n, 'one log head, untouched')
    t.equal(await publishSql(client, 'm', 'x'), '1', 'the log works')
  })
})

t.test('ids are returned in order, gap-free, one per event', async (t) => {
  const inbox = await listenOn(t, url, 'ids')
  const start = await lastId(db)

  const viaPool = (await publishEvents(pool, [1, 2, 3, 4, 5].map((i) => ({ channel: 'ids', payload: `pool ${i}` })))).ids
  t.equal(viaPool.length, 5, 'one id per event')
  t.equal(viaPool[0], String(start + 1n), 'the first id follows the log head')
  t.ok(consecutive(viaPool), `consecutive: ${viaPool.join(',')}`)

  await db.query("SELECT sse_gateway.publish_batch(ARRAY['ids', 'ids', 'ids'], ARRAY['sql 1', 'sql 2', 'sql 3'])")
  const viaBatch = await publishedIds(db)
  t.same(viaBatch, [6n, 7n, 8n].map((k) => String(start + k)), 'publish_batch goes on from there')

  const single = await publishSql(db, 'ids', 'sql single')
  t.equal(single, String(start + 9n), 'publish takes the next one')

  t.same((await publishEvents(pool, [])).ids, [], 'an empty batch has no ids')
  t.equal(await lastId(db), start + 9n, 'and takes none')

  const all = [...viaPool, ...viaBatch, single]
  const payloads = ['pool 1', 'pool 2', 'pool 3', 'pool 4', 'pool 5', 'sql 1', 'sql 2', 'sql 3', 'sql single']
  t.same(await readEvents(db, all), all.map((id, i) => ({ id, channel: 'ids', payload: payloads[i] })), 'one row per event')
  await inbox.until(() => inbox.messages.length >= 9, 'nine notifications')
  t.same(inbox.payloads('ids'), all.map((id, i) => wire('ids', id, payloads[i] as string)), 'one notification per event, in id order')
})

t.test('a rolled back publish delivers nothing, leaves no row and draws no id', async (t) => {
  const inbox = await listenOn(t, url, 'rollback')
  const tx = await connect(t, url)
  const before = await lastId(db)
  await tx.query('BEGIN')
  await tx.query("SELECT sse_gateway.publish('rollback', 'never')")
  await tx.query('ROLLBACK')

  const kept = await publishSql(db, 'rollback', 'committed')
  await inbox.until(() => inbox.messages.length >= 1, 'the committed event')
  t.same(inbox.payloads('rollback'), [wire('rollback', kept, 'committed')], 'only the committed event arrives')
  t.equal(BigInt(kept), before + 1n, 'the committed event takes the next id: no gap')
  const { rows } = await db.query("SELECT id FROM sse_gateway.events WHERE payload = 'never'")
  t.equal(rows.length, 0, 'no row left')
  const { rows: pending } = await db.query('SELECT FROM sse_gateway.pending_events')
  t.equal(pending.length, 0, 'nothing left staged')
})

t.test('a failed publishEvents rolls back the whole batch', async (t) => {
  const inbox = await listenOn(t, url, 'atomic')
  const before = await lastId(db)
  await t.rejects(publishEvents(pool, [{ channel: 'atomic', payload: 'ok' }, { channel: 'not valid', payload: 'bad' }]), { code: '22023' })
  t.equal(await lastId(db), before, 'no id taken')
  const id = await publishSql(db, 'atomic', 'sentinel')
  await inbox.until(() => inbox.messages.length >= 1, 'the sentinel')
  t.same(inbox.payloads('atomic'), [wire('atomic', id, 'sentinel')], 'the valid half of the batch was not delivered')
  const { rows } = await db.query("SELECT id FROM sse_gateway.events WHERE channel = 'atomic'")
  t.equal(rows.length, 1)
})

t.test('invalid channel names raise SQLSTATE 22023', async (t) => {
  const invalid = ['', ' ', 'has space', 'a'.repeat(64), 'ünï', 'semi;colon', 'new\nline', 'quo"te', 'slash/x', 'star*', '*']
  for (const channel of invalid) {
    await t.rejects(publishSql(db, channel, 'x'), { code: '22023' }, `publish ${JSON.stringify(channel)}`)
    await t.rejects(publishEvents(pool, [{ channel, payload: 'x' }]), { code: '22023' }, `publishEvents ${JSON.stringify(channel)}`)
  }
  await t.rejects(publishSql(db, null, 'x'), { code: '22023' }, 'a null channel')
  await t.rejects(db.query("SELECT sse_gateway.publish_batch(ARRAY['a', 'b'], ARRAY['x'])"), { code: '22023' }, 'arrays of different length')
  await t.rejects(db.query("SELECT sse_gateway.publish_batch(ARRAY[['a', 'b']], ARRAY[['x', 'y']])"), { code: '22023' }, 'two-dimensional arrays')
  await t.rejects(db.query("SELECT sse_gateway.publish_batch('[0:1]={a,b}'::text[], '[0:1]={x,y}'::text[])"), { code: '22023' }, 'arrays not indexed from 1')
  await t.rejects(publishSql(db, 'ok', null), { code: '22004' }, 'a null payload')

  const valid = ['a', 'a'.repeat(63), 'Orders.EU', 'tenant:42:orders', 'with-dash_and_underscore', '0']
  for (const channel of valid) t.ok(await publishSql(db, channel, 'x'), `${channel} is accepted`)
})

t.test('the wire format: inline up to INLINE_PAYLOAD_BYTES, a reference beyond', async (t) => {
  const inbox = await listenOn(t, url, 'wire')
  const cases: Array<[string, string, boolean]> = [
    ['small', 'hello', true],
    ['empty', '', true],
    ['lines', 'a\nb\r\nc', true],
    ['exactly the limit', 'x'.repeat(INLINE_PAYLOAD_BYTES), true],
    ['one byte over', 'x'.repeat(INLINE_PAYLOAD_BYTES + 1), false],
    ['the limit in two-byte characters', 'é'.repeat(INLINE_PAYLOAD_BYTES / 2), true],
    ['bytes count, not characters', 'é'.repeat(INLINE_PAYLOAD_BYTES / 2 + 1), false],
    ['far beyond what NOTIFY takes', 'y'.repeat(100_000), false]
  ]
  const ids: string[] = []
  for (const [, payload] of cases) ids.push(await publishSql(db, 'wire', payload))
  await inbox.until(() => inbox.messages.length >= cases.length, `${cases.length} notifications`)
  const rows = await readEvents(db, ids)
  const key = await readWireKey(db)
  cases.forEach(([name, payload, inline], i) => {
    const id = ids[i] as string
    const received = inbox.messages[i]?.payload
    // The MAC made in SQL is the one Node makes: HMAC-SHA-256 of the same UTF-8 bytes.
    t.equal(received, encodeNotification(key, Number(id), 'wire', inline ? payload : undefined), `${name}: ${inline ? '"\\x1f<id>:<mac>\\n<payload>"' : '"\\x1f<id>:<mac>"'}`)
    t.equal(rows[i]?.payload, payload, `${name}: the row holds the payload`)
    t.same(decodeNotification('wire', received ?? '', key), { id: Number(id), data: inline ? payload : undefined }, `${name}: decodes`)
  })
  t.equal(Buffer.byteLength(cases[5]?.[1] ?? ''), INLINE_PAYLOAD_BYTES, 'the two-byte case sits on the limit')
})

t.test('the log draws no id past MAX_EVENT_ID, the largest every reader takes', async (t) => {
  const url = await createDatabase(t)
  const db = await connect(t, url)
  await migrate(db)
  await setLastDrawnId(db, MAX_EVENT_ID - 2)
  await t.rejects(db.query("BEGIN; SELECT sse_gateway.publish_batch(ARRAY['edge', 'edge', 'edge'], ARRAY['1', '2', '3']); COMMIT"), { code: '23514' }, 'a batch that would go past it is refused whole (check_violation)')
  await db.query('ROLLBACK')
  t.equal(await publishSql(db, 'edge', 'next to last'), String(MAX_EVENT_ID - 1))
  t.equal(await publishSql(db, 'edge', 'last'), String(MAX_EVENT_ID), 'the largest id is drawn')
  await t.rejects(publishSql(db, 'edge', 'one more'), { code: '23514' }, 'the next is refused (check_violation)')
  const pool = new pg.Pool({ connectionString: url, max: 1 })
  t.teardown(() => pool.end())
  await t.rejects(publishEvents(pool, [{ channel: 'edge', payload: 'through the gateway' }]), { code: '23514' }, 'the gateway\'s publish too')
})

t.test('the lock every draw takes is ID_LOCK_KEY', async (t) => {
  const holder = await connect(t, url)
  await holdIdLock(holder)
  const waiting = publishEvents(pool, [{ channel: 'lock', payload: 'waits' }])
  await waitFor(async () => {
    const { rows } = await db.query("SELECT FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory'")
    return rows.length > 0
  }, 'the publish to wait on the advisory lock')
  await holder.query('COMMIT')
  t.equal((await waiting).ids.length, 1, 'and publishes once it is free')
})

t.test('two identical events in one batch are two notifications', async (t) => {
  const inbox = await listenOn(t, url, 'twins')
  // What the marker guards against: PostgreSQL folds identical channel+payload pairs of one transaction.
  const plain = await connect(t, url)
  await plain.query('BEGIN')
  await plain.query("SELECT pg_notify('twins', 'folded'), pg_notify('twins', 'folded')")
  await plain.query('COMMIT')

  const ids = (await publishEvents(pool, [{ channel: 'twins', payload: 'same' }, { channel: 'twins', payload: 'same' }])).ids
  await db.query("SELECT sse_gateway.publish_batch(ARRAY['twins', 'twins'], ARRAY['sql', 'sql'])")
  const sqlIds = await publishedIds(db)
  await inbox.until(() => inbox.messages.length >= 5, 'five notifications')
  t.same(inbox.payloads('twins'), [
    'folded',
    wire('twins', ids[0] as string, 'same'), wire('twins', ids[1] as string, 'same'),
    wire('twins', sqlIds[0] as string, 'sql'), wire('twins', sqlIds[1] as string, 'sql')
  ])
})
