// A failover between two real PostgreSQL clusters, a primary and its
// asynchronous streaming replica: events acknowledged on the primary but not
// yet replicated are lost when the replica is promoted, and the new primary
// hands out their ids again. What open streams and resuming clients then get.
import pg from 'pg'
import t from 'tap'
import { readLogHead, readEventsAfter } from '../src/event-log.js'
import type { ListenerConnection } from '../src/listener.js'
import { clustersUnavailable, type ReplicatedClusters, startClusters } from './clusters.js'
import { type FreezableProxy, startProxy } from './tcp-proxy.js'
import { openStream, published, type ReceivedEvent, startGateway, type StreamClient, streamUrl, subscriber, type Test, type TestGateway, waitForData, within } from './helper.js'

const CHANNEL = 'orders'

const missedEvents = (stream: StreamClient): ReceivedEvent[] => stream.control.filter((e) => e.event === 'gateway/missed')

async function readyStatus (gateway: TestGateway): Promise<number> {
  const res = await fetch(`${gateway.baseUrl}/readyz`)
  await res.body?.cancel()
  return res.status
}

/**
 * Polls until the gateway is ready again (`/readyz` 200, listener live);
 * resolves with how long that took, in ms.
 */
async function readyAgain (gateway: TestGateway, ms = 30_000): Promise<number> {
  const started = performance.now()
  const deadline = Date.now() + ms
  while (gateway.app.listener.state !== 'live' || await readyStatus(gateway) !== 200) {
    if (Date.now() > deadline) throw new Error(`the gateway was not ready again within ${ms} ms (listener ${gateway.app.listener.state})`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
  return Math.round(performance.now() - started)
}

function nextDisconnected (listener: ListenerConnection): Promise<void> {
  return new Promise<void>((resolve) => listener.once('disconnected', () => resolve()))
}

/** Events on the channel in a cluster's log after an id, as [id, payload]. */
async function logAfter (clusters: ReplicatedClusters, cluster: 'primary' | 'replica', after: number): Promise<Array<[string, string]>> {
  const client = new pg.Client({ connectionString: clusters[cluster].url })
  await client.connect()
  try {
    return (await readEventsAfter(client, [CHANNEL], after, 1000)).map((e) => [e.id, e.payload])
  } finally {
    await client.end()
  }
}

async function logHead (clusters: ReplicatedClusters, cluster: 'primary' | 'replica'): Promise<number> {
  const client = new pg.Client({ connectionString: clusters[cluster].url })
  await client.connect()
  try {
    return await readLogHead(client)
  } finally {
    await client.end()
  }
}

interface Failover {
  clusters: ReplicatedClusters
  gateway: TestGateway
  stream: StreamClient
  /** Published and replicated before the cut: they survive. */
  survived: string[]
  /** Acknowledged with 201 after the cut: lost with the old primary. */
  lost: string[]
  /** ms from the end of the promotion to the gateway being ready again. */
  readyIn: number
}

/**
 * A gateway on the primary (through a proxy, the `DATABASE_URL` a failover
 * moves) with a stream open; events published and replicated; replication
 * cut (unless `lossless`); more events acknowledged and delivered; the
 * primary crashed, the replica promoted, the proxy pointed at it; the
 * gateway ready again. With `lossless`, `lost` is empty and every event
 * survives.
 */
async function failover (t: Test, { lossless = false } = {}): Promise<Failover> {
  const clusters = await startClusters(t)
  const { proxy, url } = await startProxy(t, clusters.primary.url)
  // Liveness and reconnection settings are the defaults: the time to be
  // ready again is the one a deployment would see.
  const gateway = await startGateway(t, {}, url)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, [CHANNEL]), subscriber(gateway))

  const survived: string[] = []
  for (let i = 1; i <= 3; i++) survived.push(await published(gateway, CHANNEL, `survived ${i}`))
  await waitForData(stream, 'survived 3')
  await clusters.waitForReplay()
  t.same(await logAfter(clusters, 'replica', 0), survived.map((id, i) => [id, `survived ${i + 1}`]), 'the replica holds the first events')

  if (lossless) {
    for (let i = 4; i <= 6; i++) survived.push(await published(gateway, CHANNEL, `survived ${i}`))
    await waitForData(stream, 'survived 6')
    await clusters.waitForReplay()
    return await promote(t, clusters, proxy, gateway, stream, survived, [])
  }
  await clusters.cutReplication()
  t.same(await clusters.replicationLink(), { receivers: 0, senders: 0 }, 'replication is cut: no walreceiver on the replica, no walsender on the primary')
  const lost: string[] = []
  for (let i = 1; i <= 3; i++) lost.push(await published(gateway, CHANNEL, `lost ${i}`))
  await waitForData(stream, 'lost 3')
  t.same(stream.events.map((e) => e.id), [...survived, ...lost], 'the events acknowledged after the cut were delivered live')
  t.equal(await logHead(clusters, 'primary'), Number(lost.at(-1)), 'the primary committed them')
  t.equal(await logHead(clusters, 'replica'), Number(survived.at(-1)), 'the replica never got them')
  return await promote(t, clusters, proxy, gateway, stream, survived, lost)
}

