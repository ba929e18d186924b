import type { IncomingMessage, OutgoingHttpHeaders, ServerResponse } from 'node:http'
import { createRequire } from 'node:module'
import { Socket } from 'node:net'

export const EVENT_STREAM_HEADERS: OutgoingHttpHeaders = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  connection: 'keep-alive',
  // nginx and some other proxies buffer responses unless told not to.
  'x-accel-buffering': 'no'
}

// Events the gateway itself sends on a stream. Their names hold a `/`, which
// no channel name may, so they never collide with a channel's events.
export const GATEWAY_EVENTS = {
  /** First on every stream: its id is where the stream starts. */
  open: 'gateway/open',
  /**
   * Logged events the stream will not get: the Last-Event-ID asked for is no
   * longer (or not) in the log, retention pruned events while the listener
   * was away, or the log forked (a failover lost events). Data:
   * `{lastEventId, resumedAfter}`.
   */
  missed: 'gateway/missed',
  /** The listener was disconnected: plain NOTIFYs sent meanwhile are lost (logged events are caught up, or told as missed). */
  gap: 'gateway/gap',
  /**
   * The stream cannot be opened now (the gateway is busy, at a limit, or
   * cannot reach the database): the answer is a 200 that says so and ends,
   * with a `retry:` advice, so that EventSource comes back instead of giving
   * up. Data: `{status, reason, retry}`.
   */
  unavailable: 'gateway/unavailable',
  /** The stream's token expired: the stream ends, the client reconnects with a fresh one. */
  expired: 'gateway/expired'
} as const

/** What every stream of an app shares: one object for all of them. */
export interface EventStreamOptions {
  /**
   * Unsent bytes (queued here and buffered by the socket) above which a
   * client whose socket has not taken the last write is deemed stalled and
   * cut off.
   */
  maxBufferedBytes: number
  /** The app's flush line. */
  line: FlushLine
  /** Shared by all streams of an app: a plain tally is all the hot path can afford. */
  tally?: StreamTally
}

/** Who is told what becomes of one stream (an object, not closures: every stream keeps it for its life). */
export interface StreamOwner {
  /** The client's connection closed (or the response did, before the head was sent); called once. */
  streamClosed (): void
  /** The stream was cut off; `droppedFrames` live events were thrown away with it. */
  streamCutOff (droppedFrames: number): void
}

export interface StreamTally {
  /** Bytes handed to responses by flushes. */
  bytesWritten: number
}

// The fan-out hot path. A stream with frames queued waits in line here, and
// its frames are written together: one HTTP chunk, one syscall, however many
// events arrived meanwhile. A write costs a syscall (on loopback the
// receiver's TCP work too, about 15 µs per stream in the profile), against
// well under 1 µs to queue a frame, so what a stream pays per event falls as
// the rate rises. The line is worked through a slice per event-loop turn,
// so that the I/O the flush competes with (publishes, the listener's reads)
// moves on between slices instead of waiting for every stream: a burst that
// takes many slices to write gathers more events per write. BENCHMARKS.md
// has the figures behind this.
const FLUSH_SLICE_MS = 2
// Streams written between two looks at the clock.
const FLUSH_CHECK_EVERY = 32

/**
 * The fan-out hot path's schedule, one per app (the gateway plugin makes it
 * and closes it): streams with frames queued wait in line, and each is
 * flushed once per turn of the line, however many frames it got meanwhile.
 */
export class FlushLine {
  #line: Flushable[] = []
  #head = 0
  #scheduled: NodeJS.Immediate | undefined
  #closed = false
  // Streams on the same channels queue the same frames (the same Buffers),
  // so consecutive flushes usually join the same list: the chunk made for
  // one stream serves the next ones, instead of each copying the same bytes.
  #lastJoined: Buffer[] = []
  #lastChunk: Buffer | undefined
  // The same for the chunk framed for HTTP/1.1 (see `framed`).
  #lastFramedFrom: Buffer | undefined
  #lastFramed: Buffer | undefined

