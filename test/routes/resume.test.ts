import type pg from 'pg'
import t from 'tap'
import { pruneLog } from '../../src/event-log.js'
import { connect, openStream, published, publishedBatch, type ReceivedEvent, startGateway, type StreamClient, streamUrl, subscriber, waitFor, waitForData, within } from '../helper.js'

async function logHead (db: pg.Client): Promise<string> {
  const { rows } = await db.query<{ id: string }>('SELECT sse_gateway.log_head_id()::text AS id')
  return (rows[0] as { id: string }).id
}

async function prunedThrough (db: pg.Client): Promise<string> {
  const { rows } = await db.query<{ id: string }>('SELECT pruned_through::text AS id FROM sse_gateway.log_retention')
  return (rows[0] as { id: string }).id
}

async function openEvent (stream: StreamClient): Promise<ReceivedEvent> {
  await within(stream.until(() => stream.control.length > 0, 'gateway/open'), 'gateway/open')
  return stream.control[0] as ReceivedEvent
}

const ids = (events: readonly ReceivedEvent[]): string[] => events.map((e) => e.id ?? '(none)')

function isAscending (list: readonly string[]): boolean {
  return list.every((id, i) => i === 0 || Number(id) > Number(list[i - 1]))
}

t.test('a new stream opens at the log head and gets what commits after', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  await published(gateway, 'news', 'before 1')
  await published(gateway, 'news', 'before 2')
  await published(gateway, 'other', 'before 3')

  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['news']), subscriber(gateway))
  const open = await openEvent(stream)
  const head = await logHead(db)
  t.equal(head, '3', 'three events were committed before the stream')
  t.equal(open.event, 'gateway/open')
  t.equal(open.id, head, 'the id of gateway/open is the log head')
  t.same(JSON.parse(open.data), { lastEventId: head, head }, 'its data names where the stream starts and the head')

  const first = await published(gateway, 'news', 'after 1')
  await published(gateway, 'other', 'elsewhere')
  const second = await published(gateway, 'news', 'after 2')
  await within(stream.take(2), '2 events')
  t.same(stream.events, [
    { id: first, event: 'news', data: 'after 1' },
    { id: second, event: 'news', data: 'after 2' }
  ], 'only events committed after the open, on the stream\'s channel')
  t.same(stream.control.map((e) => e.event), ['gateway/open'], 'no other gateway event')
})

for (const how of ['header', 'query'] as const) {
  t.test(`a stream resuming by ${how === 'header' ? 'Last-Event-ID' : '?lastEventId='} gets the events after the id on its channels, then live ones`, async (t) => {
    const gateway = await startGateway(t)
    const db = await connect(t, gateway.databaseUrl)
    const plan: Array<[string, string]> = [
      ['a', 'a1'], ['b', 'b1'], ['other', 'o1'], ['a', 'a2'],
      ['other', 'o2'], ['b', 'b2'], ['a', 'a3'], ['other', 'o3'], ['b', 'b3'], ['a', 'a4']
    ]
    const committed: ReceivedEvent[] = []
    for (const [channel, data] of plan) committed.push({ id: await published(gateway, channel, data), event: channel, data })
    const resumeFrom = committed[3]?.id as string
    t.equal(resumeFrom, '4')

    const url = streamUrl(gateway.baseUrl, ['a', 'b'], how === 'query' ? { lastEventId: resumeFrom } : {})
    const headers = how === 'header' ? { ...subscriber(gateway), 'last-event-id': resumeFrom } : subscriber(gateway)
    const stream = await openStream(t, url, headers)
    const open = await openEvent(stream)
    t.equal(open.id, resumeFrom, 'gateway/open carries the id resumed from')
    t.same(JSON.parse(open.data), { lastEventId: resumeFrom, head: await logHead(db) })

    const replayed = committed.filter((e) => Number(e.id) > Number(resumeFrom) && e.event !== 'other')
    t.same(ids(replayed), ['6', '7', '9', '10'], 'the expectation itself')
    await within(stream.take(replayed.length), 'the replay')

    const live: ReceivedEvent[] = []
    for (const [channel, data] of [['b', 'live b'], ['other', 'live other'], ['a', 'live a']] as const) {
      const id = await published(gateway, channel, data)
      if (channel !== 'other') live.push({ id, event: channel, data })
    }
    await waitForData(stream, 'live a')
    t.same(stream.events, [...replayed, ...live], 'exactly the replay then the live events, no duplicate at the seam')
    t.same(stream.control.map((e) => e.event), ['gateway/open'])
  })
}