// Crashes the primary, promotes the replica, moves the proxy to it, and
// waits until the gateway is ready again.
async function promote (t: Test, clusters: ReplicatedClusters, proxy: FreezableProxy, gateway: TestGateway, stream: StreamClient, survived: string[], lost: string[]): Promise<Failover> {
  const { listener } = gateway.app
  const disconnected = nextDisconnected(listener)
  await clusters.stop(clusters.primary, 'immediate')
  await within(disconnected, 'the listener to see the primary go', 10_000)
  await clusters.promoteReplica()
  proxy.retarget({ host: '127.0.0.1', port: clusters.replica.port })
  const readyIn = await readyAgain(gateway)
  t.comment(`ready ${readyIn} ms after the promotion (listener reconnects: ${listener.reconnects})`)
  t.equal(await logHead(clusters, 'replica'), Number(survived.at(-1)), 'the promoted replica\'s log ends at the last replicated event')
  t.equal(await clusters.timeline(clusters.replica), 2, 'the promoted replica is on a new timeline')
  return { clusters, gateway, stream, survived, lost, readyIn }
}

async function run (): Promise<void> {
  t.test('a lossy failover: open streams get gateway/missed, then every event of the new log once', { timeout: 120_000 }, async (t) => {
    const { clusters, gateway, stream, survived, lost } = await failover(t)
    const lastSeen = lost.at(-1) as string
    const lastSurvived = survived.at(-1) as string

    // The stream is told before anything new is published, so it can be
    // told apart from what comes next.
    const told = await within(stream.until(() => missedEvents(stream).length > 0, 'gateway/missed'), 'gateway/missed on the open stream', 10_000)
      .then(() => true, () => false)
    t.ok(told, 'the open stream got gateway/missed after the failover')
    const countAtMissed = stream.events.length
    t.equal(countAtMissed, survived.length + lost.length, 'before any event of the new log')
    const missed = missedEvents(stream)[0]
    t.same(missed === undefined ? undefined : JSON.parse(missed.data), { lastEventId: lastSeen, resumedAfter: lastSurvived },
      'saying the last id the stream had and the last one that survived')

    const fresh: string[] = []
    for (let i = 1; i <= 4; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    t.same(fresh.slice(0, lost.length), lost, 'the new primary handed out the lost ids again')
    const newLog = await logAfter(clusters, 'replica', Number(lastSurvived))
    t.same(newLog, fresh.map((id, i) => [id, `new ${i + 1}`]), 'the new log after the last surviving event: the new events')

    await within(stream.until(() => stream.events.some((e) => e.data === 'new 4'), 'new 4'), 'the last new event', 10_000).catch(() => {})
    t.same(stream.events.slice(countAtMissed).map((e) => [e.id, e.data]), newLog,
      'then every event of the new log, reissued ids included, once each, in order')
    t.same(stream.events.slice(0, countAtMissed).map((e) => e.data), [...survived.map((_id, i) => `survived ${i + 1}`), ...lost.map((_id, i) => `lost ${i + 1}`)],
      'and nothing else')
    t.notOk(stream.ended, 'the stream stayed open')
    t.equal(missedEvents(stream).length, 1, 'told once')
  })

  t.test('a lossy failover: what a client resuming from a lost id gets', { timeout: 120_000 }, async (t) => {
    const { gateway, survived, lost } = await failover(t)
    const lastLost = lost.at(-1) as string
    const lastSurvived = survived.at(-1) as string
    const resume = async (): Promise<StreamClient> =>
      await openStream(t, streamUrl(gateway.baseUrl, [CHANNEL]), { ...subscriber(gateway), 'last-event-id': lastLost })

    // Before the new primary has reissued the id: it is beyond the head.
    const early = await resume()
    await within(early.until(() => early.control.length >= 2, 'gateway/open and gateway/missed'), 'the early resume\'s preamble')
    t.same(early.control.map((e) => [e.event, e.id]), [['gateway/open', lastSurvived], ['gateway/missed', undefined]],
      'resuming before the id is reissued: gateway/open at the new head, then gateway/missed')
    t.same(JSON.parse(early.control[1]?.data ?? 'null'), { lastEventId: lastLost, resumedAfter: lastSurvived }, 'saying where it resumed')

    const fresh: string[] = []
    for (let i = 1; i <= 4; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    await waitForData(early, 'new 4')
    t.same(early.events.map((e) => e.id), fresh, 'and it then gets every new event')

    // Once the new log has gone past the lost id, that id looks like any
    // other: ids carry nothing of the log they came from.
    const late = await resume()
    await waitForData(late, 'new 4')
    t.same(late.control.map((e) => e.event), ['gateway/open'], 'today, resuming after the id was reissued: no gateway/missed')
    t.same(late.events.map((e) => e.id), fresh.filter((id) => Number(id) > Number(lastLost)),
      `today it gets only the events after id ${lastLost} of the new log: the reissued ones (${fresh.slice(0, lost.length).join(', ')}) are skipped unannounced`)
  })

  t.test('a lossless failover: every event once, none dropped', { timeout: 120_000 }, async (t) => {
    const { gateway, stream, survived } = await failover(t, { lossless: true })
    const fresh: string[] = []
    for (let i = 1; i <= 3; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    t.equal(Number(fresh[0]), Number(survived.at(-1)) + 1, 'the new primary goes on from the last id')
    await within(stream.until(() => stream.events.some((e) => e.data === 'new 3'), 'new 3'), 'the last new event', 10_000).catch(() => {})
    t.same(stream.events.map((e) => e.id), [...survived, ...fresh], 'every event once, in order')
    t.notOk(stream.ended, 'the stream stayed open')
    // A gateway that goes by the timeline may say so; it must not say that
    // anything was lost.
    const told = missedEvents(stream).map((e) => JSON.parse(e.data) as { resumedAfter: string })
    t.comment(`gateway/missed events on a lossless failover: ${JSON.stringify(told)}`)
    t.ok(told.every((m) => m.resumedAfter === survived.at(-1)), 'no gateway/missed claims a loss')
  })

  t.test('a crash and restart of the primary is no rewind: nothing missed, every event once', { timeout: 120_000 }, async (t) => {
    const clusters = await startClusters(t)
    const { url } = await startProxy(t, clusters.primary.url)
    const gateway = await startGateway(t, {}, url)
    const { listener } = gateway.app
    const stream = await openStream(t, streamUrl(gateway.baseUrl, [CHANNEL]), subscriber(gateway))
    const ids: string[] = []
    for (let i = 1; i <= 3; i++) ids.push(await published(gateway, CHANNEL, `before ${i}`))
    await waitForData(stream, 'before 3')

    const disconnected = nextDisconnected(listener)
    await clusters.stop(clusters.primary, 'immediate')
    await within(disconnected, 'the listener to see the primary go', 10_000)
    await clusters.start(clusters.primary)
    const readyIn = await readyAgain(gateway)
    t.comment(`ready ${readyIn} ms after the restart (listener reconnects: ${listener.reconnects})`)
    t.equal(await clusters.timeline(clusters.primary), 1, 'crash recovery keeps the timeline')

    for (let i = 1; i <= 3; i++) ids.push(await published(gateway, CHANNEL, `after ${i}`))
    await waitForData(stream, 'after 3')
    t.same(stream.events.map((e) => e.id), ids, 'every event once, in order')
    t.same(missedEvents(stream), [], 'no gateway/missed: the log was not rewound')
    t.notOk(stream.ended, 'the stream stayed open')
  })
}

const unavailable = clustersUnavailable()
if (unavailable === null) {
  await run()
} else if (process.env.CI === 'true') {
  t.fail(`the failover tests need PostgreSQL's server binaries under CI: ${unavailable}`)
} else {
  t.plan(0, `skipped: ${unavailable}`)
}
