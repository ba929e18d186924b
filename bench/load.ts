// The load generator, used identically against every target: subscribers in
// worker threads on raw sockets, a publisher on keep-alive HTTP connections.
import { Agent, request } from 'node:http'
import { Worker } from 'node:worker_threads'
import { merge, newHistogram, now } from './histogram.js'
import type { FromSubscriber, SubscriberConfig, ToSubscriber } from './subscriber.js'
import type { Target } from './targets.js'

export const MARKER = 'data: b'

export interface Subscribers {
  /** Send time of the i-th event (index i-1), read by the workers. */
  sendTimes: Float64Array
  /** Streams that did not get a 200. */
  failed: number
  /** Resolves once every stream has `events` events, or was closed. */
  expect (events: number): Promise<Delivery>
  close (): Promise<void>
}

export interface Delivery {
  received: number[]
  closedEarly: number
  lastReceiveAt: number
  histogram: Uint32Array
}

// Each worker thread opens its connections from its own loopback address,
// so that 18,000 streams (and the TIME_WAIT of earlier phases) do not run
// out of one address's ephemeral ports.
let nextLocalAddress = 0

// A .mjs entry that registers tsx, then loads subscriber.ts.
const SUBSCRIBER_URL = new URL('./subscriber-entry.mjs', import.meta.url)

/**
 * Opens `streams` streams split over `workers` threads; resolves when all
 * answered. Several paths are taken in turn, one per stream; `marker`
 * begins the data of every event counted.
 */
export async function openSubscribers (target: Target, path: string | readonly string[], streams: number, workers: number, maxEvents: number, marker = MARKER): Promise<Subscribers> {
  const shared = new SharedArrayBuffer(8 * maxEvents)
  const threads: Worker[] = []
  const ready: Array<Promise<FromSubscriber>> = []
  for (let w = 0; w < workers; w++) {
    const share = Math.floor(streams / workers) + (w < streams % workers ? 1 : 0)
    const config: SubscriberConfig = {
      host: target.host,
      port: target.port,
      paths: typeof path === 'string' ? [path] : [...path],
      headers: target.subscribeHeaders,
      streams: share,
      marker,
      sendTimes: shared,
      connectConcurrency: 100,
      localAddress: target.host === '127.0.0.1' ? `127.0.0.${1 + (nextLocalAddress++ % 8)}` : undefined
    }
    const worker = new Worker(SUBSCRIBER_URL, { workerData: config })
    worker.on('error', (err) => { throw err })
    threads.push(worker)
    ready.push(nextMessage(worker, 'ready'))
  }
  const answers = await Promise.all(ready)
  let failed = 0
  for (const a of answers) {
    if (a.type !== 'ready') continue
    failed += a.failed
    if (a.failed > 0) process.stderr.write(`  ${a.failed} streams failed: ${a.statuses.join(' | ')}\n`)
  }
  return {
    sendTimes: new Float64Array(shared),
    failed,
    async expect (events) {
      const done = threads.map((t) => nextMessage(t, 'done'))
      for (const t of threads) t.postMessage({ type: 'expect', events } satisfies ToSubscriber)
      const results = await Promise.all(done)
      const histogram = newHistogram()
      const delivery: Delivery = { received: [], closedEarly: 0, lastReceiveAt: 0, histogram }
      for (const r of results) {
        if (r.type !== 'done') continue
        delivery.received.push(...r.received)
        delivery.closedEarly += r.closedEarly
        delivery.lastReceiveAt = Math.max(delivery.lastReceiveAt, r.lastReceiveAt)
        merge(histogram, r.histogram)
      }
      return delivery
    },
    async close () {
      const closed = threads.map((t) => nextMessage(t, 'closed'))
      for (const t of threads) t.postMessage({ type: 'close' } satisfies ToSubscriber)
      await Promise.all(closed)
      await Promise.all(threads.map((t) => t.terminate()))
    }
  }
}

function nextMessage (worker: Worker, type: FromSubscriber['type']): Promise<FromSubscriber> {
  return new Promise((resolve) => {
    const on = (m: FromSubscriber): void => {
      if (m.type !== type) return
      worker.off('message', on)
      resolve(m)
    }
    worker.on('message', on)
  })
}

export interface PostResult {
  status: number
  body: string
}

/** A keep-alive HTTP client for one target. */
export class Poster {
  readonly #agent: Agent
  readonly #host: string
  readonly #port: number

  constructor (host: string, port: number, connections: number) {
    this.#agent = new Agent({ keepAlive: true, maxSockets: connections })
    this.#host = host
    this.#port = port
  }

