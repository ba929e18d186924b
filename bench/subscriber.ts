// A worker thread holding many SSE streams on raw sockets. It counts events
// by a marker in their data and records, for the i-th event a stream
// receives, the time since the i-th event was sent (the send times are
// shared by the publisher). It parses no SSE beyond that: the load generator
// must be cheaper per event than what it measures, for Nchan and the gateway
// alike.
import { connect, type Socket } from 'node:net'
import { parentPort, workerData } from 'node:worker_threads'
import { newHistogram, now, record } from './histogram.js'

export interface SubscriberConfig {
  host: string
  port: number
  /** The request line's target, e.g. `/events?channel=x`; several are taken in turn, one per stream. */
  paths: string[]
  headers: Record<string, string>
  streams: number
  /** Bytes that begin every counted event's data line, e.g. `data: b`. */
  marker: string
  /** Float64Array over this SharedArrayBuffer: send time of the i-th event (index i-1). */
  sendTimes: SharedArrayBuffer
  /** Connections opened at once. */
  connectConcurrency: number
  /** The loopback address the connections come from (127.0.0.x): each address has its own ephemeral ports. */
  localAddress?: string
}

export type ToSubscriber =
  | { type: 'expect', events: number }
  | { type: 'close' }

export type FromSubscriber =
  | { type: 'ready', failed: number, statuses: string[] }
  | { type: 'done', received: number[], closedEarly: number, lastReceiveAt: number, histogram: Uint32Array }
  | { type: 'closed' }

interface Stream {
  socket: Socket
  headerDone: boolean
  header: string
  received: number
  tail: Buffer
  closed: boolean
}

const config = workerData as SubscriberConfig
const port = parentPort
if (port === null) throw new Error('subscriber.ts runs as a worker thread')

const marker = Buffer.from(config.marker)
const keep = marker.length - 1
const sendTimes = new Float64Array(config.sendTimes)
const histogram = newHistogram()
const streams: Stream[] = []
let expected = Infinity
let complete = 0
let closedEarly = 0
let lastReceiveAt = 0
let doneSent = false
const requests = config.paths.map((path) => `GET ${path} HTTP/1.1\r\nHost: ${config.host}:${config.port}\r\nAccept: text/event-stream\r\n` +
  Object.entries(config.headers).map(([k, v]) => `${k}: ${v}\r\n`).join('') + '\r\n')

function countMarkers (chunk: Buffer, from: number): number {
  let n = 0
  let at = chunk.indexOf(marker, from)
  while (at !== -1) {
    n++
    at = chunk.indexOf(marker, at + marker.length)
  }
  return n
}

function onBody (stream: Stream, chunk: Buffer, from: number): void {
  let n = countMarkers(chunk, from)
  // A marker split by a TCP read: the end of the last read and the start of this one.
  if (stream.tail.length > 0) n += countMarkers(Buffer.concat([stream.tail, chunk.subarray(from, from + keep)]), 0)
  stream.tail = chunk.length - from >= keep ? chunk.subarray(chunk.length - keep) : Buffer.concat([stream.tail, chunk.subarray(from)]).subarray(-keep)
  if (n === 0) return
  const at = now()
  lastReceiveAt = at
  const first = stream.received
  stream.received += n
  for (let i = first; i < stream.received; i++) {
    const sent = sendTimes[i]
    if (sent !== undefined && sent > 0) record(histogram, at - sent)
  }
  if (stream.received >= expected && first < expected) {
    complete++
    checkDone()
  }
}

function checkDone (): void {
  if (doneSent || complete + closedEarly < streams.length) return
  doneSent = true
  const message: FromSubscriber = { type: 'done', received: streams.map((s) => s.received), closedEarly, lastReceiveAt, histogram }
  port?.postMessage(message)
}

function open (): Promise<string> {
  return new Promise((resolve) => {
    const socket = connect({ host: config.host, port: config.port, noDelay: true, localAddress: config.localAddress })
    const stream: Stream = { socket, headerDone: false, header: '', received: 0, tail: Buffer.alloc(0), closed: false }
    let settled = false
    const settle = (status: string): void => {
      if (settled) return
      settled = true
      resolve(status)
    }
    const request = requests[streams.length % requests.length] as string
    socket.on('connect', () => socket.write(request))
    socket.on('data', (chunk: Buffer) => {
      if (stream.headerDone) {
        onBody(stream, chunk, 0)
        return
      }
      stream.header += chunk.toString('latin1')
      const end = stream.header.indexOf('\r\n\r\n')
      if (end === -1) return
      stream.headerDone = true
      const status = stream.header.slice(0, stream.header.indexOf('\r\n'))
      const bodyStart = chunk.length - (stream.header.length - end - 4)
      stream.header = ''
      settle(status)
      if (bodyStart < chunk.length) onBody(stream, chunk, bodyStart)
    })
    socket.on('error', () => {})
    socket.on('close', () => {
      stream.closed = true
      settle('closed before the response')
      if (stream.received < expected) {
        closedEarly++
        checkDone()
      }
    })
    streams.push(stream)
  })
}

async function openAll (): Promise<void> {
  const statuses: string[] = []
  let next = 0
  const runners = Array.from({ length: Math.min(config.connectConcurrency, config.streams) }, async () => {
    while (next < config.streams) {
      next++
      statuses.push(await open())
    }
  })
  await Promise.all(runners)
  const failed = statuses.filter((s) => !/^HTTP\/1\.1 200/.test(s))
  const message: FromSubscriber = { type: 'ready', failed: failed.length, statuses: [...new Set(failed)].slice(0, 3) }
  port?.postMessage(message)
}

port.on('message', (message: ToSubscriber) => {
  if (message.type === 'expect') {
    expected = message.events
    complete = streams.filter((s) => s.received >= expected).length
    checkDone()
  } else if (message.type === 'close') {
    let open = streams.filter((s) => !s.closed).length
    const closed: FromSubscriber = { type: 'closed' }
    if (open === 0) port.postMessage(closed)
    for (const s of streams) {
      if (s.closed) continue
      s.socket.once('close', () => { if (--open === 0) port.postMessage(closed) })
      s.socket.destroy()
    }
  }
})

openAll().catch((err: Error) => { throw err })
