import t from 'tap'
import { connect, errorBody, openStream, published, type StreamClient, startGateway, streamUrl, subscriber, type Test, type TestGateway, waitForData, within } from '../helper.js'

// GET /events?channel=…&filter=column=op.value: row filters on streams of a
// captured table, live and on resume, against a real gateway and database.

interface Row { id: number, status: string | null, total: number | null }

/** A gateway with public.orders captured; resolves with it and a SQL client. */
async function capturedOrders (t: Test): Promise<{ gateway: TestGateway, sql: Awaited<ReturnType<typeof connect>> }> {
  const gateway = await startGateway(t)
  const sql = await connect(t, gateway.databaseUrl)
  await sql.query("CREATE TABLE orders (id int PRIMARY KEY, status text, total numeric); SELECT sse_gateway.capture_changes('public.orders')")
  return { gateway, sql }
}

async function filtered (t: Test, gateway: TestGateway, filters: string[], headers: Record<string, string> = {}): Promise<StreamClient> {
  const url = new URL(streamUrl(gateway.baseUrl, ['public.orders']))
  for (const f of filters) url.searchParams.append('filter', f)
  return await openStream(t, url.toString(), { ...subscriber(gateway), ...headers })
}

/** The rows of the INSERT events a stream got, in order. */
const inserted = (stream: StreamClient): number[] => stream.events.map((e) => (JSON.parse(e.data) as { new: Row }).new.id)

const ROWS: Row[] = [
  { id: 1, status: 'new', total: 50 },
  { id: 2, status: 'shipped', total: 150 },
  { id: 3, status: 'shipped', total: 80 },
  { id: 4, status: null, total: 100 },
  { id: 5, status: 'paid', total: null },
  { id: 6, status: 'cancelled', total: 100.5 }
]
// Matches every stream below but is.null: the last event each waits for.
const LAST: Row = { id: 99, status: 'shipped', total: 100 }

t.test('every operator, on live row changes: each stream gets exactly the rows that pass', async (t) => {
  const { gateway, sql } = await capturedOrders(t)
  const cases: Array<[string[], number[]]> = [
    [['status=eq.shipped'], [2, 3, 99]],
    [['status=neq.shipped'], [1, 5, 6]],
    [['total=lt.100'], [1, 3]],
    [['total=lte.100'], [1, 3, 4, 99]],
    [['total=gt.100'], [2, 6]],
    [['total=gte.100'], [2, 4, 6, 99]],
    [['status=in.(new,paid,"shipped")'], [1, 2, 3, 5, 99]],
    [['status=is.null'], [4]],
    [['total=is.null'], [5]],
    [['status=eq.shipped', 'total=gte.100'], [2, 99]]
  ]
  const unfiltered = await openStream(t, streamUrl(gateway.baseUrl, ['public.orders']), subscriber(gateway))
  const streams = await Promise.all(cases.map(async ([filters]) => await filtered(t, gateway, filters)))
  for (const row of [...ROWS, LAST]) await sql.query('INSERT INTO orders VALUES ($1, $2, $3)', [row.id, row.status, row.total])
  await within(unfiltered.take(ROWS.length + 1), 'every row on the unfiltered stream')
  for (const [i, [filters, expected]] of cases.entries()) {
    const stream = streams[i] as StreamClient
    await within(stream.until(() => inserted(stream).includes(expected.at(-1) as number), 'its last row'), filters.join('&'))
    t.same(inserted(stream), expected, filters.join(' & '))
    const ids = new Map(unfiltered.events.map((e) => [(JSON.parse(e.data) as { new: Row }).new.id, e.id]))
    t.same(stream.events.map((e) => e.id), expected.map((id) => ids.get(id)), `${filters.join(' & ')}: with the ids of the log`)
  }
  t.equal(inserted(unfiltered).length, ROWS.length + 1, 'the unfiltered stream got every row')
})

t.test('updates and deletes are tested on their row; TRUNCATE reaches every filtered stream', async (t) => {
  const { gateway, sql } = await capturedOrders(t)
  const stream = await filtered(t, gateway, ['status=eq.shipped'])
  await sql.query("INSERT INTO orders VALUES (1, 'new', 1), (2, 'shipped', 2)")
  await sql.query("UPDATE orders SET status = 'shipped' WHERE id = 1")
  await sql.query("UPDATE orders SET status = 'returned' WHERE id = 2")
  await sql.query('DELETE FROM orders')
  await sql.query('TRUNCATE orders')
  await within(stream.until(() => stream.events.some((e) => e.data.includes('TRUNCATE')), 'the TRUNCATE'), 'the TRUNCATE')
  const ops = stream.events.map((e) => JSON.parse(e.data) as { op: string, new?: Row, old?: Row })
  t.same(ops.map((c) => [c.op, (c.new ?? c.old)?.id]), [['INSERT', 2], ['UPDATE', 1], ['DELETE', 1], ['TRUNCATE', undefined]],
    'the insert of 2, the update that shipped 1 (not the one that returned 2), the delete of shipped 1, the TRUNCATE')
})