t.test('Last-Event-ID wins over ?lastEventId=, and both resume', async (t) => {
  const gateway = await startGateway(t)
  const committed = await publishedBatch(gateway, ['e1', 'e2', 'e3', 'e4'].map((data) => ({ channel: 'c', data })))
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['c'], { lastEventId: '1' }), { ...subscriber(gateway), 'last-event-id': committed[2] as string })
  t.equal((await openEvent(stream)).id, committed[2])
  const last = await published(gateway, 'c', 'live')
  await waitForData(stream, 'live')
  t.same(ids(stream.events), [committed[3], last])
})

t.test('the seam between replay and live holds while events commit continuously', async (t) => {
  const gateway = await startGateway(t)
  const channel = 'load'
  // A log to replay: enough that the replay overlaps live traffic.
  const seeded = await publishedBatch(gateway, Array.from({ length: 400 }, (_, i) => ({ channel, data: `seed ${i}` })))
  const committed: string[] = [...seeded]
  const stop = new AbortController()
  const publisher = async (name: string): Promise<void> => {
    for (let i = 0; !stop.signal.aborted; i++) committed.push(await published(gateway, channel, `${name} ${i}`))
  }
  const publishers = [publisher('p0'), publisher('p1')]
  t.teardown(async () => {
    stop.abort()
    await Promise.allSettled(publishers)
  })

  // Streams resuming from older and older ids, opened while commits go on.
  const resumed: Array<{ from: string, stream: StreamClient }> = []
  for (let k = 0; k < 8; k++) {
    const at = committed.length
    await waitFor(() => committed.length >= at + 5, 'more commits')
    const from = committed[Math.max(0, committed.length - 50 - 40 * k)] as string
    resumed.push({ from, stream: await openStream(t, streamUrl(gateway.baseUrl, [channel]), { ...subscriber(gateway), 'last-event-id': from }) })
  }
  const at = committed.length
  await waitFor(() => committed.length >= at + 20, 'commits after the last stream opened')
  stop.abort()
  await Promise.all(publishers)
  const sentinel = await published(gateway, channel, 'sentinel')

  const all = committed.map(Number).sort((x, y) => x - y)
  t.same(all, Array.from({ length: all.length }, (_, i) => i + 1), 'the committed ids have no gap')
  for (const { from, stream } of resumed) {
    await waitForData(stream, 'sentinel')
    const got = ids(stream.events)
    t.equal((await openEvent(stream)).id, from, `stream from ${from} opens there`)
    t.ok(isAscending(got), `stream from ${from}: ids ascend, no duplicate`)
    t.same(got, [...all.filter((id) => id > Number(from)), Number(sentinel)].map(String), `stream from ${from}: exactly the ids committed after it`)
  }
})