  post (path: string, headers: Record<string, string>, body: string | Buffer): Promise<PostResult> {
    return new Promise((resolve, reject) => {
      const req = request({ host: this.#host, port: this.#port, method: 'POST', path, headers: { ...headers, 'content-length': Buffer.byteLength(body) }, agent: this.#agent }, (res) => {
        const chunks: Buffer[] = []
        res.on('data', (c: Buffer) => chunks.push(c))
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: Buffer.concat(chunks).toString() }))
        res.on('error', reject)
      })
      req.on('error', reject)
      req.end(body)
    })
  }

  close (): void {
    this.#agent.destroy()
  }
}

/** A payload of `size` bytes beginning with `b<seq> `. */
export function payload (seq: number, size: number): string {
  const head = `b${seq} `
  return head + 'x'.repeat(Math.max(0, size - head.length))
}

/**
 * Publishes events 1..count, `concurrency` requests in flight, `batch`
 * events per request (1: the single-event publish), recording each send
 * time in `sendTimes`. Resolves with the time the first was sent and the
 * statuses that were not a success.
 */
export async function publishEvents (target: Target, channel: string, count: number, size: number, concurrency: number, sendTimes: Float64Array, batch = 1): Promise<{ firstSentAt: number, errors: Map<number, number> }> {
  const poster = new Poster(target.host, target.port, concurrency)
  const single = target.publishRequest(channel)
  const errors = new Map<number, number>()
  let next = 0
  const firstSentAt = now()
  await Promise.all(Array.from({ length: concurrency }, async () => {
    while (next < count) {
      const first = next + 1
      next = Math.min(count, next + batch)
      const at = now()
      for (let seq = first; seq <= next; seq++) sendTimes[seq - 1] = at
      let res: PostResult
      if (batch === 1 || target.publishBatchRequest === undefined) {
        const body = payload(first, size)
        res = await poster.post(single.path, single.headers, target.publishBody?.(channel, body) ?? body)
      } else {
        const payloads = Array.from({ length: next - first + 1 }, (_, i) => payload(first + i, size))
        const { path, headers, body } = target.publishBatchRequest(channel, payloads)
        res = await poster.post(path, headers, body)
      }
      if (res.status < 200 || res.status > 299) errors.set(res.status, (errors.get(res.status) ?? 0) + 1)
    }
  }))
  poster.close()
  return { firstSentAt, errors }
}

export interface PacedRun {
  /** Events whose send was due after the warm-up (the ones measured). */
  measured: number
  /** How late the publisher sent an event at worst (ms): above a few ms the load was not open loop any more. */
  maxSendLag: number
  errors: Map<number, number>
}

/**
 * Publishes events 1..rate × (warmUp + seconds) at a fixed rate, open loop:
 * each is sent when due, whatever the answers to earlier ones (up to
 * `connections` requests in flight). Its latency counts from when it was
 * due, so that a server that holds the publisher back is not flattered
 * (coordinated omission). The warm-up's events get no send time, so the
 * subscribers do not measure them.
 */
export async function publishPaced (target: Target, channel: string, rate: number, seconds: number, warmUp: number, size: number, connections: number, sendTimes: Float64Array): Promise<PacedRun> {
  const poster = new Poster(target.host, target.port, connections)
  const single = target.publishRequest(channel)
  const errors = new Map<number, number>()
  const total = Math.round(rate * (warmUp + seconds))
  const warm = Math.round(rate * warmUp)
  const interval = 1000 / rate
  const start = now() + 50
  let maxSendLag = 0
  const inFlight = new Set<Promise<void>>()
  for (let seq = 1; seq <= total; seq++) {
    const due = start + (seq - 1) * interval
    const wait = due - now()
    if (wait > 1) await new Promise((resolve) => setTimeout(resolve, wait - 0.5))
    while (now() < due) { /* the last half millisecond, spun */ }
    if (seq > warm) {
      sendTimes[seq - 1] = due
      maxSendLag = Math.max(maxSendLag, now() - due)
    }
    const sent = poster.post(single.path, single.headers, payload(seq, size)).then((res) => {
      if (res.status < 200 || res.status > 299) errors.set(res.status, (errors.get(res.status) ?? 0) + 1)
    }, () => { errors.set(0, (errors.get(0) ?? 0) + 1) }).finally(() => inFlight.delete(sent))
    inFlight.add(sent)
  }
  await Promise.all(inFlight)
  poster.close()
  return { measured: total - warm, maxSendLag, errors }
}