t.test('filters on any JSON object\'s top-level fields; a payload that is no object never passes', async (t) => {
  const gateway = await startGateway(t)
  const url = new URL(streamUrl(gateway.baseUrl, ['alerts']))
  url.searchParams.append('filter', 'level=gte.3')
  const stream = await openStream(t, url.toString(), subscriber(gateway))
  await published(gateway, 'alerts', '{"level": 1}')
  await published(gateway, 'alerts', 'level 5, as text')
  await published(gateway, 'alerts', '[{"level": 5}]')
  const id = await published(gateway, 'alerts', '{"level": 4, "text": "disk"}')
  await waitForData(stream, '{"level": 4, "text": "disk"}')
  t.same(stream.events, [{ id, event: 'alerts', data: '{"level": 4, "text": "disk"}' }])
})

t.test('resume with filters replays only the events that pass, after the last id the client got, and goes live', async (t) => {
  const { gateway, sql } = await capturedOrders(t)
  const filters = ['status=eq.shipped']
  const first = await filtered(t, gateway, filters)
  for (const row of ROWS) await sql.query('INSERT INTO orders VALUES ($1, $2, $3)', [row.id, row.status, row.total])
  await within(first.until(() => inserted(first).includes(3), 'rows 2 and 3'), 'the live events')
  const [two, three] = first.events
  first.close()

  // Resumed after row 2: the replay has row 3 only, none of the others in between or after.
  const resumed = await filtered(t, gateway, filters, { 'last-event-id': two?.id as string })
  await sql.query('INSERT INTO orders VALUES ($1, $2, $3)', [LAST.id, LAST.status, LAST.total])
  await within(resumed.until(() => inserted(resumed).includes(99), 'row 99, live'), 'the resumed stream')
  t.same(inserted(resumed), [3, 99], 'row 3 from the log, then row 99 live: nothing missed, nothing repeated')
  t.same(resumed.events[0], three, 'the replayed event is the one the first stream got: same id, same data')

  // Resumed from the id of an event the filter passed over: the same.
  const { rows: [row4] } = await sql.query<{ id: string }>("SELECT id::text FROM sse_gateway.events WHERE payload LIKE '%\"id\": 4,%'")
  const fromSkipped = await filtered(t, gateway, filters, { 'last-event-id': row4?.id as string })
  await within(fromSkipped.until(() => inserted(fromSkipped).includes(99), 'row 99'), 'the replay from a skipped id')
  t.same(inserted(fromSkipped), [99], 'only what passes after it')
})

t.test('a malformed filter is a 400 naming it', async (t) => {
  const gateway = await startGateway(t)
  for (const bad of ['status=like.x', 'status', 'total=in.(1,2', 'note=is.maybe']) {
    const url = new URL(streamUrl(gateway.baseUrl, ['public.orders']))
    url.searchParams.append('filter', 'status=eq.ok')
    url.searchParams.append('filter', bad)
    const res = await fetch(url, { headers: subscriber(gateway) })
    const body = await errorBody(t, res, 400)
    t.match(body.message, `invalid filter ${JSON.stringify(bad)}`, `names ${bad}`)
  }
})

t.test('filters change nothing of who may read a channel', async (t) => {
  const gateway = await startGateway(t)
  const url = new URL(streamUrl(gateway.baseUrl, ['public.orders']))
  url.searchParams.append('filter', 'status=eq.shipped')
  const elsewhere = await fetch(url, { headers: { authorization: `Bearer ${gateway.token({ subscribe: ['public.other'] })}` } })
  await errorBody(t, elsewhere, 403)
  const none = await fetch(url)
  await errorBody(t, none, 401)
  const allowed = await fetch(url, { headers: { authorization: `Bearer ${gateway.token({ subscribe: ['public.*'] })}` } })
  t.equal(allowed.status, 200, 'a token that allows the channel')
  await allowed.body?.cancel()
})
