// A failover between two real PostgreSQL clusters, a primary and its
// asynchronous streaming replica: events acknowledged on the primary but not
// yet replicated are lost when the replica is promoted, and the new primary's
// log ends before ids that streams and clients have already seen. What open
// streams and resuming clients then get.
import t from 'tap'
import type { ListenerConnection } from '../src/listener.js'
import { clustersUnavailable, type ReplicatedClusters, startClusters } from './clusters.js'
import { type FreezableProxy, startProxy } from './tcp-proxy.js'
import { openStream, published, type ReceivedEvent, readyStatus, startGateway, type StreamClient, streamUrl, subscriber, type Test, type TestGateway, waitFor, waitForData, within } from './helper.js'

const CHANNEL = 'orders'

const missedEvents = (stream: StreamClient): ReceivedEvent[] => stream.control.filter((e) => e.event === 'gateway/missed')

/**
 * Polls until the gateway is ready again (`/readyz` 200, listener live);
 * resolves with how long that took, in ms.
 */
async function readyAgain (gateway: TestGateway, ms = 30_000): Promise<number> {
  const started = performance.now()
  await waitFor(async () => gateway.app.listener.state === 'live' && await readyStatus(gateway) === 200, 'the gateway to be ready again', ms)
  return Math.round(performance.now() - started)
}

function nextDisconnected (listener: ListenerConnection): Promise<void> {
  return new Promise<void>((resolve) => listener.once('disconnected', () => resolve()))
}

/** Events on the channel in a cluster's log after an id, as [id, payload]. */
async function logAfter (clusters: ReplicatedClusters, cluster: 'primary' | 'replica', after: number): Promise<Array<[string, string]>> {
  const rows = await clusters.query<{ id: string, payload: string }>(clusters[cluster],
    'SELECT id::text AS id, payload FROM sse_gateway.events WHERE channel = $1 AND id > $2 ORDER BY events.id', [CHANNEL, after])
  return rows.map((r) => [r.id, r.payload])
}

/** The id of the last event in a cluster's log. */
async function logHead (clusters: ReplicatedClusters, cluster: 'primary' | 'replica'): Promise<number> {
  const [row] = await clusters.query<{ id: string }>(clusters[cluster], 'SELECT sse_gateway.log_head_id()::text AS id')
  return Number(row?.id)
}

interface Failover {
  clusters: ReplicatedClusters
  gateway: TestGateway
  stream: StreamClient
  /** Published and replicated before the cut: they survive. */
  survived: string[]
  /** Acknowledged with 201 after the cut: lost with the old primary. */
  lost: string[]
}

interface FailoverOptions {
  /** Every event replicated before the primary is lost. */
  lossless?: boolean
  /** Runs once the replica is promoted, before the gateway can reach it. */
  beforeRetarget?: (clusters: ReplicatedClusters) => Promise<void>
}

/**
 * A gateway on the primary (through a proxy, the `DATABASE_URL` a failover
 * moves) with a stream open; events published and replicated; replication
 * cut (unless `lossless`); more events acknowledged and delivered; the
 * primary crashed, the replica promoted, the proxy pointed at it; the
 * gateway ready again. With `lossless`, `lost` is empty and every event
 * survives.
 */
async function failover (t: Test, { lossless = false, beforeRetarget }: FailoverOptions = {}): Promise<Failover> {
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
    return await promote(t, clusters, proxy, { gateway, stream, survived, lost: [] }, beforeRetarget)
  }
  await clusters.cutReplication()
  t.same(await clusters.replicationLink(), { receivers: 0, senders: 0 }, 'replication is cut: no walreceiver on the replica, no walsender on the primary')
  const lost: string[] = []
  for (let i = 1; i <= 3; i++) lost.push(await published(gateway, CHANNEL, `lost ${i}`))
  await waitForData(stream, 'lost 3')
  t.same(stream.events.map((e) => e.id), [...survived, ...lost], 'the events acknowledged after the cut were delivered live')
  t.equal(await logHead(clusters, 'primary'), Number(lost.at(-1)), 'the primary committed them')
  t.equal(await logHead(clusters, 'replica'), Number(survived.at(-1)), 'the replica never got them')
  return await promote(t, clusters, proxy, { gateway, stream, survived, lost }, beforeRetarget)
}