t.test('a client reconnecting at random moments with its last id sees every event once, in order', async (t) => {
  const gateway = await startGateway(t)
  const channels = ['p.even', 'p.odd']
  const PUBLISHERS = 4
  const EACH = 50
  const committed = new Map<string, { channel: string, data: string }>()
  const publishing = { running: PUBLISHERS }
  const publishers = Array.from({ length: PUBLISHERS }, async (_, p) => {
    try {
      for (let seq = 0; seq < EACH; seq++) {
        const channel = channels[p % 2] as string
        const data = JSON.stringify({ p, seq })
        committed.set(await published(gateway, channel, data), { channel, data })
      }
    } finally {
      publishing.running--
    }
  })
  t.teardown(async () => { await Promise.allSettled(publishers) })
  const allPublished = Promise.all(publishers)

  const seen: ReceivedEvent[] = []
  // The publishers start before the first connection: the client starts
  // from the log's beginning, as one that kept its place would.
  let lastId = '0'
  let connections = 0
  const headers = subscriber(gateway)
  const connectOnce = async (): Promise<StreamClient> => {
    const stream = await openStream(t, streamUrl(gateway.baseUrl, channels), { ...headers, 'last-event-id': lastId })
    connections++
    if (stream.response.status !== 200) throw new Error(`reconnect answered ${stream.response.status}`)
    return stream
  }
  const collect = async (stream: StreamClient): Promise<void> => {
    stream.close()
    await within(stream.done, 'the stream to end')
    const open = stream.control[0]
    t.equal(open?.id, lastId, 'the stream opens at the id it resumed from')
    t.same(stream.control.slice(1), [], 'no gateway/missed nor gap')
    seen.push(...stream.events)
    // The last id the client saw: its last event's, else gateway/open's.
    lastId = stream.events.at(-1)?.id ?? open?.id ?? lastId
  }

  while (publishing.running > 0) {
    const stream = await connectOnce()
    // Close after a random number of events: 0 closes it during its replay.
    const wanted = Math.floor(Math.random() * 12)
    // Or until the publishers are done: no more events may come.
    await within(Promise.race([stream.until(() => stream.events.length >= wanted, `${wanted} events`), allPublished]), `${wanted} events`)
    await collect(stream)
  }
  await allPublished
  const last = await connectOnce()
  const sentinel = await published(gateway, channels[0] as string, 'sentinel')
  await waitForData(last, 'sentinel')
  await collect(last)

  t.ok(connections > 3, `the client reconnected (${connections} connections)`)
  const got = seen.filter((e) => e.data !== 'sentinel')
  t.equal(seen.at(-1)?.id, sentinel, 'the sentinel is last')
  t.ok(isAscending(ids(seen)), 'ids ascend across every connection: no duplicate, no reordering')
  const expected = [...committed.keys()].sort((x, y) => Number(x) - Number(y))
  t.equal(expected.length, PUBLISHERS * EACH)
  t.same(ids(got), expected, 'the union of the connections is exactly the committed events')
  t.same(got.map((e) => ({ event: e.event, data: e.data })), expected.map((id) => ({ event: committed.get(id)?.channel, data: committed.get(id)?.data })), 'each with its channel and payload')
  for (let p = 0; p < PUBLISHERS; p++) {
    const order = got.map((e) => JSON.parse(e.data) as { p: number, seq: number }).filter((d) => d.p === p).map((d) => d.seq)
    t.same(order, Array.from({ length: EACH }, (_, i) => i), `publisher ${p}'s events in its own order`)
  }
})

t.test('a malformed Last-Event-ID is refused with 400 and the gateway goes on', async (t) => {
  const gateway = await startGateway(t)
  const headers = subscriber(gateway)
  const url = streamUrl(gateway.baseUrl, ['c'])
  for (const bad of ['abc', '-1', '1.5', '1e3', '0x10', '12abc', '9'.repeat(16), '9'.repeat(400)]) {
    for (const how of ['header', 'query'] as const) {
      await t.test(`${JSON.stringify(bad.length > 20 ? `${bad.slice(0, 5)}… (${bad.length} digits)` : bad)} by ${how}`, async (t) => {
        const res = how === 'header'
          ? await fetch(url, { headers: { ...headers, 'last-event-id': bad } })
          : await fetch(streamUrl(gateway.baseUrl, ['c'], { lastEventId: bad }), { headers })
        t.equal(res.status, 400)
        t.match(res.headers.get('content-type'), /^application\/json/)
        const body = await res.json() as Record<string, unknown>
        t.same(Object.keys(body).sort(), ['error', 'message', 'statusCode'], 'error body is {statusCode, error, message}')
        t.match(body, { statusCode: 400, error: 'Bad Request', message: /Last-Event-ID/ })
      })
    }
  }
  t.same([...gateway.app.listener.channels], [], 'nothing was LISTENed for a refused stream')
  t.equal(gateway.app.streams.size, 0, 'no stream is left open')

  const stream = await openStream(t, url, headers)
  t.equal(stream.response.status, 200)
  const id = await published(gateway, 'c', 'still delivering')
  await waitForData(stream, 'still delivering')
  t.same(stream.events, [{ id, event: 'c', data: 'still delivering' }])
})

