import { execFileSync } from 'node:child_process'
import { once } from 'node:events'
import { createServer, type IncomingMessage, type ServerResponse } from 'node:http'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { setFlagsFromString } from 'node:v8'
import { runInNewContext } from 'node:vm'
import t from 'tap'
import { EVENT_STREAM_HEADERS, EventStream, type EventStreamOptions, FlushLine } from '../src/event-stream.js'
import { Subscriber } from '../src/stream-core.js'
import { encodeEvent } from '../src/sse.js'
import { type Test, waitFor } from './helper.js'

interface Served {
  /** The stream's seam (src/stream-core.ts): it holds until released, and keeps ids growing. */
  stream: Subscriber
  /** What the seam writes to: the response, its queue and its bound. */
  writer: EventStream
  /** The connection, once the stream has taken it over. */
  socket: Socket
  /** node:http's objects of the request, which the stream should not keep. */
  http: { req: WeakRef<IncomingMessage>, res: WeakRef<ServerResponse> }
  /** Every chunk written to the socket after the head, in order, without its chunk framing. */
  writes: Buffer[]
  cutOff: () => number
  /** Frames the cut-offs threw away. */
  dropped: () => number
}

/** A raw HTTP client: reads the response as bytes, or stops reading. */
class RawClient {
  readonly socket: Socket
  #bytes: Buffer[] = []
  #length = 0
  /** The last bytes received, kept even when the rest is not. */
  tail = ''
  closed = false
  /** The error the socket ended with (ECONNRESET for a reset), if any. */
  errorCode: string | undefined
  /** False: count the bytes, keep only the tail (a client that reads a flood). */
  keep = true

  constructor (socket: Socket) {
    this.socket = socket
    socket.on('data', (chunk: Buffer) => {
      if (this.keep) this.#bytes.push(chunk)
      this.#length += chunk.length
      this.tail = (this.tail + chunk.subarray(-256).toString('latin1')).slice(-256)
    })
    socket.on('close', () => { this.closed = true })
    socket.on('error', (err: NodeJS.ErrnoException) => { this.errorCode = err.code })
  }

  get length (): number {
    return this.#length
  }

