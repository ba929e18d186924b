// fastify-sse-v2 against the gateway's own writer, side by side: the CPU
// time a server spends per delivered event, and the heap each idle stream
// holds. README "Choices worth knowing" quotes what it prints.
//
//   node --import tsx bench/sse-v2.ts [--clients 1000] [--events 200] [--rounds 3]
//
// Each variant runs in a server process of its own (this file with --serve),
// which holds the streams and is told to send the events; the clients are
// raw sockets in this process, counting the events they receive, so the
// server's process.cpuUsage() covers its own work alone. Variants alternate,
// round after round, on the same machine.
//   gateway: each event framed once (src/sse.ts) and the same Buffer handed
//            to every stream (src/event-stream.ts), as the hub does.
//   sse-v2:  reply.sse({ id, event, data }) on each client's reply, as the
//            package's README shows: it serializes and queues per client.
import { fork } from 'node:child_process'
import { connect, type Socket } from 'node:net'
import { parseArgs } from 'node:util'
import Fastify from 'fastify'
import { FastifySSEPlugin } from 'fastify-sse-v2'
import { EVENT_STREAM_HEADERS, EventStream, FlushLine } from '../src/event-stream.js'
import { encodeEvent } from '../src/sse.js'

type Variant = 'gateway' | 'sse-v2'
type ToServer = { type: 'send', events: number } | { type: 'cpu' } | { type: 'heap' }
type FromServer = { type: 'listening', port: number } | { type: 'cpu', micros: number } | { type: 'heap', bytes: number } | { type: 'sent' }

const PAYLOAD = JSON.stringify({ kind: 'bench', value: 'x'.repeat(64) })

async function serve (variant: Variant): Promise<void> {
  const app = Fastify({ logger: false })
  const send = process.send?.bind(process)
  if (send === undefined) throw new Error('--serve runs as a child process')
  // What a delivery costs is measured from the first event on.
  let cpuAtStart = process.cpuUsage()
  const gc = (globalThis as { gc?: () => void }).gc
  if (variant === 'sse-v2') {
    const replies: Array<{ sse: (e: { id: string, event: string, data: string }) => void }> = []
    await app.register(FastifySSEPlugin, { retryDelay: 3000 })
    app.get('/s', async (_request, reply) => {
      replies.push(reply)
      reply.sse({ event: 'open', data: '{}' })
      return reply
    })
    process.on('message', (message: ToServer) => {
      if (message.type !== 'send') return
      cpuAtStart = process.cpuUsage()
      let i = 0
      // One event per turn of the loop, as notifications come from the listener.
      const next = (): void => {
        const id = String(++i)
        for (const reply of replies) reply.sse({ id, event: 'bench', data: PAYLOAD })
        if (i < message.events) setImmediate(next)
        else send({ type: 'sent' })
      }
      next()
    })
  } else {
    const streams: EventStream[] = []
    const line = new FlushLine()
    app.get('/s', async (_request, reply) => {
      reply.hijack()
      const stream = new EventStream(reply.raw, { maxBufferedBytes: 1 << 20, line }, { streamClosed () {}, streamCutOff () {} })
      stream.open(EVENT_STREAM_HEADERS, encodeEvent({ event: 'open', data: '{}' }))
      streams.push(stream)
    })
    process.on('message', (message: ToServer) => {
      if (message.type !== 'send') return
      cpuAtStart = process.cpuUsage()
      let i = 0
      const next = (): void => {
        const id = ++i
        const frame = Buffer.from(encodeEvent({ id: String(id), event: 'bench', data: PAYLOAD }))
        for (const stream of streams) stream.write(frame)
        if (i < message.events) setImmediate(next)
        else send({ type: 'sent' })
      }
      next()
    })
  }
  process.on('message', (message: ToServer) => {
    if (message.type === 'cpu') {
      const { user, system } = process.cpuUsage(cpuAtStart)
      send({ type: 'cpu', micros: user + system })
    } else if (message.type === 'heap') {
      gc?.()
      send({ type: 'heap', bytes: process.memoryUsage().heapUsed })
    }
  })
  await app.listen({ host: '127.0.0.1', port: 0 })
  const address = app.server.address()
  send({ type: 'listening', port: typeof address === 'object' && address !== null ? address.port : 0 })
}

