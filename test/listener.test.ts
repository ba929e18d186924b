import { once } from 'node:events'
import pg from 'pg'
import t from 'tap'
import { encodeNotification, migrate, publishEvents } from '../src/event-log.js'
import { LISTENER_APPLICATION_NAME, ListenerConnection, type ChannelEvent, type ListenerOptions } from '../src/listener.js'
import type { EventId } from '../src/event-id.js'
import { connect, createDatabase, publishedWithSql, readWireKey, seededRandom, Signal, type Teardown, waitFor } from './helper.js'

// What a listener emitted, with a way to wait for a condition on it instead of sleeping.
class Received {
  readonly events: ChannelEvent[] = []
  readonly errors: Error[] = []
  readonly #signal = new Signal()

  constructor (listener: ListenerConnection) {
    listener.on('event', (e) => { this.events.push(e); this.#signal.wake() })
    listener.on('error', (err) => { this.errors.push(err); this.#signal.wake() })
  }

  on (channel: string): ChannelEvent[] {
    return this.events.filter((e) => e.channel === channel)
  }

  /** Resolves once `predicate` holds; rejects after 10 s so a failure says what it waited for. */
  async until (predicate: () => boolean, what: string): Promise<void> {
    const got = (): string => this.events.map((e) => `${e.channel}#${e.id ?? '-'}:${JSON.stringify(e.data.slice(0, 20))}`).join(' ')
    await this.#signal.until(predicate, what, { got })
  }
}

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const pool = new pg.Pool({ connectionString: url, max: 2 })
t.teardown(() => pool.end())

let sentinels = 0

async function startListener (t: Teardown, options: Partial<ListenerOptions> = {}): Promise<{ listener: ListenerConnection, received: Received }> {
  const listener = new ListenerConnection({ connectionString: url, reconnectDelayMs: 5, reconnectDelayMaxMs: 20, ...options })
  const received = new Received(listener)
  await listener.connect()
  t.teardown(() => listener.close())
  await listener.listen('sentinel')
  return { listener, received }
}

/**
 * NOTIFYs a fresh payload on the sentinel channel and waits for it. Every
 * notification committed before it has then been delivered, or never will be.
 */
async function settle (received: Received): Promise<void> {
  const token = `sentinel ${++sentinels}`
  await db.query("SELECT pg_notify('sentinel', $1)", [token])
  await received.until(() => received.events.some((e) => e.channel === 'sentinel' && e.data === token), token)
}

async function notify (client: pg.ClientBase, channel: string, payload: string): Promise<void> {
  await client.query('SELECT pg_notify($1, $2)', [channel, payload])
}

async function publish (channel: string, payload: string): Promise<EventId> {
  return Number(await publishedWithSql(db, channel, payload))
}

/** Publishes through the pool, one transaction; the ids as the listener gives them. */
async function publishAll (events: Array<{ channel: string, payload: string }>): Promise<EventId[]> {
  return (await publishEvents(pool, events)).ids.map(Number)
}

/** The backend whose last statement was `sql`: lets a test find the listener's session among others. */
async function listenerPid (sql: string): Promise<number[]> {
  const { rows } = await db.query<{ pid: number }>(
    'SELECT pid FROM pg_stat_activity WHERE application_name = $1 AND datname = current_database() AND query LIKE $2',
    [LISTENER_APPLICATION_NAME, `%${sql}%`])
  return rows.map((r) => r.pid)
}

function sorted (values: Iterable<string>): string[] {
  return [...values].sort()
}

t.test('connects with its own application_name', async (t) => {
  const { listener } = await startListener(t)
  t.ok(listener.connected)
  await listener.listen('whoami-probe')
  const pids = await listenerPid('LISTEN "whoami-probe"')
  t.equal(pids.length, 1, `one ${LISTENER_APPLICATION_NAME} session on this database has LISTENed the probe`)
})

t.test('listen makes the channel LISTENed and delivered', async (t) => {
  const { listener, received } = await startListener(t)
  t.notOk(listener.channels.has('news'), 'not before listen')
  await listener.listen('news')
  t.ok(listener.channels.has('news'), 'the channels getter has it once listen resolves')
  // pg_listening_channels() is session-local: another session cannot see the
  // listener's channels, so delivery is what proves the LISTEN.
  const { rows } = await db.query<{ c: string }>('SELECT pg_listening_channels() AS c')
  t.same(rows, [], 'another session lists none of them')
  await notify(db, 'news', 'hello')
  await received.until(() => received.on('news').length === 1, 'the news')
  t.same(received.on('news'), [{ channel: 'news', id: undefined, data: 'hello' }])
  t.same(received.errors, [])
})

t.test('channel names are LISTENed exactly as given', async (t) => {
  const { listener, received } = await startListener(t)
  const names = ['Orders.EU', 'tenant:42:orders', 'with-dash', 'UPPER', 'a'.repeat(63), 'quote"d', 'sp ace']
  for (const name of names) await listener.listen(name)
  t.same(sorted(listener.channels), sorted([...names, 'sentinel']))
  for (const name of names) await notify(db, name, `to ${name}`)
  // Folded or otherwise altered names must not reach the exact ones.
  for (const other of ['orders.eu', 'ORDERS.EU', 'Orders', 'upper', 'tenant', 'quote', 'sp']) await notify(db, other, `to ${other}`)
  await settle(received)
  for (const name of names) t.same(received.on(name).map((e) => e.data), [`to ${name}`], `${name} gets its own notification only`)
  t.same(received.events.filter((e) => e.channel !== 'sentinel').length, names.length, 'nothing else arrives')
})

t.test('unlisten stops delivery', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('leaving')
  await notify(db, 'leaving', 'before')
  await received.until(() => received.on('leaving').length === 1, 'the first event')
  await listener.unlisten('leaving')
  t.notOk(listener.channels.has('leaving'), 'the channels getter drops it')
  await notify(db, 'leaving', 'after')
  await settle(received)
  t.same(received.on('leaving').map((e) => e.data), ['before'], 'nothing after unlisten')
  await listener.unlisten('never-listened')
  t.pass('unlisten of a channel never listened resolves')
})

t.test('a join racing a leave ends LISTENing', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('race')
  // The second time with the leave's UNLISTEN already on its way to the server.
  for (const [n, leave] of [[1, 'leave'], [2, 'an in-flight leave']] as const) {
    const leaving = listener.unlisten('race')
    if (n === 2) await new Promise((resolve) => setImmediate(resolve))
    const joining = listener.listen('race')
    await Promise.all([leaving, joining])
    t.ok(listener.channels.has('race'), `still LISTENed after ${leave} + join`)
    await notify(db, 'race', `event ${n}`)
    await received.until(() => received.on('race').length === n, `event ${n}`)
  }

  // And the other way round: a join immediately followed by a leave ends not LISTENing.
  const join2 = listener.listen('brief')
  const leave2 = listener.unlisten('brief')
  await Promise.all([join2, leave2])
  t.notOk(listener.channels.has('brief'))
  await notify(db, 'brief', 'nobody home')
  await settle(received)
  t.same(received.on('brief'), [])
})

t.test('random interleavings of listen and unlisten converge on the last wish', async (t) => {
  const { listener, received } = await startListener(t)
  const universe = ['r0', 'r1', 'R.2', 'r:3', 'r-4', 'r5']
  const seed = Number(process.env.LISTENER_SEED ?? Date.now() % 1_000_000)
  const rnd = seededRandom(seed)
  const pick = <T>(xs: readonly T[]): T => xs[Math.floor(rnd() * xs.length)] as T
  const wanted = new Set<string>()
  for (let round = 0; round < 25; round++) {
    const pending: Array<Promise<void>> = []
    for (let op = 0; op < 20; op++) {
      const channel = pick(universe)
      if (rnd() < 0.5) {
        wanted.add(channel)
        pending.push(listener.listen(channel))
      } else {
        wanted.delete(channel)
        pending.push(listener.unlisten(channel))
      }
      const pause = rnd()
      if (pause < 0.1) await pick(pending)
      else if (pause < 0.2) await new Promise((resolve) => setImmediate(resolve))
      else if (pause < 0.3) await Promise.resolve()
    }
    const outcomes = await Promise.allSettled(pending)
    const failed = outcomes.filter((o) => o.status === 'rejected')
    if (failed.length > 0) t.fail(`round ${round} (seed ${seed}): ${failed.length} calls rejected`)
    const expected = sorted(wanted)
    const actual = sorted([...listener.channels].filter((c) => c !== 'sentinel'))
    if (JSON.stringify(actual) !== JSON.stringify(expected)) {
      t.same(actual, expected, `round ${round} (seed ${seed}): the channels getter`)
      return
    }
    // What the server really LISTENs: every channel gets a notification, only the wanted ones arrive.
    const before = received.events.length
    await db.query('BEGIN')
    for (const c of universe) await notify(db, c, `round ${round}`)
    await db.query('COMMIT')
    await settle(received)
    const got = sorted(received.events.slice(before).filter((e) => e.data === `round ${round}`).map((e) => e.channel))
    if (JSON.stringify(got) !== JSON.stringify(expected)) {
      t.same(got, expected, `round ${round} (seed ${seed}): delivery`)
      return
    }
  }
  t.pass(`25 rounds converged (seed ${seed})`)
})

t.test('plain NOTIFY payloads arrive verbatim without an id', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('plain')
  const payloads = [
    'plain', '', 'two\nlines', 'ünïcödé ✓', '{"json":true}',
    '\x1f', '\x1fnot-an-id', '\x1fabc\nxyz', '\x1f\nempty id', '\x1f0\nzero', '\x1f01\nleading zero',
    '\x1f-5\nnegative', '\x1f12a\nx', ' \x1f12\nspace first', 'x'.repeat(7999)
  ]
  for (const p of payloads) await notify(db, 'plain', p)
  await received.until(() => received.on('plain').length === payloads.length, `${payloads.length} events`)
  t.same(received.on('plain'), payloads.map((data) => ({ channel: 'plain', id: undefined, data })))
  t.same(received.errors, [])
})

t.test('gateway events arrive with their id', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('gw')
  const a = await publish('gw', 'via sql')
  const [b, c] = await publishAll([{ channel: 'gw', payload: 'via pool' }, { channel: 'gw', payload: '\x1f99\nlooks like a marker' }])
  const d = await publish('gw', '')
  await received.until(() => received.on('gw').length === 4, 'four events')
  t.same(received.on('gw'), [
    { channel: 'gw', id: a, data: 'via sql' },
    { channel: 'gw', id: b, data: 'via pool' },
    { channel: 'gw', id: c, data: '\x1f99\nlooks like a marker' },
    { channel: 'gw', id: d, data: '' }
  ])
})

