import t from 'tap'
import { migrate } from '../src/event-log.js'
import { ChannelHub, type ChannelListener, type EventSink } from '../src/hub.js'
import { ListenerConnection, type ChannelEvent } from '../src/listener.js'
import { encodeEvent } from '../src/sse.js'
import { connect, createDatabase, publishedWithSql, Signal, type Teardown } from './helper.js'

// Wakes whoever waits on what arrived, instead of sleeping.
const signal = new Signal()

/** A sink that keeps every chunk written to it. */
class RecordingSink implements EventSink {
  readonly chunks: Buffer[] = []

  write (chunk: Buffer): void {
    this.chunks.push(chunk)
    signal.wake()
  }

  get text (): string[] {
    return this.chunks.map((c) => c.toString())
  }
}

/** The real listener, with its listen/unlisten calls counted and their promises kept. */
class CountingListener implements ChannelListener {
  readonly listens: string[] = []
  readonly unlistens: string[] = []
  readonly inFlight: Array<Promise<void>> = []
  readonly #listener: ListenerConnection

  constructor (listener: ListenerConnection) {
    this.#listener = listener
  }

  listen (channel: string): Promise<void> {
    this.listens.push(channel)
    const p = this.#listener.listen(channel)
    this.inFlight.push(p.catch(() => {}))
    return p
  }

  unlisten (channel: string): Promise<void> {
    this.unlistens.push(channel)
    const p = this.#listener.unlisten(channel)
    this.inFlight.push(p.catch(() => {}))
    return p
  }

  /** Resolves once every LISTEN and UNLISTEN issued so far has run. */
  async settled (): Promise<void> {
    await Promise.all(this.inFlight)
  }
}

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)

let sentinels = 0

interface Setup {
  listener: ListenerConnection
  counting: CountingListener
  hub: ChannelHub
  /** What hub.deliver returned, per event. */
  delivered: Array<[ChannelEvent, number]>
}

async function setup (t: Teardown, { connected = true } = {}): Promise<Setup> {
  const listener = new ListenerConnection({ connectionString: url })
  listener.on('error', (err) => { throw err })
  const counting = new CountingListener(listener)
  const hub = new ChannelHub(counting)
  const delivered: Array<[ChannelEvent, number]> = []
  listener.on('event', (e) => { delivered.push([e, hub.deliver(e)]); signal.wake() })
  if (connected) await listener.connect()
  t.teardown(() => listener.close())
  return { listener, counting, hub, delivered }
}

async function publish (channel: string, payload: string): Promise<string> {
  return await publishedWithSql(db, channel, payload)
}

/**
 * Publishes a fresh event on `channel`, which `sink` must be subscribed to,
 * and waits for it: every event committed before it has then been delivered.
 */
async function settle (sink: RecordingSink, channel: string): Promise<void> {
  const token = `sentinel ${++sentinels}`
  const id = await publish(channel, token)
  const frame = encodeEvent({ id, event: channel, data: token })
  await signal.until(() => sink.text.includes(frame), token)
}

t.test('one LISTEN per channel however many sinks; the last to leave UNLISTENs', async (t) => {
  const { listener, counting, hub } = await setup(t)
  const sinks = [1, 2, 3, 4].map(() => new RecordingSink())
  // Two join together, two one after the other.
  const together = await Promise.all(sinks.slice(0, 2).map((s) => hub.subscribe(['shared'], s)))
  const later = [await hub.subscribe(['shared'], sinks[2] as RecordingSink), await hub.subscribe(['shared'], sinks[3] as RecordingSink)]
  const leaves = [...together, ...later]
  t.same(counting.listens, ['shared'], 'one LISTEN')
  t.ok(listener.channels.has('shared'))
  t.equal(hub.subscriberCount('shared'), 4)
  t.equal(hub.channelCount, 1)

  for (const leave of leaves.slice(0, 3)) leave()
  await counting.settled()
  t.same(counting.unlistens, [], 'no UNLISTEN while a sink remains')
  t.ok(listener.channels.has('shared'))
  t.equal(hub.subscriberCount('shared'), 1)

  const id = await publish('shared', 'to the last one')
  await signal.until(() => (sinks[3] as RecordingSink).chunks.length === 1, 'the event')
  t.same((sinks[3] as RecordingSink).text, [encodeEvent({ id, event: 'shared', data: 'to the last one' })])

  ;(leaves[3] as () => void)()
  await counting.settled()
  t.same(counting.unlistens, ['shared'], 'the last sink leaving UNLISTENs')
  t.notOk(listener.channels.has('shared'), 'the listener no longer LISTENs')
  t.equal(hub.channelCount, 0)
  t.equal(hub.subscriberCount('shared'), 0)

  // Nothing reaches anyone after the UNLISTEN.
  const witness = new RecordingSink()
  await hub.subscribe(['witness'], witness)
  await publish('shared', 'after the last left')
  await settle(witness, 'witness')
  t.ok(sinks.every((s) => !s.text.some((f) => f.includes('after the last left'))), 'no sink got the later event')
})