t.test('every id the log can hold is taken as Last-Event-ID, by header and by query', async (t) => {
  const gateway = await startGateway(t)
  const headers = subscriber(gateway)
  const largest = String(Number.MAX_SAFE_INTEGER)
  for (const [how, url, extra] of [
    ['header', streamUrl(gateway.baseUrl, ['c']), { 'last-event-id': largest }],
    ['query', streamUrl(gateway.baseUrl, ['c'], { lastEventId: largest }), {}],
    ['header with leading zeros', streamUrl(gateway.baseUrl, ['c']), { 'last-event-id': '000' + largest }]
  ] as const) {
    const stream = await openStream(t, url, { ...headers, ...extra })
    t.equal(stream.response.status, 200, `${how}: 200, the stream goes on`)
    await within(stream.until(() => stream.control.length >= 2, 'gateway/missed'), 'gateway/missed')
    t.match(stream.control[1], { event: 'gateway/missed', data: JSON.stringify({ lastEventId: largest, resumedAfter: '0' }) }, `${how}: beyond the head, so missed`)
  }
  const res = await fetch(streamUrl(gateway.baseUrl, ['c']), { headers: { ...headers, 'last-event-id': String(Number.MAX_SAFE_INTEGER + 1) } })
  t.equal(res.status, 400, 'one more than any id the log can hold is refused')
  await res.body?.cancel()
})

t.test('an id beyond the head gets gateway/missed, then live events', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  await published(gateway, 'c', 'old 1')
  await published(gateway, 'c', 'old 2')
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['c']), { ...subscriber(gateway), 'last-event-id': '1000' })
  t.equal(stream.response.status, 200)
  await within(stream.until(() => stream.arrived.length >= 2, 'gateway/open and gateway/missed'), 'gateway/open and gateway/missed')
  const head = await logHead(db)
  t.equal(head, '2')
  const live = await published(gateway, 'c', 'live')
  await waitForData(stream, 'live')
  t.same(stream.arrived, [
    { id: head, event: 'gateway/open', data: JSON.stringify({ lastEventId: head, head }) },
    { id: undefined, event: 'gateway/missed', data: JSON.stringify({ lastEventId: '1000', resumedAfter: head }) },
    { id: live, event: 'c', data: 'live' }
  ], 'the stream starts at the head and replays nothing')
})

t.test('resuming from an id retention pruned gets gateway/missed, the retained events, then live ones', async (t) => {
  const gateway = await startGateway(t, { RETENTION_MAX_EVENTS: '5', RETENTION_INTERVAL_MS: '50' })
  const db = await connect(t, gateway.databaseUrl)
  const committed: ReceivedEvent[] = []
  for (let i = 1; i <= 14; i++) {
    const channel = i % 4 === 0 ? 'other' : 'kept'
    committed.push({ id: await published(gateway, channel, `e${i}`), event: channel, data: `e${i}` })
  }
  // The timer prunes down to the newest 5 events.
  await waitFor(async () => await prunedThrough(db) === '9', 'pruned_through to reach 9')
  const { rows } = await db.query<{ id: string }>('SELECT id::text AS id FROM sse_gateway.events ORDER BY id')
  t.same(rows.map((r) => r.id), ['10', '11', '12', '13', '14'], 'the log keeps the newest 5 events')

  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['kept']), { ...subscriber(gateway), 'last-event-id': '2' })
  t.equal(stream.response.status, 200)
  const retained = committed.filter((e) => Number(e.id) > 9 && e.event === 'kept')
  t.same(ids(retained), ['10', '11', '13', '14'], 'the expectation itself')
  await within(stream.until(() => stream.arrived.length >= 2 + retained.length, 'the retained events'), 'the retained events')
  const live = await published(gateway, 'kept', 'live')
  await waitForData(stream, 'live')
  t.same(stream.arrived, [
    { id: '9', event: 'gateway/open', data: JSON.stringify({ lastEventId: '9', head: '14' }) },
    { id: undefined, event: 'gateway/missed', data: JSON.stringify({ lastEventId: '2', resumedAfter: '9' }) },
    ...retained,
    { id: live, event: 'kept', data: 'live' }
  ])

  // An id the log still holds resumes without gateway/missed.
  const inside = await openStream(t, streamUrl(gateway.baseUrl, ['kept']), { ...subscriber(gateway), 'last-event-id': '12' })
  await waitForData(inside, 'live')
  t.same(inside.arrived.map((e) => [e.event, e.id]), [['gateway/open', '12'], ['kept', '13'], ['kept', '14'], ['kept', live]])
})