t.test('large payloads arrive complete and in id order among small ones', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('big')
  const large = (n: number): string => `large ${n} `.padEnd(10_000 + n, String(n % 10))
  const plan = ['small 1', large(1), 'small 2', large(2), large(3), 'small 3', large(4)]

  // One transaction each.
  const expected: ChannelEvent[] = []
  for (const data of plan) expected.push({ channel: 'big', id: await publish('big', data), data })
  // One batch.
  const batch = plan.map((data) => `batch ${data}`)
  const ids = await publishAll(batch.map((payload) => ({ channel: 'big', payload })))
  batch.forEach((data, i) => expected.push({ channel: 'big', id: ids[i], data }))

  await received.until(() => received.on('big').length >= expected.length, `${expected.length} events`)
  await settle(received)
  const got = received.on('big')
  t.same(got.map((e) => e.id), expected.map((e) => e.id), 'received in id order, none missing')
  t.ok(got.every((e, i) => e.data === expected[i]?.data), 'every payload complete')
  t.same(received.errors, [])
})

t.test('a notification forged to look like an event is plain text: it moves no position and replaces no payload', async (t) => {
  const { listener, received } = await startListener(t)
  await listener.listen('forged')
  const key = await readWireKey(db)
  const big = await publish('elsewhere', 'x'.repeat(9000))
  const before = listener.position
  // Any role may NOTIFY any channel: the old wire form, a reference to
  // another channel's row, a far id, a MAC made with another key, a genuine
  // notification of another channel replayed on this one.
  const forgeries = [
    `\x1f${big}`,
    '\x1f900000000000\nhello',
    `\x1f900000000000:${'0'.repeat(32)}\nhello`,
    encodeNotification(Buffer.alloc(32, 1), 900000000000, 'forged', 'hello'),
    encodeNotification(key, Number(big), 'elsewhere', undefined)
  ]
  for (const payload of forgeries) await notify(db, 'forged', payload)
  await settle(received)
  t.same(received.on('forged'), forgeries.map((data) => ({ channel: 'forged', id: undefined, data })), 'each delivered verbatim, without an id')
  t.equal(listener.position, before, 'the position did not move')

  // A real event after them is not taken for one already seen.
  const real = await publish('forged', 'real')
  await received.until(() => received.on('forged').some((e) => e.id === real), 'the real event')
  t.same(received.on('forged').at(-1), { channel: 'forged', id: real, data: 'real' }, 'the real event arrives with its id and payload')
  t.same(received.errors, [])
})