t.test('an event is framed once and every sink on its channel gets the same bytes', async (t) => {
  const { hub, delivered } = await setup(t)
  const here = [1, 2, 3].map(() => new RecordingSink())
  const elsewhere = new RecordingSink()
  for (const s of here) await hub.subscribe(['framed'], s)
  await hub.subscribe(['other'], elsewhere)

  const id = await publish('framed', 'line one\nline two')
  await signal.until(() => here.every((s) => s.chunks.length === 1), 'the event on every sink')
  const [first, ...rest] = here.map((s) => s.chunks[0] as Buffer)
  for (const chunk of rest) t.equal(chunk, first, 'the same Buffer instance')
  t.equal(first?.toString(), encodeEvent({ id, event: 'framed', data: 'line one\nline two' }), 'framed as SSE with id and channel')

  await settle(elsewhere, 'other')
  t.equal(elsewhere.chunks.length, 1, 'a sink on another channel got only its own event')
  t.ok(here.every((s) => s.chunks.length === 1), 'and the sinks here nothing of it')
  t.same(delivered.map(([e, n]) => [e.channel, n]), [['framed', 3], ['other', 1]], 'deliver returns the number of sinks written')
})

t.test('a sink on several channels gets the events of each', async (t) => {
  const { hub } = await setup(t)
  const sink = new RecordingSink()
  const leave = await hub.subscribe(['multi.a', 'multi:b', 'multi-c'], sink)
  const expected: string[] = []
  for (const [channel, data] of [['multi.a', 'one'], ['multi:b', 'two'], ['multi-c', 'three'], ['multi.a', 'four']] as const) {
    expected.push(encodeEvent({ id: await publish(channel, data), event: channel, data }))
  }
  await signal.until(() => sink.chunks.length === expected.length, `${expected.length} events`)
  t.same(sink.text, expected, 'each, in order')
  leave()
  t.equal(hub.channelCount, 0, 'leaving removes it from every channel')
})

t.test('the function subscribe returns is idempotent', async (t) => {
  const { counting, hub } = await setup(t)
  const a = new RecordingSink()
  const b = new RecordingSink()
  const leaveA = await hub.subscribe(['idem'], a)
  const leaveB = await hub.subscribe(['idem'], b)
  leaveA()
  leaveA()
  leaveA()
  await counting.settled()
  t.equal(hub.subscriberCount('idem'), 1, 'the other sink stays')
  t.same(counting.unlistens, [], 'no UNLISTEN from repeated calls')
  await settle(b, 'idem')
  t.equal(a.chunks.length, 0, 'the sink that left gets nothing')

  leaveB()
  leaveB()
  await counting.settled()
  t.same(counting.unlistens, ['idem'], 'one UNLISTEN')
  t.equal(hub.channelCount, 0)

  // The same sink may subscribe again; an old leave must not remove the new subscription.
  const leaveAgain = await hub.subscribe(['idem'], a)
  leaveA()
  t.equal(hub.subscriberCount('idem'), 1, 'a stale leave does not touch a new subscription')
  await settle(a, 'idem')
  leaveAgain()
})

t.test('a leave racing a join keeps the channel LISTENed', async (t) => {
  const { listener, hub } = await setup(t)
  const first = new RecordingSink()
  const second = new RecordingSink()
  const leave = await hub.subscribe(['relay'], first)
  leave()
  await hub.subscribe(['relay'], second)
  t.ok(listener.channels.has('relay'), 'LISTENed once the new subscription resolved')
  await settle(second, 'relay')
  t.equal(first.chunks.length, 0)
})

t.test('subscribe rejects and leaves no trace when the listener cannot LISTEN', async (t) => {
  t.test('when it was never connected', async (t) => {
    const { listener, counting, hub } = await setup(t, { connected: false })
    await t.rejects(hub.subscribe(['nowhere'], new RecordingSink()), /not connected/)
    t.equal(hub.channelCount, 0)
    t.equal(hub.subscriberCount('nowhere'), 0)
    await counting.settled()
    await listener.connect()
    t.same([...listener.channels], [], 'connecting later LISTENs nothing left behind')
  })

  t.test('when it is closed', async (t) => {
    const { listener, hub } = await setup(t)
    const stays = new RecordingSink()
    await hub.subscribe(['kept'], stays)
    await listener.close()
    const sink = new RecordingSink()
    await t.rejects(hub.subscribe(['kept', 'new-one'], sink), /closed/)
    t.equal(hub.subscriberCount('new-one'), 0)
    t.equal(hub.subscriberCount('kept'), 1, 'only the earlier sink remains on a channel it shared')
    t.equal(hub.channelCount, 1)
    t.equal(hub.deliver({ channel: 'kept', id: 1, data: 'x' }), 1)
    t.same(sink.chunks, [], 'the rejected sink gets nothing')
    t.equal(stays.chunks.length, 1)
  })
})

t.test('deliver returns the number of sinks written', async (t) => {
  const { hub } = await setup(t)
  t.equal(hub.deliver({ channel: 'nobody', id: undefined, data: 'x' }), 0, 'no sinks, nothing written')
  const sinks = [1, 2, 3].map(() => new RecordingSink())
  for (const [i, s] of sinks.entries()) await hub.subscribe(i === 0 ? ['count', 'count-other'] : ['count'], s)
  t.equal(hub.deliver({ channel: 'count', id: undefined, data: 'plain' }), 3)
  t.equal(hub.deliver({ channel: 'count-other', id: 5, data: 'x' }), 1)
  t.same(sinks.map((s) => s.chunks.length), [2, 1, 1])
  t.equal((sinks[1] as RecordingSink).text[0], encodeEvent({ event: 'count', data: 'plain' }), 'a plain event is framed without an id')
})