interface Client {
  socket: Socket
  events: number
  tail: string
}

/** Counts `event: bench` lines across chunk boundaries. */
function countEvents (client: Client, chunk: string): void {
  const text = client.tail + chunk
  let at = text.indexOf('event: bench\n')
  while (at !== -1) {
    client.events++
    at = text.indexOf('event: bench\n', at + 1)
  }
  client.tail = text.slice(-12)
}

async function run (variant: Variant, clients: number, events: number): Promise<{ microsPerDelivery: number, heapPerStream: number }> {
  const child = fork(new URL(import.meta.url), ['--serve', variant], { execArgv: ['--import', 'tsx', '--expose-gc'] })
  const next = async <T extends FromServer['type']>(type: T): Promise<Extract<FromServer, { type: T }>> =>
    await new Promise((resolve) => {
      const on = (message: FromServer): void => {
        if (message.type !== type) return
        child.off('message', on)
        resolve(message as Extract<FromServer, { type: T }>)
      }
      child.on('message', on)
    })
  try {
    const { port } = await next('listening')
    child.send({ type: 'heap' })
    const heapBefore = (await next('heap')).bytes
    const open: Client[] = []
    // In batches, as a crowd of clients arrives, without flooding the backlog.
    for (let batch = 0; batch < clients; batch += 100) {
      await Promise.all(Array.from({ length: Math.min(100, clients - batch) }, async () => {
        const client: Client = { socket: connect(port, '127.0.0.1'), events: 0, tail: '' }
        client.socket.setEncoding('utf8')
        await new Promise<void>((resolve, reject) => {
          client.socket.once('error', reject)
          client.socket.write('GET /s HTTP/1.1\r\nHost: bench\r\nAccept: text/event-stream\r\n\r\n')
          client.socket.once('data', () => resolve())
        })
        client.socket.on('data', (chunk: string) => countEvents(client, chunk))
        open.push(client)
      }))
    }
    child.send({ type: 'heap' })
    const heapPerStream = ((await next('heap')).bytes - heapBefore) / clients

    child.send({ type: 'send', events })
    await next('sent')
    // Until every client has every event: the server's flushes are part of the cost.
    await new Promise<void>((resolve) => {
      const check = (): void => { if (open.every((c) => c.events >= events)) resolve(); else setTimeout(check, 5) }
      check()
    })
    child.send({ type: 'cpu' })
    const { micros } = await next('cpu')
    for (const client of open) client.socket.destroy()
    return { microsPerDelivery: micros / (clients * events), heapPerStream }
  } finally {
    child.kill()
  }
}

async function main (): Promise<void> {
  const { values } = parseArgs({
    options: {
      serve: { type: 'string' },
      clients: { type: 'string', default: '1000' },
      events: { type: 'string', default: '200' },
      rounds: { type: 'string', default: '3' }
    }
  })
  if (values.serve !== undefined) {
    await serve(values.serve as Variant)
    return
  }
  const clients = Number(values.clients)
  const events = Number(values.events)
  process.stdout.write(`${clients} clients × ${events} events over loopback, server CPU (user + system) per delivery\n`)
  process.stdout.write('round  gateway µs  sse-v2 µs  ratio  heap/stream gateway  sse-v2\n')
  for (let round = 1; round <= Number(values.rounds); round++) {
    const ours = await run('gateway', clients, events)
    const theirs = await run('sse-v2', clients, events)
    process.stdout.write(`${String(round).padStart(5)}  ${ours.microsPerDelivery.toFixed(2).padStart(10)}  ${theirs.microsPerDelivery.toFixed(2).padStart(9)}  ${(theirs.microsPerDelivery / ours.microsPerDelivery).toFixed(1).padStart(5)}  ${(ours.heapPerStream / 1024).toFixed(1).padStart(16)} KB  ${(theirs.heapPerStream / 1024).toFixed(1).padStart(3)} KB\n`)
  }
}

await main()