t.test('after its backend is terminated it reconnects and LISTENs every channel again', async (t) => {
  const { listener, received } = await startListener(t)
  const channels = ['Recon.A', 'recon:b', 'recon-c']
  for (const c of channels) await listener.listen(c)
  await listener.listen('recon-probe')
  const [pid] = await listenerPid('LISTEN "recon-probe"')
  t.ok(pid, 'found the listener\'s backend')

  const disconnected = once(listener, 'disconnected')
  const connected = once(listener, 'connected')
  const { rows } = await db.query<{ ok: boolean }>('SELECT pg_terminate_backend($1) AS ok', [pid])
  t.same(rows, [{ ok: true }], 'terminated')
  const [err] = await disconnected as [Error]
  t.type(err, Error, 'disconnected carries the cause')
  await connected
  t.ok(listener.connected, 'connected again')
  t.same(sorted(listener.channels), sorted([...channels, 'recon-probe', 'sentinel']), 'every wanted channel LISTENed again')

  // Its last query is now the catch-up read, not a LISTEN: look for any listener session.
  const pids = await listenerPid('')
  t.equal(pids.length, 1, 'one new session')
  t.not(pids[0], pid, 'on a new backend')

  const expected: ChannelEvent[] = []
  for (const c of channels) expected.push({ channel: c, id: await publish(c, `after ${c}`), data: `after ${c}` })
  await received.until(() => channels.every((c) => received.on(c).length === 1), 'one event per channel')
  t.same(channels.map((c) => received.on(c)[0]), expected, 'events published after reconnection arrive')
})