t.test('a stream resuming while retention prunes never skips events unannounced', async (t) => {
  const gateway = await startGateway(t, { RETENTION_MAX_EVENTS: '10', RETENTION_INTERVAL_MS: '10' })
  const db = await connect(t, gateway.databaseUrl)
  const channel = 'churn'
  const stop = new AbortController()
  let committed = 0
  const publisher = (async () => {
    while (!stop.signal.aborted) {
      await publishedBatch(gateway, Array.from({ length: 5 }, (_, i) => ({ channel, data: `x${i}` })))
      committed += 5
    }
  })()
  t.teardown(async () => {
    stop.abort()
    await publisher.catch(() => {})
  })
  await waitFor(() => committed >= 50, 'a log to prune')

  // Each stream resumes from the edge of what retention keeps, where a prune
  // may land between reading the bounds and reading the log.
  const streams: Array<{ from: string, stream: StreamClient }> = []
  for (let k = 0; k < 40; k++) {
    const from = await prunedThrough(db)
    streams.push({ from, stream: await openStream(t, streamUrl(gateway.baseUrl, [channel]), { ...subscriber(gateway), 'last-event-id': from }) })
  }
  stop.abort()
  await publisher
  const sentinel = await published(gateway, channel, 'sentinel')
  for (const { from, stream } of streams) {
    await waitForData(stream, 'sentinel')
    // Every event is on this channel: after the id the stream says it
    // resumed after, each id must follow the previous one.
    let position = Number(stream.arrived[0]?.id)
    const skipped: string[] = []
    for (const e of stream.arrived.slice(1)) {
      if (e.event === 'gateway/missed') {
        position = Number((JSON.parse(e.data) as { resumedAfter: string }).resumedAfter)
      } else if (e.id !== undefined) {
        if (Number(e.id) !== position + 1) skipped.push(`${position + 1}..${Number(e.id) - 1}`)
        position = Number(e.id)
      }
    }
    t.same(skipped, [], `stream from ${from} skips nothing it was not told about`)
    t.equal(String(position), sentinel, `stream from ${from} reaches the sentinel`)
  }
})

t.test('pruneLog keeps the newest events and records how far it pruned', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const pool = gateway.app.pg.pool
  const policy = { maxAgeSeconds: 86400, maxEvents: 3, idempotencyWindowSeconds: 86400 }
  t.equal(await pruneLog(pool, policy), 0, 'an empty log has nothing to prune')
  t.equal(await prunedThrough(db), '0')

  await publishedBatch(gateway, Array.from({ length: 8 }, (_, i) => ({ channel: 'c', data: `e${i + 1}` })))
  t.equal(await pruneLog(pool, policy), 5, 'deletes all but the newest 3')
  t.equal(await prunedThrough(db), '5')
  t.equal(await pruneLog(pool, policy), 0, 'a second run deletes nothing')
  t.equal(await pruneLog(pool, { ...policy, maxEvents: 100 }), 0, 'a looser policy never moves pruned_through back')
  t.equal(await prunedThrough(db), '5')

  // By age: events older than maxAgeSeconds go, even within maxEvents.
  await db.query("UPDATE sse_gateway.events SET created_at = now() - interval '2 hours' WHERE id <= 7")
  t.equal(await pruneLog(pool, { ...policy, maxAgeSeconds: 3600 }), 2, 'deletes the events older than the age')
  t.equal(await prunedThrough(db), '7')
  const { rows } = await db.query<{ id: string }>('SELECT id::text AS id FROM sse_gateway.events ORDER BY id')
  t.same(rows.map((r) => r.id), ['8'])
})