// Crashes the primary, promotes the replica, moves the proxy to it, and
// waits until the gateway is ready again.
async function promote (t: Test, clusters: ReplicatedClusters, proxy: FreezableProxy, state: Omit<Failover, 'clusters'>, beforeRetarget?: FailoverOptions['beforeRetarget']): Promise<Failover> {
  const { gateway, survived } = state
  const { listener } = gateway.app
  const disconnected = nextDisconnected(listener)
  await clusters.stop(clusters.primary, 'immediate')
  await within(disconnected, 'the listener to see the primary go', 10_000)
  await clusters.promoteReplica()
  // The gateway reaches the database only through the proxy: whatever runs
  // here happens on the new primary before the gateway can see it.
  await beforeRetarget?.(clusters)
  proxy.retarget({ host: '127.0.0.1', port: clusters.replica.port })
  const readyIn = await readyAgain(gateway)
  t.comment(`ready ${readyIn} ms after the promotion (listener reconnects: ${listener.reconnects})`)
  if (beforeRetarget === undefined) t.equal(await logHead(clusters, 'replica'), Number(survived.at(-1)), 'the promoted replica\'s log ends at the last replicated event')
  t.equal(await clusters.timeline(clusters.replica), 2, 'the promoted replica is on a new timeline')
  return { ...state, clusters }
}

/**
 * What the stream got, channel and gateway events in the order they came,
 * `gateway/gap` left out (and `gateway/open` unless `withOpen`), as
 * [event, id, data]; a gateway event's data parsed.
 */
function arrivals (stream: StreamClient, withOpen = false): Array<[string | undefined, string | undefined, unknown]> {
  return stream.arrived.filter((e) => e.event !== 'gateway/gap' && (withOpen || e.event !== 'gateway/open'))
    .map((e) => [e.event, e.id, e.event?.startsWith('gateway/') === true ? JSON.parse(e.data) : e.data])
}

// After a lossy failover and the publishing of `expectedNew` (payloads, in
// order) on the new primary: the stream got what it had, then one
// gateway/missed saying the last id it had and the last one that survived,
// then every event of the new log after that one, once each, in order.
async function checkStreamAfterRewind (t: Test, { clusters, stream, survived, lost }: Failover, expectedNew: string[]): Promise<void> {
  const lastSurvived = survived.at(-1) as string
  const newLog = await logAfter(clusters, 'replica', Number(lastSurvived))
  t.same(newLog.map(([, data]) => data), expectedNew, 'the new log after the last surviving event holds the new events')
  const last = expectedNew.at(-1) as string
  await within(stream.until(() => stream.events.some((e) => e.data === last), last), 'the last new event', 10_000)
    .catch(() => t.fail(`the stream never got ${JSON.stringify(last)}`))
  const before = [...survived.map((id, i) => [CHANNEL, id, `survived ${i + 1}`]), ...lost.map((id, i) => [CHANNEL, id, `lost ${i + 1}`])]
  t.same(arrivals(stream), [
    ...before,
    ['gateway/missed', undefined, { lastEventId: lost.at(-1), resumedAfter: lastSurvived }],
    ...newLog.map(([id, data]) => [CHANNEL, id, data])
  ], 'what it had, gateway/missed {lastEventId: the last id it had, resumedAfter: the last that survived}, then every event of the new log once, in order')
  t.notOk(stream.ended, 'the stream stayed open')
}