t.test('close', async (t) => {
  t.test('resolves, drops the connection and refuses further listens', async (t) => {
    const { listener } = await startListener(t)
    await listener.listen('close-probe')
    const [pid] = await listenerPid('LISTEN "close-probe"')
    t.ok(pid)
    await listener.close()
    t.notOk(listener.connected)
    t.equal(listener.channels.size, 0)
    await t.rejects(listener.listen('after-close'), /closed/)
    // The server notices the end a moment after the client: wait for it.
    await waitFor(async () => (await db.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid])).rows.length === 0, 'the backend to end').catch(() => {})
    t.same((await db.query('SELECT 1 FROM pg_stat_activity WHERE pid = $1', [pid])).rows, [], 'the backend is gone')
    await listener.close()
    t.pass('a second close resolves')
  })

  t.test('no reconnect after close, even when closed while disconnected', async (t) => {
    for (const when of ['in the disconnected handler', 'after disconnected'] as const) {
      const { listener, received } = await startListener(t, { reconnectDelayMs: 1, reconnectDelayMaxMs: 1 })
      await listener.listen(`gone-probe-${when.length}`)
      const [pid] = await listenerPid(`LISTEN "gone-probe-${when.length}"`)
      let reconnected = false
      listener.on('connected', () => { reconnected = true })
      let closing: Promise<void> | undefined
      if (when === 'in the disconnected handler') listener.once('disconnected', () => { closing = listener.close() })
      const disconnected = once(listener, 'disconnected')
      const timersBefore = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
      await db.query('SELECT pg_terminate_backend($1)', [pid])
      await disconnected
      if (closing === undefined) closing = listener.close()
      await closing
      // A pending reconnect is a pending timer: none may be left behind.
      const timersAfter = process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length
      t.equal(timersAfter, timersBefore, `closed ${when}: no reconnect timer left`)
      t.notOk(reconnected, `closed ${when}: not connected again`)
      t.notOk(listener.connected)
      t.same(received.errors, [])
    }
  })
})