  /** The response body, de-chunked. */
  get body (): string {
    const raw = Buffer.concat(this.#bytes).toString('latin1')
    let at = raw.indexOf('\r\n\r\n') + 4
    let body = ''
    for (;;) {
      const eol = raw.indexOf('\r\n', at)
      if (eol === -1) break
      const size = parseInt(raw.slice(at, eol), 16)
      if (Number.isNaN(size) || size === 0 || eol + 2 + size > raw.length) break
      body += raw.slice(eol + 2, eol + 2 + size)
      at = eol + 2 + size + 2
    }
    return Buffer.from(body, 'latin1').toString()
  }
}

/** The data of one HTTP/1.1 chunk (`size CRLF data CRLF`), checking its framing. */
function unframe (chunk: Buffer): Buffer {
  const eol = chunk.indexOf('\r\n')
  const size = parseInt(chunk.subarray(0, eol).toString('latin1'), 16)
  if (eol < 1 || chunk.length !== eol + 2 + size + 2 || chunk.subarray(-2).toString() !== '\r\n') throw new Error(`not one HTTP/1.1 chunk: ${JSON.stringify(chunk.toString('latin1').slice(0, 40))}`)
  return chunk.subarray(eol + 2, eol + 2 + size)
}

/** An HTTP server whose every request becomes an EventStream, closed when the test ends. */
async function serve (t: Test, options: Partial<EventStreamOptions> = {}): Promise<{ open: (version?: '1.1' | '1.0') => Promise<[Served, RawClient]> }> {
  const waiting: Array<(served: Served) => void> = []
  const line = new FlushLine()
  t.teardown(() => line.close())
  const server = createServer((req: IncomingMessage, res: ServerResponse) => {
    const http = { req: new WeakRef(req), res: new WeakRef(res) }
    const chunked = req.httpVersion !== '1.0'
    let cutOffs = 0
    let dropped = 0
    const writes: Buffer[] = []
    const socket = res.socket as Socket
    const writer = new EventStream(res, { maxBufferedBytes: 256 * 1024, line, ...options }, {
      streamClosed () {},
      streamCutOff (frames) { cutOffs++; dropped += frames }
    })
    // Live events held during set-up count toward the same bound.
    const stream = new Subscriber(writer, options.maxBufferedBytes ?? 256 * 1024)
    writer.open(EVENT_STREAM_HEADERS, 'retry: 1000\n\n')
    const write = socket.write.bind(socket) as (chunk: Buffer) => boolean
    socket.write = ((chunk: Buffer) => {
      writes.push(chunked ? unframe(chunk) : chunk)
      return write(chunk)
    }) as typeof socket.write
    waiting.shift()?.({ stream, writer, socket, http, writes, cutOff: () => cutOffs, dropped: () => dropped })
  })
  server.listen(0, '127.0.0.1')
  await once(server, 'listening')
  const sockets = new Set<Socket>()
  t.teardown(async () => {
    for (const s of sockets) s.destroy()
    server.closeAllConnections()
    server.close()
    await once(server, 'close')
  })
  const { port } = server.address() as AddressInfo
  return {
    async open (version = '1.1') {
      const served = new Promise<Served>((resolve) => waiting.push(resolve))
      const socket = connect({ port, host: '127.0.0.1' })
      sockets.add(socket)
      const client = new RawClient(socket)
      socket.write(`GET /events HTTP/${version}\r\nHost: test\r\n\r\n`)
      return [await served, client]
    }
  }
}

const turn = async (): Promise<void> => { await new Promise((resolve) => setImmediate(resolve)) }

/**
 * The kernel's sockets from `port` to `peerPort` that still hold bytes to
 * send, as `ss` lists them (Linux): a socket closed with unsent bytes lives
 * on in FIN-WAIT-1 or CLOSING until the peer reads them or the kernel gives up.
 */
function orphans (port: number, peerPort: number): string[] {
  const out = execFileSync('ss', ['-tnH', 'state', 'fin-wait-1', 'state', 'closing', 'state', 'last-ack', `( sport = :${port} and dport = :${peerPort} )`], { encoding: 'utf8' })
  return out.split('\n').filter((line) => line.trim() !== '')
}

const frame = (id: number, data = `event ${id}`): Buffer => Buffer.from(encodeEvent({ id: String(id), event: 'c', data }))

t.test('the frames of one turn go out as one write, in order', async (t) => {
  const tally = { bytesWritten: 0 }
  const { open } = await serve(t, { tally })
  const [served, client] = await open()
  served.stream.release()
  const frames = Array.from({ length: 500 }, (_, i) => frame(i + 1))
  for (const [i, f] of frames.entries()) served.stream.write(f, i + 1)
  t.equal(served.writes.length, 0, 'nothing written while the turn runs')
  const expected = Buffer.concat(frames).toString()
  await waitFor(() => client.body.length >= expected.length + 'retry: 1000\n\n'.length, 'the frames')
  t.equal(served.writes.length, 1, 'one write for the whole burst')
  t.equal(client.body, 'retry: 1000\n\n' + expected, 'every frame, in order, unchanged')

  // The next turn's frames are a write of their own, after the first.
  served.stream.write(frame(501), 501)
  served.stream.write(frame(502), 502)
  await waitFor(() => served.writes.length === 2, 'the second write')
  t.equal(served.writes[1]?.toString(), frame(501).toString() + frame(502).toString())
  t.equal(tally.bytesWritten, served.writes.reduce((n, w) => n + w.length, 0), 'the tally counts every byte written')
})

t.test('the same Buffer may go to many streams, each keeping its own order', async (t) => {
  const { open } = await serve(t)
  const pairs = await Promise.all([open(), open(), open()])
  for (const [served] of pairs) served.stream.release()
  const shared = Array.from({ length: 100 }, (_, i) => frame(i + 1))
  for (const [i, f] of shared.entries()) {
    for (const [served] of pairs) served.stream.write(f, i + 1)
    // Interleave turns: some frames go alone, some together.
    if (i % 7 === 0) await turn()
  }
  const expected = 'retry: 1000\n\n' + Buffer.concat(shared).toString()
  for (const [, client] of pairs) await waitFor(() => client.body.length >= expected.length, 'the frames')
  for (const [, client] of pairs) t.equal(client.body, expected)
})

t.test('streams flushed in a row with different frames each get their own', async (t) => {
  const { open } = await serve(t)
  const pairs = await Promise.all([open(), open(), open(), open()])
  for (const [served] of pairs) served.stream.release()
  const [a, b, c, d] = pairs.map(([served]) => served.stream) as [Subscriber, Subscriber, Subscriber, Subscriber]
  const x = frame(1)
  const y = frame(2)
  const z = frame(3, 'event 2') // as long as y
  // In the flush line in this order: a and c queue the same Buffers, b the
  // same first one and another of the same length, d the same ones plus one.
  a.write(x, 1); b.write(x, 1); c.write(x, 1); d.write(x, 1)
  a.write(y, 2); b.write(z, 3); c.write(y, 2); d.write(y, 2)
  d.write(frame(4), 4)
  const expected = [
    x.toString() + y.toString(),
    x.toString() + z.toString(),
    x.toString() + y.toString(),
    x.toString() + y.toString() + frame(4).toString()
  ].map((body) => 'retry: 1000\n\n' + body)
  for (const [i, [, client]] of pairs.entries()) await waitFor(() => client.body.length >= (expected[i] as string).length, `stream ${i}`)
  t.same(pairs.map(([, client]) => client.body), expected)
})

t.test('ids only grow: an event at or below the last id is dropped', async (t) => {
  const { open } = await serve(t)
  const [served, client] = await open()
  served.stream.startAfter(5)
  served.stream.release()
  for (const id of [3, 5, 6, 6, 4, 8, 7]) served.stream.write(frame(id), id)
  served.stream.write(Buffer.from(': plain\n\n'))
  const expected = 'retry: 1000\n\n' + frame(6).toString() + frame(8).toString() + ': plain\n\n'
  await waitFor(() => client.body.length >= expected.length, 'the frames')
  t.equal(client.body, expected)
})

t.test('events held during set-up follow the replay, in order, without duplicates', async (t) => {
  const { open } = await serve(t)
  const [served, client] = await open()
  served.stream.startAfter(1)
  // Live events arrive while the replay reads the log: held.
  served.stream.write(frame(3), 3)
  served.stream.write(frame(4), 4)
  t.equal(served.writes.length, 0, 'held, not written')
  t.ok(served.stream.replay(frame(2), 2))
  t.ok(served.stream.replay(frame(3), 3))
  await served.writer.drained()
  served.stream.release()
  served.stream.write(frame(5), 5)
  const expected = 'retry: 1000\n\n' + [2, 3, 4, 5].map((id) => frame(id).toString()).join('')
  await waitFor(() => client.body.length >= expected.length, 'the frames')
  t.equal(client.body, expected, 'replayed 2 and 3, then the held 4 (3 dropped), then live 5')
})

t.test('end() writes what is queued, then ends the response', async (t) => {
  const { open } = await serve(t)
  const [served, client] = await open()
  served.stream.release()
  served.stream.write(frame(1), 1)
  served.stream.write(frame(2), 2)
  served.writer.end().catch(() => {})
  t.ok(served.writer.ended)
  await waitFor(() => client.closed || client.body.endsWith(frame(2).toString()), 'the end')
  t.equal(client.body, 'retry: 1000\n\n' + frame(1).toString() + frame(2).toString())
  served.stream.write(frame(3), 3)
  await turn()
  t.equal(served.writes.length, 1, 'nothing written after the end')
  await waitFor(() => client.closed, 'the connection to close')
  t.ok(client.tail.endsWith(frame(2).toString() + '\r\n0\r\n\r\n'), 'the body ends with the last chunk, and the connection closes')
})

t.test('once its head is sent, a stream keeps only its socket: node:http\'s request, response and parser are let go', async (t) => {
  setFlagsFromString('--expose-gc')
  const gc = runInNewContext('gc') as () => void
  const { open } = await serve(t)
  const [served, client] = await open()
  served.stream.release()
  await turn()
  gc()
  t.equal(served.http.req.deref(), undefined, 'the request is collected')
  t.equal(served.http.res.deref(), undefined, 'the response is collected')
  t.equal((served.socket as Socket & { parser?: unknown }).parser ?? null, null, 'the parser is returned to its pool')
  t.same(served.socket.listeners('data').map((f) => f.name), ['#onSocketData'], 'only the stream reads the socket')
  // It still works as a stream.
  served.stream.write(frame(1), 1)
  await waitFor(() => client.body.endsWith(frame(1).toString()), 'the frame')
  // Whatever the client sends behind its stream closes the connection.
  client.socket.write('GET /next HTTP/1.1\r\nHost: test\r\n\r\n')
  await waitFor(() => client.closed, 'the connection to close')
  t.ok(served.writer.ended)
})

t.test('an HTTP/1.0 client gets the events without chunk framing, ended by the close', async (t) => {
  const { open } = await serve(t)
  const [served, client] = await open('1.0')
  served.stream.release()
  served.stream.write(frame(1), 1)
  served.stream.write(frame(2), 2)
  await waitFor(() => client.tail.endsWith(frame(2).toString()), 'the frames')
  served.writer.end().catch(() => {})
  await waitFor(() => client.closed, 'the connection to close')
  const raw = client.tail
  t.ok(raw.endsWith('\r\n\r\nretry: 1000\n\n' + frame(1).toString() + frame(2).toString()), 'the body as written, after the head')
})

t.test('a client that stops reading is cut off at the bound; the others get every event', async (t) => {
  const bound = 256 * 1024
  const { open } = await serve(t, { maxBufferedBytes: bound })
  const [stalled, stalledClient] = await open()
  const readers = await Promise.all([open(), open()])
  stalled.stream.release()
  for (const [served] of readers) served.stream.release()
  stalledClient.socket.pause()
  const serverSocket = stalled.socket
  const ports = [serverSocket.localPort as number, stalledClient.socket.localPort as number] as const

  const payload = 'x'.repeat(16 * 1024)
  let id = 0
  let peak = 0
  // Publish until the stalled client is cut off; 64 MiB at most.
  while (stalled.cutOff() === 0 && id < 4096) {
    for (let i = 0; i < 16 && stalled.cutOff() === 0; i++) {
      const f = frame(++id, payload)
      stalled.stream.write(f, id)
      for (const [served] of readers) served.stream.write(f, id)
      peak = Math.max(peak, stalled.writer.unsentBytes)
    }
    await turn()
  }
  t.equal(stalled.cutOff(), 1, 'cut off, once')
  const handed = stalled.writes.reduce((n, w) => n + w.toString('latin1').split('\n\n').length - 1, 0)
  t.ok(stalled.dropped() > 0, `the frames thrown away are counted (${stalled.dropped()})`)
  t.equal(handed + stalled.dropped(), id, 'each frame was either handed to the response or counted as dropped')
  t.ok(stalled.writer.ended, 'its response is destroyed')
  t.ok(peak <= bound + frame(id, payload).length, `its unsent bytes never passed the bound by more than a frame (peak ${peak})`)
  const after = stalled.writes.length
  stalled.stream.write(frame(++id, payload), id)
  for (const [served] of readers) served.stream.write(frame(id, payload), id)
  await turn()
  t.equal(stalled.writes.length, after, 'nothing more is written to it')
  t.equal(stalled.writer.unsentBytes, 0, 'and nothing more is kept for it')
  // A close would leave the server's socket in FIN-WAIT-1, holding in its
  // send buffer what the client never read; a reset frees it at once.
  await waitFor(() => serverSocket.closed, 'the server\'s socket to close')
  t.same(orphans(...ports), [], 'no socket is left holding unsent bytes')

  const expectedEvents = id
  for (const [served, client] of readers) {
    await waitFor(() => client.body.split('\n\n').length - 2 >= expectedEvents, 'every event on the readers')
    t.equal(served.cutOff(), 0, 'a reader is not cut off')
    const ids = client.body.split('\n\n').filter((f) => f.startsWith('id: ')).map((f) => Number(f.slice(4, f.indexOf('\n'))))
    t.same(ids, Array.from({ length: expectedEvents }, (_, i) => i + 1), 'every event, in order')
  }
})

t.test('a slow reader within the bound waits for drain and loses nothing', async (t) => {
  const { open } = await serve(t, { maxBufferedBytes: 64 * 1024 * 1024 })
  const [served, client] = await open()
  served.stream.release()
  client.socket.pause()
  const payload = 'y'.repeat(32 * 1024)
  let id = 0
  // Until the socket pushes back: write() said to wait.
  while (served.socket.writableLength === 0 && id < 2048) {
    for (let i = 0; i < 8; i++) {
      id++
      served.stream.write(frame(id, payload), id)
    }
    await turn()
  }
  t.ok(served.socket.writableNeedDrain, 'the socket is waiting for the socket to drain')
  const writesWhileBlocked = served.writes.length
  for (let i = 0; i < 8; i++) {
    id++
    served.stream.write(frame(id, payload), id)
  }
  await turn()
  t.equal(served.writes.length, writesWhileBlocked, 'no write while the socket has not drained')
  client.socket.resume()
  const last = id
  await waitFor(() => client.body.includes(`id: ${last}\n`), 'the last event')
  t.equal(served.cutOff(), 0, 'not cut off')
  const ids = client.body.split('\n\n').filter((f) => f.startsWith('id: ')).map((f) => Number(f.slice(4, f.indexOf('\n'))))
  t.same(ids, [...new Set(ids)].sort((a, b) => a - b), 'in order, no duplicate')
  t.equal(ids.at(-1), last)
})

t.test('live events held during a long set-up count toward the bound', async (t) => {
  const { open } = await serve(t, { maxBufferedBytes: 64 * 1024 })
  const [served] = await open()
  const payload = 'z'.repeat(8 * 1024)
  for (let id = 1; id <= 9; id++) served.stream.write(frame(id, payload), id)
  t.equal(served.cutOff(), 1, 'cut off before the release')
  t.equal(served.writer.unsentBytes, 0, 'and holds nothing')
  served.stream.release()
  t.equal(served.writes.length, 0, 'the release writes nothing')
})

t.test('a flood with a stalled client subscribed stays within the bound', async (t) => {
  const bound = 1024 * 1024
  const { open } = await serve(t, { maxBufferedBytes: bound })
  const [stalled, stalledClient] = await open()
  const [reader, readerClient] = await open()
  readerClient.keep = false
  stalled.stream.release()
  reader.stream.release()
  stalledClient.socket.pause()
  // 90 MiB, as fast as the reader takes it: the test waits for the reader,
  // never for the stalled client.
  const size = 64 * 1024
  const payload = 'f'.repeat(size - 32)
  const events = Math.ceil(90 * 1024 * 1024 / size)
  const before = process.memoryUsage().rss
  let peakRss = before
  let peakUnsent = 0
  let id = 0
  let bytes = 0
  while (id < events) {
    for (let i = 0; i < 16 && id < events; i++) {
      id++
      const f = frame(id, payload)
      bytes += f.length
      stalled.stream.write(f, id)
      reader.stream.write(f, id)
    }
    peakUnsent = Math.max(peakUnsent, stalled.writer.unsentBytes)
    await waitFor(() => reader.writer.unsentBytes < 4 * size, 'the reader to keep up')
    peakRss = Math.max(peakRss, process.memoryUsage().rss)
  }
  // A last, small event: the reader's tail shows it.
  const last = ++id
  const closing = frame(last, 'the end')
  bytes += closing.length
  stalled.stream.write(closing, last)
  reader.stream.write(closing, last)
  await waitFor(() => readerClient.tail.includes(`id: ${last}\n`), 'the reader to get the last event')
  t.equal(stalled.cutOff(), 1, 'the stalled client is cut off')
  t.equal(reader.cutOff(), 0, 'the reader is not')
  t.ok(peakUnsent <= bound + size, `the stalled client's unsent bytes stayed within the bound (peak ${peakUnsent})`)
  t.ok(readerClient.length > bytes, 'the reader got every byte (and the chunk framing)')
  const growth = (peakRss - before) / 2 ** 20
  t.ok(growth < 150, `the process grew by less than 150 MiB (${growth.toFixed(1)} MiB)`)
})