async function run (): Promise<void> {
  t.test('a lossy failover: open streams get gateway/missed, then every event of the new log once', { timeout: 120_000 }, async (t) => {
    const state = await failover(t)
    const { gateway, stream } = state
    // The stream is told before anything new is published.
    await within(stream.until(() => missedEvents(stream).length > 0, 'gateway/missed'), 'gateway/missed on the open stream', 10_000)
      .catch(() => t.fail('the open stream got no gateway/missed after the failover'))

    const fresh: string[] = []
    for (let i = 1; i <= 4; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    t.comment(`ids of the new events: ${fresh.join(', ')}`)
    await checkStreamAfterRewind(t, state, fresh.map((_id, i) => `new ${i + 1}`))
  })

  t.test('a lossy failover with events published on the new primary before the gateway is back: none dropped', { timeout: 120_000 }, async (t) => {
    const early: string[] = []
    const state = await failover(t, {
      beforeRetarget: async (clusters) => {
        for (let i = 1; i <= 2; i++) {
          const [row] = await clusters.query<{ id: string }>(clusters.replica, 'SELECT (sse_gateway.publish_batch_now(ARRAY[$1], ARRAY[$2]))[1]::text AS id', [CHANNEL, `early ${i}`])
          early.push(row?.id as string)
        }
      }
    })
    const { gateway } = state
    t.comment(`ids of the events published before the gateway was back: ${early.join(', ')}`)
    t.equal(await logHead(state.clusters, 'replica'), Number(early.at(-1)), 'the new log has them')

    const fresh: string[] = []
    for (let i = 1; i <= 3; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    await checkStreamAfterRewind(t, state, [...early.map((_id, i) => `early ${i + 1}`), ...fresh.map((_id, i) => `new ${i + 1}`)])
  })

  t.test('a lossy failover: a client resuming from a lost id gets gateway/missed, before and after new events', { timeout: 120_000 }, async (t) => {
    const { gateway, survived, lost } = await failover(t)
    const lastLost = lost.at(-1) as string
    const lastSurvived = survived.at(-1) as string
    const resume = async (lastEventId: string): Promise<StreamClient> =>
      await openStream(t, streamUrl(gateway.baseUrl, [CHANNEL]), { ...subscriber(gateway), 'last-event-id': lastEventId })
    // Either way the stream opens at the last event that survived, and says so.
    const opened = (head: string): unknown[] => [['gateway/open', lastSurvived, { lastEventId: lastSurvived, head }],
      ['gateway/missed', undefined, { lastEventId: lastLost, resumedAfter: lastSurvived }]]

    // Before the new primary publishes anything: the id is beyond the head.
    const early = await resume(lastLost)
    await within(early.until(() => early.control.length >= 2, 'gateway/open and gateway/missed'), 'the early resume\'s preamble')
    t.same(arrivals(early, true), opened(lastSurvived), 'resuming before anything new is published: gateway/missed, from the last event that survived')

    const fresh: string[] = []
    for (let i = 1; i <= 4; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    t.comment(`ids of the new events: ${fresh.join(', ')}`)
    await within(early.until(() => early.events.some((e) => e.data === 'new 4'), 'new 4'), 'new 4 on the early resume', 10_000)
      .catch(() => t.fail('the early resume never got "new 4"'))
    t.same(early.events.map((e) => e.id), fresh, 'then every new event')

    // Once the new primary has published, the lost ids must not look like
    // ids of the new log, or a client would skip the new events below its id.
    t.ok(fresh.every((id) => Number(id) > Number(lastLost)), 'the new primary leaves the lost ids unissued')
    const late = await resume(lastLost)
    await within(late.until(() => late.events.some((e) => e.data === 'new 4'), 'new 4'), 'new 4 on the late resume', 10_000)
      .catch(() => t.fail('the late resume never got "new 4"'))
    t.same(arrivals(late, true), [
      ...opened(fresh.at(-1) as string),
      ...fresh.map((id, i) => [CHANNEL, id, `new ${i + 1}`])
    ], 'resuming after new events: gateway/missed too, then every new event')

    // A client that saw only events that survived has lost nothing.
    const unharmed = await resume(lastSurvived)
    await waitForData(unharmed, 'new 4')
    t.same(unharmed.control.map((e) => e.event), ['gateway/open'], 'resuming from a surviving id: no gateway/missed')
    t.same(unharmed.events.map((e) => e.id), fresh, 'and every new event')
  })

  t.test('a lossless failover: every event once, none dropped', { timeout: 120_000 }, async (t) => {
    const { gateway, stream, survived } = await failover(t, { lossless: true })
    const fresh: string[] = []
    for (let i = 1; i <= 3; i++) fresh.push(await published(gateway, CHANNEL, `new ${i}`))
    t.ok(Number(fresh[0]) > Number(survived.at(-1)), 'the new primary goes on above the last id')
    await within(stream.until(() => stream.events.some((e) => e.data === 'new 3'), 'new 3'), 'the last new event', 10_000).catch(() => {})
    t.same(stream.events.map((e) => e.id), [...survived, ...fresh], 'every event once, in order')
    t.notOk(stream.ended, 'the stream stayed open')
    // The log moved to a new timeline, but it holds everything delivered.
    t.same(missedEvents(stream), [], 'no gateway/missed: nothing was lost')
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