  /** Puts a stream in line; it is flushed in this turn or a later one. */
  enqueue (stream: Flushable): void {
    if (this.#closed) return
    this.#line.push(stream)
    this.#scheduled ??= setImmediate(() => this.#flushSlice())
  }

  /** The frames as one chunk, shared with the previous stream when its frames were the same. */
  join (frames: Buffer[], bytes: number): Buffer {
    if (frames.length === 1) return frames[0] as Buffer
    if (this.#lastChunk !== undefined && frames.length === this.#lastJoined.length && frames.every((frame, i) => frame === this.#lastJoined[i])) return this.#lastChunk
    this.#lastJoined = frames
    this.#lastChunk = Buffer.concat(frames, bytes)
    return this.#lastChunk
  }

  /**
   * A chunk as an HTTP/1.1 chunk (RFC 9112, 7.1): its size in hex, CRLF,
   * the bytes, CRLF; shared with the previous stream when it was the same.
   */
  framed (chunk: Buffer): Buffer {
    if (chunk === this.#lastFramedFrom && this.#lastFramed !== undefined) return this.#lastFramed
    this.#lastFramedFrom = chunk
    this.#lastFramed = frameChunk(chunk)
    return this.#lastFramed
  }

  /** Stops the line: streams still in it are not flushed (they are being ended). */
  close (): void {
    this.#closed = true
    if (this.#scheduled !== undefined) clearImmediate(this.#scheduled)
    this.#scheduled = undefined
    this.#line = []
    this.#head = 0
  }

  #flushSlice (): void {
    const deadline = performance.now() + FLUSH_SLICE_MS
    while (this.#head < this.#line.length) {
      const end = Math.min(this.#line.length, this.#head + FLUSH_CHECK_EVERY)
      for (; this.#head < end; this.#head++) (this.#line[this.#head] as Flushable).flush()
      if (performance.now() >= deadline) break
    }
    if (this.#head < this.#line.length) {
      // Under steady load the line never empties: drop the part already written.
      if (this.#head >= 4096) {
        this.#line = this.#line.slice(this.#head)
        this.#head = 0
      }
      this.#scheduled = setImmediate(() => this.#flushSlice())
      return
    }
    this.#line = []
    this.#head = 0
    this.#scheduled = undefined
    this.#lastJoined = []
    this.#lastChunk = undefined
    this.#lastFramedFrom = undefined
    this.#lastFramed = undefined
  }
}

const CRLF = Buffer.from('\r\n')
// The last chunk of a chunked body, with no trailer (RFC 9112, 7.1).
const LAST_CHUNK = Buffer.from('0\r\n\r\n')
const EMPTY = Buffer.alloc(0)

function frameChunk (data: Buffer): Buffer {
  const size = Buffer.from(`${data.length.toString(16)}\r\n`)
  return Buffer.concat([size, data, CRLF], size.length + data.length + 2)
}

/** What the flush line flushes. */
export interface Flushable {
  flush (): void
}

/**
 * What the stream core (src/stream-core.ts) writes a stream's frames to:
 * one client's byte stream, with its own buffering and cut-off.
 */
export interface FrameWriter {
  /** The client is gone, or the stream was ended. */
  readonly ended: boolean
  /** Queues a live frame; it is written on the stream's next turn in the flush line. */
  write (frame: Buffer): void
  /** Writes a frame now, ahead of queued ones (a replay page); false when the client should drain first. */
  writeNow (frame: Buffer): boolean
  /** Resolves when the client has taken what was written, or the stream ended. */
  drained (): Promise<void>
  /** Ends the stream after what is queued; resolves once it is sent (or the client is gone). */
  end (): Promise<void>
  /** Drops a client that stopped reading; `dropped` frames the caller throws away with it. */
  cutOff (dropped: number): void
}

// Node's HTTP parser pool, reached the way Node's own upgrade path reaches
// it (lib/_http_server.js): there is no public call that hands a
// connection over after a response's head, only after an Upgrade.
interface HttpParser { finish (): unknown }
const { freeParser } = createRequire(import.meta.url)('node:_http_common') as {
  freeParser: (parser: HttpParser, req: IncomingMessage | null, socket: Socket) => void
}

// The events node:http listens to on a connection it serves.
const HTTP_SOCKET_EVENTS = ['data', 'end', 'close', 'drain', 'error', 'timeout', 'resume', 'pause'] as const

/**
 * Takes a connection away from node:http once a response's head and first
 * bytes are handed to its socket, as Node itself does for an Upgrade: the
 * response is detached, node:http's listeners removed, and the HTTP parser
 * returned to its pool (it leaves the server's list of connections). What
 * remains is the socket alone; the request and response objects, the parser
 * and the per-connection closures go to the GC. Whoever calls this owns the
 * socket: its framing, its listeners ('data' first: adding one makes Node
 * stop feeding the socket to the parser), its errors and its end.
 */
function takeOverConnection (res: ServerResponse, socket: Socket): void {
  const parser = (socket as Socket & { parser?: HttpParser | null }).parser
  res.detachSocket(socket)
  for (const event of HTTP_SOCKET_EVENTS) socket.removeAllListeners(event)
  if (parser === undefined || parser === null) return
  // After the parser's current run, which may be the one that delivered
  // this request (a handler that answers at once): freed inside it, the
  // parser would put itself back on the server's list as the run ends.
  process.nextTick(releaseParser, parser, socket)
}

function releaseParser (parser: HttpParser, socket: Socket): void {
  parser.finish()
  freeParser(parser, null, socket)
  // node:http wraps these on each connection it serves (to stop feeding the
  // parser when a 'data' listener comes), a closure each; without a parser
  // the wrappers only put the originals back, which is done here at once.
  socket.on = Socket.prototype.on
  socket.addListener = Socket.prototype.addListener
  socket.prependListener = Socket.prototype.prependListener
}

// The stream a taken-over socket carries. The socket's listeners are shared
// by every stream (a closure each would cost every stream its context) and
// find their stream here.
const STREAM = Symbol('pgsse.eventStream')
type StreamSocket = Socket & { [STREAM]?: EventStream }

function ignoreError (): void {}

/**
 * One client's SSE response: a FrameWriter over an HTTP/1.1 connection.
 *
 * Until its head is sent it is a node:http response, so that a stream
 * refused during set-up is answered like any other request. `open()` sends
 * the head and the first bytes through node:http, then takes the connection
 * over: from then on the stream is its socket and a few fields, and writes
 * the chunked framing itself (BENCHMARKS.md has the heap snapshots: what
 * node:http and Fastify kept for the connection was 5.5 of the 8.2 KiB of
 * heap an idle stream took).
 *
 * Live frames are queued, and written together when the stream's turn in
 * the flush line comes: one chunk for all the frames queued meanwhile. When
 * the socket says to wait (write() returned false), frames queue until it
 * drains. A client that stops reading is cut off once its unsent bytes pass
 * the bound, instead of buffering without limit; it resumes with its last
 * id.
 */
export class EventStream implements FrameWriter, Flushable {
  // The response until the head is sent, then undefined.
  #res: ServerResponse | undefined
  readonly #socket: Socket
  readonly #options: EventStreamOptions
  readonly #owner: StreamOwner
  // Live frames not yet handed to the socket, oldest first.
  #pending: Buffer[] = []
  #pendingBytes = 0
  #scheduled = false
  #waitingForDrain = false
  // HTTP/1.0 clients get the body as it is, ended by the close.
  #chunked = true
  #ended = false
  #closed = false

  /** `res` must have its socket (a request pipelined behind another answer has none yet). */
  constructor (res: ServerResponse, options: EventStreamOptions, owner: StreamOwner) {
    const socket = res.socket
    if (socket === null) throw new TypeError('an EventStream needs a response that has its socket')
    this.#res = res
    this.#socket = socket
    this.#options = options
    this.#owner = owner
    res.once('close', () => {
      // After the hand-over the socket says when the client is gone.
      if (this.#res !== undefined) this.#closedNow()
    })
  }

  get ended (): boolean {
    const res = this.#res
    if (res !== undefined) return res.writableEnded || res.destroyed || this.#socket.destroyed
    return this.#ended || this.#socket.destroyed
  }

  /** Bytes written to this stream that the socket has not taken yet. */
  get unsentBytes (): number {
    return this.#pendingBytes + (this.#res?.writableLength ?? this.#socket.writableLength)
  }

  /** Sends the head and the first frames, then takes the connection over from node:http. */
  open (headers: OutgoingHttpHeaders, preamble: string): void {
    const res = this.#res
    if (res === undefined || this.ended) return
    res.writeHead(200, headers)
    res.write(preamble)
    this.#chunked = res.chunkedEncoding
    const socket = this.#socket as StreamSocket
    takeOverConnection(res, socket)
    this.#res = undefined
    socket[STREAM] = this
    socket.on('data', EventStream.#onSocketData)
    socket.on('close', EventStream.#onSocketClose)
    socket.on('drain', EventStream.#onSocketDrain)
    socket.on('end', EventStream.#onSocketEnd)
    socket.on('error', ignoreError)
    if (this.#pending.length > 0 && !this.#scheduled) {
      this.#scheduled = true
      this.#options.line.enqueue(this)
    }
  }

  /**
   * A replay page's frame, written at once. The replay paces itself with
   * `drained()` between pages, so it buffers one page at most and is not
   * held to the bound: a page of large events may pass it, and cutting the
   * stream there would make a client that resumes after such events fail
   * again each time. A client that stalls in a replay is cut off by the
   * live events held meanwhile.
   */
  writeNow (frame: Buffer): boolean {
    if (this.ended || this.#res !== undefined) return false
    return this.#socket.write(this.#chunked ? frameChunk(frame) : frame)
  }

  write (frame: Buffer): void {
    // The flag, not the getter: this runs once per event per stream. A
    // socket destroyed since is seen by the flush.
    if (this.#ended) return
    // Only a client that left data behind is measured: frames queued for the
    // next flush of a stream whose socket took everything are the gateway's
    // own backlog, shared Buffers that the flush will hand on.
    if (this.#waitingForDrain && this.#pendingBytes + frame.length + this.#socket.writableLength > this.#options.maxBufferedBytes) {
      this.cutOff(1)
      return
    }
    this.#pending.push(frame)
    this.#pendingBytes += frame.length
    if (!this.#scheduled && !this.#waitingForDrain) {
      this.#scheduled = true
      this.#options.line.enqueue(this)
    }
  }

  /**
   * Hands the queued frames to the socket as one chunk: one write, one
   * syscall. A stream waiting for its socket to drain keeps them until it
   * has; so does one whose head is not sent yet.
   */
  flush (): void {
    this.#scheduled = false
    if (this.#waitingForDrain || this.#pending.length === 0 || this.#res !== undefined) return
    if (this.ended) {
      this.#pending = []
      this.#pendingBytes = 0
      return
    }
    const line = this.#options.line
    if (this.#options.tally !== undefined) this.#options.tally.bytesWritten += this.#pendingBytes
    const chunk = line.join(this.#pending, this.#pendingBytes)
    this.#pending = []
    this.#pendingBytes = 0
    if (!this.#socket.write(this.#chunked ? line.framed(chunk) : chunk)) this.#waitingForDrain = true
  }

  async drained (): Promise<void> {
    const socket = this.#socket
    if (this.ended || this.#res !== undefined || !socket.writableNeedDrain) return
    await new Promise<void>((resolve) => {
      const done = (): void => {
        socket.off('drain', done)
        socket.off('close', done)
        resolve()
      }
      socket.on('drain', done)
      socket.on('close', done)
    })
  }

  async end (): Promise<void> {
    if (this.ended) return
    const res = this.#res
    if (res !== undefined) {
      // Not begun: there is no stream to end, only a connection to close.
      res.destroy()
      return
    }
    this.#waitingForDrain = false
    this.flush()
    this.#ended = true
    const socket = this.#socket
    await new Promise<void>((resolve) => {
      socket.once('close', resolve)
      // A stream's connection is not reused: once the last chunk is out, it is closed.
      socket.end(this.#chunked ? LAST_CHUNK : EMPTY, () => socket.destroy())
    })
  }

  cutOff (dropped: number): void {
    if (this.ended) return
    this.#ended = true
    dropped += this.#pending.length
    this.#pending = []
    this.#pendingBytes = 0
    // Reset, not closed: a socket closed with unsent bytes waits in
    // FIN-WAIT-1 for a peer that does not read, holding its send buffer
    // (megabytes) for minutes; a reset frees it now. A response not begun
    // is destroyed too, so that it counts as ended at once.
    this.#socket.resetAndDestroy()
    this.#res?.destroy()
    this.#owner.streamCutOff(dropped)
  }

  #closedNow (): void {
    if (this.#closed) return
    this.#closed = true
    this.#ended = true
    this.#pending = []
    this.#pendingBytes = 0
    this.#owner.streamClosed()
  }

  static #onSocketClose (this: StreamSocket): void {
    const stream = this[STREAM]
    if (stream !== undefined) stream.#closedNow()
  }

  static #onSocketDrain (this: StreamSocket): void {
    const stream = this[STREAM]
    if (stream === undefined || !stream.#waitingForDrain) return
    stream.#waitingForDrain = false
    stream.flush()
  }

  // The client half-closed: an SSE client that sends its FIN is gone (Node
  // ends such a connection too).
  static #onSocketEnd (this: StreamSocket): void {
    this.destroy()
  }

  // A request sent behind a stream's can never be answered (the stream
  // does not end): its connection is closed, as guardStreamConnections
  // does for one that arrives before the hand-over (src/routes/events.ts).
  static #onSocketData (this: StreamSocket): void {
    this.destroy()
  }
}
