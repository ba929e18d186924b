// `npm run bench`: Nchan and the gateway side by side, driven by one load
// generator; prints a table (and writes bench/results/<time>.json).
// `--only mercure`: the gateway's channel and Mercure fan-outs alone.
import { execFileSync } from 'node:child_process'
import { connect } from 'node:net'
import { mkdirSync, writeFileSync } from 'node:fs'
import { cpus, totalmem } from 'node:os'
import { setTimeout as sleep } from 'node:timers/promises'
import { parseArgs } from 'node:util'
import pg from 'pg'
import { now, quantile } from './histogram.js'
import { type Delivery, openSubscribers, payload, Poster, publishEvents, publishPaced, type Subscribers } from './load.js'
import { type GatewayTarget, mercureTarget, pgbenchPath, rssBytes, startGateway, startNchan, type Target } from './targets.js'
import { type ListenerScaling, measureListenerScaling } from './listeners.js'
import { ensureWrk, runWrk, type WrkOptions, type WrkRun } from './wrk.js'

const { values: args } = parseArgs({
  options: {
    streams: { type: 'string', default: '5000' },
    events: { type: 'string', default: '1000' },
    size: { type: 'string', default: '64' },
    // Idle streams held at each step of the memory phase.
    'idle-streams': { type: 'string', default: '1000,10000,18000' },
    // Where the memory phase writes a heap snapshot of the gateway at each step (none by default).
    'heap-snapshots': { type: 'string' },
    'publish-concurrency': { type: 'string', default: '16' },
    'fan-out-batch': { type: 'string', default: '20' },
    // The paced runs: streams × events a second, each for this many seconds
    // after 2 s of warm-up. 20,000 deliveries a second, well within both
    // servers' reach, and the issue's 100,000.
    paced: { type: 'string', default: '1000x20,2000x50' },
    'paced-seconds': { type: 'string', default: '10' },
    // Which phases run, of: memory, fan-out, mercure, rows, paced, publish, flood, listeners.
    phases: { type: 'string', default: 'memory,fan-out,mercure,rows,paced,publish,flood,listeners' },
    'subscriber-workers': { type: 'string', default: '2' },
    'publish-seconds': { type: 'string', default: '5' },
    'flood-mb': { type: 'string', default: '90' },
    // Listening sessions in the PostgreSQL scaling phase, and its database
    // (the one above by default; it needs max_connections room for the most).
    listeners: { type: 'string', default: '1,4,16,64' },
    'listeners-database': { type: 'string' },
    only: { type: 'string' },
    // Ports of the two servers (another bench on the same machine may hold the defaults).
    'gateway-port': { type: 'string', default: '3917' },
    'nchan-port': { type: 'string', default: '3918' },
    profile: { type: 'boolean', default: false },
    database: { type: 'string', default: process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres' }
  }
})

const STREAMS = Number(args.streams)
const EVENTS = Number(args.events)
const SIZE = Number(args.size)
const IDLE_STEPS = args['idle-streams'].split(',').map(Number).filter((n) => n > 0).sort((a, b) => a - b)
const PUBLISH_CONCURRENCY = Number(args['publish-concurrency'])
const FAN_OUT_BATCH = Number(args['fan-out-batch'])
const WORKERS = Number(args['subscriber-workers'])
const PUBLISH_SECONDS = Number(args['publish-seconds'])
const FLOOD_BYTES = Number(args['flood-mb']) * 1024 * 1024
const WARM_UP_SECONDS = 3
const PACED_RUNS = args.paced.split(',').map((run) => run.split('x').map(Number) as [number, number])
const PACED_SECONDS = Number(args['paced-seconds'])
const PACED_WARM_UP_SECONDS = 2
const PHASES = new Set(args.phases.split(','))
const LISTENER_COUNTS = args.listeners.split(',').map(Number).filter((n) => n > 0)
const GATEWAY_PORT = Number(args['gateway-port'])
const NCHAN_PORT = Number(args['nchan-port'])

function log (line: string): void {
  process.stderr.write(`${new Date().toISOString().slice(11, 19)} ${line}\n`)
}

interface FanOut {
  streams: number
  events: number
  deliveries: number
  expected: number
  seconds: number
  perSecond: number
  p50: number
  p99: number
  publishErrors: string
}

interface MemoryStep {
  streams: number
  opened: number
  /** RSS growth since no stream was open, per stream held. */
  rssPerStream: number
  /** The same, read after a full GC (the gateway only: Nchan has no GC to wait for). */
  rssAfterGcPerStream?: number
  /** V8 heap growth after a full GC, per stream held (the gateway only). */
  heapPerStream?: number
}

interface Memory {
  steps: MemoryStep[]
}

/**
 * Idle streams, opened in steps (1,000, then up to 10,000, then up to
 * 18,000): the server's RSS growth per stream held at each step and, for
 * the gateway, its heap after a full GC (bench/heap-probe.mjs), with a heap
 * snapshot at each step when asked.
 */
async function measureMemory (target: Target, channel: string, steps: number[]): Promise<Memory> {
  const gateway = 'memory' in target ? target as GatewayTarget : undefined
  const snapshot = (n: number): string | undefined => args['heap-snapshots'] === undefined ? undefined : `${args['heap-snapshots']}/gateway-${n}.heapsnapshot`
  await sleep(500)
  const baseline = await gateway?.memory(snapshot(0))
  await sleep(500)
  const before = rssBytes(target.pid)
  const held: Subscribers[] = []
  const result: Memory = { steps: [] }
  let opened = 0
  try {
    for (const streams of steps) {
      const subs = await openSubscribers(target, target.subscribePath(channel), streams - opened - held.reduce((n, s) => n + s.failed, 0), WORKERS, 1)
      held.push(subs)
      opened = streams - held.reduce((n, s) => n + s.failed, 0)
      await sleep(1000)
      const rss = rssBytes(target.pid)
      const collected = await gateway?.memory(snapshot(streams))
      const step: MemoryStep = { streams, opened, rssPerStream: (rss - before) / opened }
      if (collected !== undefined && baseline !== undefined) {
        step.heapPerStream = (collected.heapUsed - baseline.heapUsed) / opened
        step.rssAfterGcPerStream = (collected.rss - baseline.rss) / opened
      }
      result.steps.push(step)
      log(`${target.name}: ${opened} idle streams, RSS ${(before / 2 ** 20).toFixed(1)} → ${(rss / 2 ** 20).toFixed(1)} MiB, ${(step.rssPerStream / 1024).toFixed(2)} KiB a stream${step.heapPerStream === undefined ? '' : `; after a full GC, RSS ${((step.rssAfterGcPerStream ?? NaN) / 1024).toFixed(2)} KiB and heap ${(step.heapPerStream / 1024).toFixed(2)} KiB a stream`}`)
    }
  } finally {
    for (const subs of held) await subs.close()
  }
  // Closing 18,000 streams at once keeps the gateway busy for a while, and
  // while its event loop lags it sheds new streams (under-pressure): the
  // next phase waits until it is done.
  await sleep((IDLE_STEPS.at(-1) ?? 0) > 10_000 ? 5000 : 1000)
  return result
}

async function measureFanOut (target: Target, channel: string, batch = 1): Promise<FanOut> {
  const subs = await openSubscribers(target, target.subscribePath(channel), STREAMS, WORKERS, EVENTS)
  log(`${target.name}: ${STREAMS - subs.failed} streams open; publishing ${EVENTS} events, ${batch} per request`)
  const delivered = subs.expect(EVENTS)
  const published = await publishEvents(target, channel, EVENTS, SIZE, PUBLISH_CONCURRENCY, subs.sendTimes, batch)
  log(`${target.name}: published in ${((now() - published.firstSentAt) / 1000).toFixed(2)} s`)
  const delivery: Delivery = await Promise.race([
    delivered,
    sleep(120_000).then(() => { throw new Error(`${target.name}: not every event arrived within 120 s`) })
  ])
  await subs.close()
  const deliveries = delivery.received.reduce((a, b) => a + b, 0)
  const seconds = (delivery.lastReceiveAt - published.firstSentAt) / 1000
  const result: FanOut = {
    streams: STREAMS,
    events: EVENTS,
    deliveries,
    expected: STREAMS * EVENTS,
    seconds,
    perSecond: deliveries / seconds,
    p50: quantile(delivery.histogram, 0.5),
    p99: quantile(delivery.histogram, 0.99),
    publishErrors: [...published.errors].map(([s, n]) => `${n}×${s}`).join(', ')
  }
  log(`${target.name}: ${deliveries}/${result.expected} deliveries in ${seconds.toFixed(2)} s = ${(result.perSecond / 1e6).toFixed(3)} M/s, p50 ${result.p50.toFixed(1)} ms, p99 ${result.p99.toFixed(1)} ms${result.publishErrors === '' ? '' : `, publish errors ${result.publishErrors}`}`)
  return result
}

/** The captured table's changes: `{"op":"INSERT",…}`. */
const ROW_MARKER = 'data: {"op"'
// Rows with status s0 … s9 in turn: each filter below passes 9 rows in 10.
const ROW_FILTERS = Array.from({ length: 10 }, (_, k) => `filter=status=neq.s${k}&filter=total=gte.0`)

/**
 * Fan-out of row changes: STREAMS streams on one captured table, unfiltered
 * or split over 10 distinct filter sets (streams with the same filters
 * share one evaluation and one frame per event), while 16 connections
 * insert EVENTS rows, one per transaction. Latency is not measured: a
 * filtered stream's i-th event is not the i-th row.
 */
async function measureRowFanOut (gateway: GatewayTarget, filtered: boolean): Promise<FanOut> {
  const table = filtered ? 'bench_rows_filtered' : 'bench_rows'
  const db = new pg.Pool({ connectionString: gateway.databaseUrl, max: PUBLISH_CONCURRENCY })
  try {
    await db.query(`CREATE TABLE ${table} (id int PRIMARY KEY, status text NOT NULL, total int NOT NULL)`)
    await db.query('SELECT sse_gateway.capture_changes($1)', [`public.${table}`])
    const base = gateway.subscribePath(`public.${table}`)
    const paths = filtered ? ROW_FILTERS.map((f) => `${base}&${f}`) : [base]
    const perStream = filtered ? EVENTS - EVENTS / 10 : EVENTS
    // Right after a phase closed its 5,000 streams the gateway may still be
    // busy enough to shed new ones (a 200 with gateway/unavailable, which
    // the subscribers would count as open): let it settle.
    await sleep(3000)
    const subs = await openSubscribers(gateway, paths, STREAMS, WORKERS, EVENTS, ROW_MARKER)
    log(`gateway: ${STREAMS - subs.failed} streams on public.${table}${filtered ? `, ${paths.length} filter sets` : ''}; inserting ${EVENTS} rows`)
    const delivered = subs.expect(perStream)
    const firstSentAt = now()
    let next = 0
    await Promise.all(Array.from({ length: PUBLISH_CONCURRENCY }, async () => {
      while (next < EVENTS) {
        const id = next++
        await db.query(`INSERT INTO ${table} VALUES ($1, $2, $3)`, [id, `s${id % 10}`, id])
      }
    }))
    const delivery: Delivery = await Promise.race([
      delivered,
      sleep(120_000).then(() => { throw new Error(`public.${table}: not every event arrived within 120 s`) })
    ])
    await subs.close()
    const deliveries = delivery.received.reduce((a, b) => a + b, 0)
    const seconds = (delivery.lastReceiveAt - firstSentAt) / 1000
    const result: FanOut = { streams: STREAMS, events: EVENTS, deliveries, expected: STREAMS * perStream, seconds, perSecond: deliveries / seconds, p50: NaN, p99: NaN, publishErrors: '' }
    const short = delivery.received.filter((n) => n < perStream).length
    log(`gateway, row changes${filtered ? ', filtered' : ''}: ${deliveries}/${result.expected} deliveries in ${seconds.toFixed(2)} s = ${(result.perSecond / 1e6).toFixed(3)} M/s${short > 0 ? `; ${short} streams short (${delivery.closedEarly} closed early; cut off: ${await cutOffCount(gateway)} in all)` : ''}`)
    return result
  } finally {
    await db.end()
  }
}

interface Paced {
  streams: number
  rate: number
  seconds: number
  deliveries: number
  expected: number
  p50: number
  p99: number
  max: number
  /** How late the publisher sent an event at worst (ms). */
  maxSendLag: number
  publishErrors: string
  /** The gateway's own figures over the run, from its metrics. */
  gateway?: { cpuShare: number, publishMeanMs: number, fanOutMeanMs: number }
}

/** Reads a metric's value (the first series whose name and labels start so); 0 if it has none yet. */
function metric (text: string, series: string): number {
  const at = text.indexOf(`\n${series}`)
  if (at === -1) return 0
  const line = text.slice(at + 1, text.indexOf('\n', at + 1))
  return Number(line.slice(line.lastIndexOf(' ') + 1))
}

/**
 * Steady load, open loop: `streams` streams on one channel, one event
 * published every 1/`rate` s whatever the answers, for
 * `PACED_SECONDS` after a warm-up. The latency of each event is from when
 * its publish was due to when a stream received it, for every stream.
 */
async function measurePaced (target: Target, channel: string, [streams, rate]: [number, number]): Promise<Paced> {
  const total = Math.round(rate * (PACED_WARM_UP_SECONDS + PACED_SECONDS))
  const subs = await openSubscribers(target, target.subscribePath(channel), streams, WORKERS, total)
  log(`${target.name}: ${streams - subs.failed} streams open; publishing ${rate} events a second for ${PACED_WARM_UP_SECONDS} + ${PACED_SECONDS} s`)
  const gateway = 'metrics' in target ? target as GatewayTarget : undefined
  const metricsBefore = await gateway?.metrics()
  const startedAt = now()
  const delivered = subs.expect(total)
  const run = await publishPaced(target, channel, rate, PACED_SECONDS, PACED_WARM_UP_SECONDS, SIZE, 64, subs.sendTimes)
  const delivery: Delivery = await Promise.race([
    delivered,
    sleep(60_000).then(() => { throw new Error(`${target.name}: not every paced event arrived within 60 s of the last publish`) })
  ])
  const elapsed = (now() - startedAt) / 1000
  const metricsAfter = await gateway?.metrics()
  await subs.close()
  const result: Paced = {
    streams,
    rate,
    seconds: PACED_SECONDS,
    deliveries: delivery.received.reduce((a, b) => a + b, 0),
    expected: streams * total,
    p50: quantile(delivery.histogram, 0.5),
    p99: quantile(delivery.histogram, 0.99),
    max: quantile(delivery.histogram, 1),
    maxSendLag: run.maxSendLag,
    publishErrors: [...run.errors].map(([s, n]) => `${n}×${s}`).join(', ')
  }
  if (metricsBefore !== undefined && metricsAfter !== undefined) {
    const delta = (series: string): number => metric(metricsAfter, series) - metric(metricsBefore, series)
    result.gateway = {
      cpuShare: delta('pgsse_process_process_cpu_seconds_total') / elapsed,
      publishMeanMs: 1000 * delta('pgsse_publish_duration_seconds_sum{route="/channels/:channel"}') / delta('pgsse_publish_duration_seconds_count{route="/channels/:channel"}'),
      fanOutMeanMs: 1000 * delta('pgsse_fanout_duration_seconds_sum') / delta('pgsse_fanout_duration_seconds_count')
    }
  }
  log(`${target.name}: paced ${result.deliveries}/${result.expected} deliveries, latency p50 ${result.p50.toFixed(1)} ms, p99 ${result.p99.toFixed(1)} ms, max ${result.max.toFixed(1)} ms; publisher at worst ${result.maxSendLag.toFixed(1)} ms late${result.gateway === undefined ? '' : `; gateway CPU ${(100 * result.gateway.cpuShare).toFixed(0)}% of a core, publish ${result.gateway.publishMeanMs.toFixed(2)} ms, fan-out ${result.gateway.fanOutMeanMs.toFixed(3)} ms an event`}${result.publishErrors === '' ? '' : `, publish errors ${result.publishErrors}`}`)
  return result
}

interface Publish {
  singlePerSecond: number
  singleFailures: number
  singleEventsPerTransaction: number
  batchEventsPerSecond: number
  batchFailures: number
  batchEventsPerTransaction: number
  pgbenchPerSecond: number
  pgbenchPublishPerSecond: number
  pgbenchPublishAsyncPerSecond: number
}

async function measurePublish (gateway: GatewayTarget): Promise<Publish> {
  const pgbench = pgbenchPath()
  ensureWrk(log)
  const body = payload(0, SIZE)
  // wrk and pgbench alike: 16 connections on 2 threads, for PUBLISH_SECONDS,
  // after WARM_UP_SECONDS of the same load unmeasured: a fresh process makes
  // its first seconds' POSTs at about half the rate it reaches once the JIT
  // has compiled the route (measured: 2,700-4,900/s in the first two seconds,
  // then 4,600-9,300/s).
  const load = { seconds: PUBLISH_SECONDS, connections: 16, threads: 2 }
  const measured = async (options: Omit<WrkOptions, keyof typeof load>): Promise<WrkRun & { eventsPerTransaction: number }> => {
    runWrk({ ...load, ...options, seconds: WARM_UP_SECONDS })
    const before = await publishCounts(gateway)
    const run = runWrk({ ...load, ...options })
    const after = await publishCounts(gateway)
    return { ...run, eventsPerTransaction: (after.events - before.events) / (after.transactions - before.transactions) }
  }
  // The same NOTIFY, as raw as it gets: one statement per transaction. Run
  // before and after the gateway's runs, and averaged, since the machine's
  // speed drifts.
  const script = '/tmp/pgsse-bench-notify.sql'
  const runPgbench = (sql: string, env: NodeJS.ProcessEnv = {}): number => {
    writeFileSync(script, sql)
    const out = execFileSync(pgbench, ['-n', '-f', script, '-c', '16', '-j', '2', '-T', String(PUBLISH_SECONDS), gateway.databaseUrl], { stdio: ['ignore', 'pipe', 'pipe'], env: { ...process.env, ...env } }).toString()
    return Number(/tps = ([0-9.]+)/.exec(out)?.[1] ?? NaN)
  }
  const notifySql = `SELECT pg_notify('bench_pub', '${body}');\n`
  const tpsBefore = runPgbench(notifySql)
  const singleRequest = gateway.publishRequest('bench_pub')
  const single = await measured({ url: `http://${gateway.host}:${gateway.port}${singleRequest.path}`, headers: singleRequest.headers, body })
  log(`gateway: single-event POSTs ${single.perSecond.toFixed(0)}/s, ${single.eventsPerTransaction.toFixed(1)} events per transaction${single.failures > 0 ? `, ${single.failures} failed` : ''}`)
  const batch = JSON.stringify({ events: Array.from({ length: 100 }, (_, i) => ({ channel: 'bench_pub', data: payload(i, SIZE) })) })
  const batches = await measured({
    url: `http://${gateway.host}:${gateway.port}/events`,
    headers: { 'content-type': 'application/json', authorization: `Bearer ${gateway.token}` },
    body: batch
  })
  log(`gateway: batch POSTs of 100 ${(batches.perSecond * 100).toFixed(0)} events/s, ${batches.eventsPerTransaction.toFixed(1)} events per transaction${batches.failures > 0 ? `, ${batches.failures} failed` : ''}`)
  const tpsAfter = runPgbench(notifySql)
  const tps = (tpsBefore + tpsAfter) / 2
  log(`pgbench: SELECT pg_notify(...) ${tpsBefore.toFixed(0)} tps before, ${tpsAfter.toFixed(0)} after`)
  // What publishing would be without group commit: each publish its own
  // transaction, waiting for the WAL flush; and the same without the wait.
  const publishSql = `SELECT sse_gateway.publish('bench_pub', '${body}');\n`
  const logTps = runPgbench(publishSql)
  const logTpsAsync = runPgbench(publishSql, { PGOPTIONS: '-c synchronous_commit=off' })
  log(`pgbench: SELECT sse_gateway.publish(...) ${logTps.toFixed(0)} tps; with synchronous_commit=off ${logTpsAsync.toFixed(0)} tps`)
  return {
    singlePerSecond: single.perSecond,
    singleFailures: single.failures,
    singleEventsPerTransaction: single.eventsPerTransaction,
    batchEventsPerSecond: batches.perSecond * 100,
    batchFailures: batches.failures,
    batchEventsPerTransaction: batches.eventsPerTransaction,
    pgbenchPerSecond: tps,
    pgbenchPublishPerSecond: logTps,
    pgbenchPublishAsyncPerSecond: logTpsAsync
  }
}

interface Flood {
  megabytes: number
  events: number
  rssGrowthMiB: number
  othersComplete: boolean
  stalledCutOff: boolean
  resumedComplete: boolean
}

/**
 * One client stops reading while `FLOOD_BYTES` of events go to it and to 20
 * others: the stalled one is cut off, the others get everything, the
 * process stays bounded, and the stalled client resumes by id.
 */
async function measureFlood (gateway: GatewayTarget): Promise<Flood> {
  const eventSize = 7000
  const perBatch = 100
  const batches = Math.ceil(FLOOD_BYTES / (eventSize * perBatch))
  const events = batches * perBatch
  const db = new pg.Client({ connectionString: gateway.databaseUrl })
  await db.connect()
  const { rows } = await db.query<{ head: string }>('SELECT sse_gateway.log_head_id()::text AS head')
  await db.end()
  const head = rows[0]?.head ?? '0'
  const others = await openSubscribers(gateway, gateway.subscribePath('flood'), 20, 1, events)
  // The stalled client: sends its request, then never reads.
  const stalled = connect({ host: '127.0.0.1', port: gateway.port })
  stalled.write(`GET /events?channel=flood HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer ${gateway.token}\r\n\r\n`)
  await new Promise((resolve) => stalled.once('data', resolve))
  stalled.pause()
  stalled.on('error', () => {})
  await sleep(500)
  const cutOffBefore = await cutOffCount(gateway)
  const before = rssBytes(gateway.pid)
  let peak = before
  const sampler = setInterval(() => { peak = Math.max(peak, rssBytes(gateway.pid)) }, 20)
  const done = others.expect(events)
  const poster = new Poster(gateway.host, gateway.port, 1)
  const headers = { 'content-type': 'application/json', authorization: `Bearer ${gateway.token}` }
  for (let b = 0; b < batches; b++) {
    const body = JSON.stringify({ events: Array.from({ length: perBatch }, (_, i) => ({ channel: 'flood', data: payload(b * perBatch + i + 1, eventSize) })) })
    const res = await poster.post('/events', headers, body)
    if (res.status !== 201) throw new Error(`flood batch answered ${res.status}: ${res.body.slice(0, 200)}`)
  }
  poster.close()
  const delivery = await Promise.race([done, sleep(120_000).then(() => null)])
  clearInterval(sampler)
  await others.close()
  const cutOff = await cutOffCount(gateway) - cutOffBefore
  stalled.destroy()
  // The stalled client comes back with the id it started from: everything is replayed.
  const resumed = await openSubscribers(gateway, `${gateway.subscribePath('flood')}&lastEventId=${head}`, 1, 1, events)
  const replay = await Promise.race([resumed.expect(events), sleep(60_000).then(() => null)])
  await resumed.close()
  const result = {
    megabytes: events * eventSize / 2 ** 20,
    events,
    rssGrowthMiB: (peak - before) / 2 ** 20,
    othersComplete: delivery !== null && delivery.received.every((n) => n === events),
    stalledCutOff: cutOff === 1,
    resumedComplete: replay !== null && replay.received[0] === events
  }
  log(`gateway flood: ${result.megabytes.toFixed(0)} MiB in ${events} events; RSS growth ${result.rssGrowthMiB.toFixed(1)} MiB; others complete ${result.othersComplete}; stalled cut off ${result.stalledCutOff}; resumed complete ${result.resumedComplete}`)
  return result
}

/** Events published and the transactions they took, so far. */
async function publishCounts (gateway: GatewayTarget): Promise<{ events: number, transactions: number }> {
  const text = await gateway.metrics()
  const read = (name: string): number => Number(new RegExp(`^${name} (\\d+)`, 'm').exec(text)?.[1] ?? NaN)
  return { events: read('pgsse_events_published_total'), transactions: read('pgsse_publish_transactions_total') }
}

async function cutOffCount (gateway: GatewayTarget): Promise<number> {
  return Number(/^pgsse_streams_cut_off_total (\d+)/m.exec(await gateway.metrics())?.[1] ?? 0)
}

/** Runs one measurement per item, one after the other. */
async function measureEach<T, R> (items: T[], measure: (item: T, index: number) => Promise<R>): Promise<R[]> {
  const results: R[] = []
  for (const [i, item] of items.entries()) results.push(await measure(item, i))
  return results
}

interface Results {
  machine: string
  command: string
  nchan?: { memory?: Memory, fanOut?: FanOut, paced?: Paced[] }
  gateway?: { memory?: Memory, fanOut?: FanOut, fanOutBatched?: FanOut, rows?: { unfiltered: FanOut, filtered: FanOut }, paced?: Paced[], publish?: Publish, flood?: Flood }
  rows?: { fanOut: FanOut, unfiltered: FanOut, filtered: FanOut }
  listeners?: ListenerScaling
  /** The same fan-out through the Mercure hub: one topic selector, updates on that topic. */
  mercure?: { channelFanOut: FanOut, fanOut: FanOut }
}

// The topic of the Mercure fan-out, subscribed with a selector of its own.
const MERCURE_TOPIC = 'https://example.com/books/1'

/** The channel fan-out and the Mercure fan-out, one after the other on one gateway. */
async function measureMercure (gateway: GatewayTarget, channelFanOut?: FanOut): Promise<{ channelFanOut: FanOut, fanOut: FanOut }> {
  const channel = channelFanOut ?? await measureFanOut(gateway, 'fan')
  return { channelFanOut: channel, fanOut: await measureFanOut(mercureTarget(gateway), MERCURE_TOPIC) }
}

async function main (): Promise<void> {
  const results: Results = {
    machine: `${cpus().length} × ${cpus()[0]?.model ?? '?'}, ${(totalmem() / 2 ** 30).toFixed(1)} GiB, Node ${process.version}`,
    command: ['npm run bench', ...(process.argv.length > 2 ? ['--', ...process.argv.slice(2)] : [])].join(' ')
  }
  if (args.only === 'publish') {
    // Only the publish figures, for working on the publish path.
    const gateway = await startGateway({ adminUrl: args.database, port: GATEWAY_PORT, nodeArgs: args.profile ? ['--cpu-prof', '--cpu-prof-dir=bench/profiles'] : [], log })
    try {
      process.stdout.write(JSON.stringify(await measurePublish(gateway), null, 2) + '\n')
    } finally {
      await gateway.stop()
    }
    return
  }
  if (args.only === 'mercure') {
    const gateway = await startGateway({ adminUrl: args.database, port: GATEWAY_PORT, nodeArgs: args.profile ? ['--cpu-prof', '--cpu-prof-dir=bench/profiles'] : [], log })
    try {
      results.mercure = await measureMercure(gateway)
    } finally {
      await gateway.stop()
    }
    process.stdout.write(table(results) + '\n')
    return
  }
  if (args.only === 'rows') {
    // The channel fan-out and the row-change rows, in one run.
    const gateway = await startGateway({ adminUrl: args.database, port: GATEWAY_PORT, nodeArgs: [], log })
    try {
      const fanOut = await measureFanOut(gateway, 'fan')
      results.rows = { fanOut, unfiltered: await measureRowFanOut(gateway, false), filtered: await measureRowFanOut(gateway, true) }
    } finally {
      await gateway.stop()
    }
    process.stdout.write(JSON.stringify(results, null, 2) + '\n')
    return
  }
  if (args.only !== 'gateway' && ['memory', 'fan-out', 'paced'].some((p) => PHASES.has(p))) {
    const nchan = await startNchan({ port: NCHAN_PORT, log })
    try {
      results.nchan = {}
      if (PHASES.has('memory')) results.nchan.memory = await measureMemory(nchan, 'idle', IDLE_STEPS)
      if (PHASES.has('fan-out')) results.nchan.fanOut = await measureFanOut(nchan, 'fan')
      if (PHASES.has('paced')) results.nchan.paced = await measureEach(PACED_RUNS, async (run, i) => await measurePaced(nchan, `paced${i}`, run))
    } finally {
      await nchan.stop()
    }
  }
  if (args.only !== 'nchan' && ['memory', 'fan-out', 'mercure', 'rows', 'paced', 'publish', 'flood'].some((p) => PHASES.has(p))) {
    const nodeArgs = args.profile ? ['--cpu-prof', '--cpu-prof-dir=bench/profiles'] : []
    const gateway = await startGateway({ adminUrl: args.database, port: GATEWAY_PORT, nodeArgs, log })
    try {
      const g: NonNullable<Results['gateway']> = results.gateway = {}
      if (PHASES.has('memory')) g.memory = await measureMemory(gateway, 'idle', IDLE_STEPS)
      if (PHASES.has('fan-out')) {
        g.fanOut = await measureFanOut(gateway, 'fan')
        g.fanOutBatched = await measureFanOut(gateway, 'fan2', FAN_OUT_BATCH)
      }
      if (PHASES.has('mercure')) results.mercure = await measureMercure(gateway, g.fanOut)
      if (PHASES.has('rows')) g.rows = { unfiltered: await measureRowFanOut(gateway, false), filtered: await measureRowFanOut(gateway, true) }
      if (PHASES.has('paced')) g.paced = await measureEach(PACED_RUNS, async (run, i) => await measurePaced(gateway, `paced${i}`, run))
      if (PHASES.has('publish')) g.publish = await measurePublish(gateway)
      if (PHASES.has('flood')) g.flood = await measureFlood(gateway)
    } finally {
      await gateway.stop()
    }
  }
  if (PHASES.has('listeners') && args.only === undefined) {
    results.listeners = await measureListenerScaling({ adminUrl: args['listeners-database'] ?? args.database, counts: LISTENER_COUNTS, seconds: PUBLISH_SECONDS, log })
  }
  mkdirSync('bench/results', { recursive: true })
  const file = `bench/results/${new Date().toISOString().replace(/[:.]/g, '-')}.json`
  writeFileSync(file, JSON.stringify(results, null, 2) + '\n')
  process.stdout.write(table(results) + `\n(${file})\n`)
}

function table ({ machine, command, nchan, gateway, mercure, listeners }: Results): string {
  const m = (n: number | undefined, d = 2): string => n === undefined || Number.isNaN(n) ? '—' : (n / 1e6).toFixed(d)
  const ms = (n: number | undefined): string => n === undefined || Number.isNaN(n) ? '—' : n.toFixed(1)
  const kb = (n: number | undefined): string => n === undefined || Number.isNaN(n) ? '—' : (n / 1024).toFixed(1)
  const x = (a: number | undefined, b: number | undefined): string => a === undefined || b === undefined ? '—' : `${(a / b).toFixed(2)}×`
  const n0 = (n: number | undefined): string => n === undefined || Number.isNaN(n) ? '—' : n.toFixed(0)
  const gf = gateway?.fanOut
  const nf = nchan?.fanOut
  const gb = gateway?.fanOutBatched
  const rows: string[][] = [['figure', 'Nchan', 'gateway', 'gateway / Nchan', 'target']]
  if (PHASES.has('fan-out')) {
    rows.push(
      [`fan-out, ${STREAMS} streams × ${EVENTS} events, 1 per POST, ${PUBLISH_CONCURRENCY} in flight: deliveries/s (M)`, m(nf?.perSecond), m(gf?.perSecond), x(gf?.perSecond, nf?.perSecond), '≥ 2.5×'],
      ['  every event delivered', nf === undefined ? '—' : `${nf.deliveries}/${nf.expected}`, gf === undefined ? '—' : `${gf.deliveries}/${gf.expected}`, '', 'all'],
      ['  latency p50 (ms)', ms(nf?.p50), ms(gf?.p50), x(gf?.p50, nf?.p50), ''],
      ['  latency p99 (ms)', ms(nf?.p99), ms(gf?.p99), x(gf?.p99, nf?.p99), '≤ 1×'],
      [`  gateway, the same events published ${FAN_OUT_BATCH} per POST /events: deliveries/s (M)`, '', m(gb?.perSecond), x(gb?.perSecond, nf?.perSecond), ''],
      ['    every event delivered / p50 / p99 (ms)', '', gb === undefined ? '—' : `${gb.deliveries}/${gb.expected} / ${ms(gb.p50)} / ${ms(gb.p99)}`, '', '']
    )
  }
  if (PHASES.has('rows')) {
    rows.push(
      [`  gateway, ${EVENTS} row changes of a captured table (INSERTs, ${PUBLISH_CONCURRENCY} connections), unfiltered: deliveries/s (M)`, '', m(gateway?.rows?.unfiltered.perSecond), x(gateway?.rows?.unfiltered.perSecond, gf?.perSecond) + ' of fan-out', ''],
      ['    the same, 10 distinct filter sets (each passes 9 rows in 10): deliveries/s (M)', '', m(gateway?.rows?.filtered.perSecond), x(gateway?.rows?.filtered.perSecond, gf?.perSecond) + ' of fan-out', '≥ 0.5×'],
      ['    every event delivered, unfiltered / filtered', '', gateway?.rows === undefined ? '—' : `${gateway.rows.unfiltered.deliveries}/${gateway.rows.unfiltered.expected} / ${gateway.rows.filtered.deliveries}/${gateway.rows.filtered.expected}`, '', 'all']
    )
  }
  if (mercure !== undefined) {
    const f = mercure.fanOut
    rows.push(
      [`Mercure fan-out, ${STREAMS} subscribers on one topic selector × ${EVENTS} updates: deliveries/s (M)`, '', m(f.perSecond), `${x(f.perSecond, mercure.channelFanOut.perSecond)} channel fan-out (${m(mercure.channelFanOut.perSecond)})`, '≥ 0.8× channel'],
      ['  every update delivered / p50 / p99 (ms)', '', `${f.deliveries}/${f.expected} / ${ms(f.p50)} / ${ms(f.p99)}`, '', 'all']
    )
  }
  if (PHASES.has('paced')) {
    for (const [i, [streams, rate]] of PACED_RUNS.entries()) {
      const np = nchan?.paced?.[i]
      const gp = gateway?.paced?.[i]
      rows.push(
        [`paced, open loop: ${streams} streams × ${rate} events/s (${(streams * rate / 1000).toFixed(0)}k deliveries/s) for ${PACED_SECONDS} s: latency p50 (ms)`, ms(np?.p50), ms(gp?.p50), x(gp?.p50, np?.p50), ''],
        ['  latency p99 (ms)', ms(np?.p99), ms(gp?.p99), x(gp?.p99, np?.p99), '≤ 1×'],
        ['  latency max (ms)', ms(np?.max), ms(gp?.max), x(gp?.max, np?.max), ''],
        ['  every event delivered / publisher late at worst (ms)', np === undefined ? '—' : `${np.deliveries}/${np.expected} / ${ms(np.maxSendLag)}`, gp === undefined ? '—' : `${gp.deliveries}/${gp.expected} / ${ms(gp.maxSendLag)}`, '', 'all'],
        ['  gateway: CPU (% of a core) / publish to 201 (ms) / fan-out of an event (ms)', '', gp?.gateway === undefined ? '—' : `${(100 * gp.gateway.cpuShare).toFixed(0)} / ${gp.gateway.publishMeanMs.toFixed(2)} / ${gp.gateway.fanOutMeanMs.toFixed(3)}`, '', '']
      )
    }
  }
  if (PHASES.has('memory')) {
    for (const [i, n] of IDLE_STEPS.entries()) {
      const ns = nchan?.memory?.steps[i]
      const gs = gateway?.memory?.steps[i]
      rows.push(
        [`memory per idle stream, ${n} streams: RSS (KiB)`, kb(ns?.rssPerStream), kb(gs?.rssPerStream), x(gs?.rssPerStream, ns?.rssPerStream), n === 10000 ? '≤ 5.5' : ''],
        ['  after a full GC: RSS / heap (KiB)', '', `${kb(gs?.rssAfterGcPerStream)} / ${kb(gs?.heapPerStream)}`, '', ''],
        ['  streams held', `${ns?.opened ?? '—'}`, `${gs?.opened ?? '—'}`, '', `${n}`]
      )
    }
  }
  const p = gateway?.publish
  if (p !== undefined) {
    rows.push(
      ['pgbench SELECT pg_notify(...) tps', '', p.pgbenchPerSecond.toFixed(0), '', ''],
      ['single-event POST /channels/:c per s', '', p.singlePerSecond.toFixed(0), `${(100 * p.singlePerSecond / p.pgbenchPerSecond).toFixed(0)}% of pgbench`, '≥ 60%'],
      ['  events per transaction (group commit)', '', p.singleEventsPerTransaction.toFixed(1), '', ''],
      ['  without group commit: pgbench SELECT sse_gateway.publish(...) tps', '', p.pgbenchPublishPerSecond.toFixed(0), `${(100 * p.pgbenchPublishPerSecond / p.pgbenchPerSecond).toFixed(0)}% of pgbench`, ''],
      ['    the same, synchronous_commit=off', '', p.pgbenchPublishAsyncPerSecond.toFixed(0), `${(100 * p.pgbenchPublishAsyncPerSecond / p.pgbenchPerSecond).toFixed(0)}% of pgbench`, ''],
      ['batch POST /events (100 per POST) events/s', '', p.batchEventsPerSecond.toFixed(0), '', '≥ 100,000'],
      ['  events per transaction (group commit)', '', p.batchEventsPerTransaction.toFixed(1), '', '']
    )
  }
  const f = gateway?.flood
  if (f !== undefined) {
    rows.push(
      [`flood ${f.megabytes.toFixed(0)} MiB, 1 stalled + 20 readers: RSS growth (MiB)`, '', f.rssGrowthMiB.toFixed(1), '', '< 150'],
      ['  readers got every event / stalled cut off / resumed whole', '', `${f.othersComplete ? 'yes' : 'NO'} / ${f.stalledCutOff ? 'yes' : 'NO'} / ${f.resumedComplete ? 'yes' : 'NO'}`, '', 'yes / yes / yes']
    )
  }
  for (const l of listeners?.rows ?? []) {
    const head = `PostgreSQL, ${l.listeners} listening session${l.listeners === 1 ? '' : 's'} on the channel`
    if (l.skipped !== undefined) {
      rows.push([head, '', `skipped: ${l.skipped}`, '', ''])
      continue
    }
    rows.push(
      [`${head}: tps of bare pg_notify / publish() / events/s of publish_batch(100)`, '', `${n0(l.notifyPerSecond)} / ${n0(l.singlePerSecond)} / ${n0(l.batchEventsPerSecond)}`, '', ''],
      [`  publish() at ${listeners?.pacedRate ?? '?'}/s, to every session: latency p50 / p99 / max (ms)`, '', `${ms(l.p50)} / ${ms(l.p99)} / ${ms(l.max)}`, '', ''],
      ['  every session got every NOTIFY / queue usage at most', '', `${l.complete === true ? 'yes' : 'NO'} / ${((l.peakQueueUsage ?? 0) * 100).toFixed(2)}%`, '', '']
    )
  }
  const widths = rows[0]?.map((_, i) => Math.max(...rows.map((r) => (r[i] ?? '').length))) ?? []
  const line = (r: string[]): string => '| ' + r.map((c, i) => c.padEnd(widths[i] ?? 0)).join(' | ') + ' |'
  return [
    `machine: ${machine}`,
    `command: ${command}`,
    '',
    line(rows[0] as string[]),
    '| ' + widths.map((w) => '-'.repeat(w)).join(' | ') + ' |',
    ...rows.slice(1).map(line)
  ].join('\n')
}

main().catch((err: unknown) => {
  process.stderr.write(`bench failed: ${(err as Error).stack ?? String(err)}\n`)
  process.exit(1)
})
