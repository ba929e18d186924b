import type { OutgoingHttpHeaders, ServerResponse } from 'node:http'

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

export interface EventStreamOptions {
  /**
   * Unsent bytes (queued here and buffered by the response) above which a
   * client whose socket has not taken the last write is deemed stalled and
   * cut off.
   */
  maxBufferedBytes: number
  /** The app's flush line. */
  line: FlushLine
  /** Called with the frames thrown away, live events the client will not get on this stream. */
  onCutOff?: (droppedFrames: number) => void
  /** Shared by all streams of an app: a plain tally is all the hot path can afford. */
  tally?: StreamTally
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
  }
}

/** What the flush line flushes. */
export interface Flushable {
  flush (): void
}

/**
 * Node keeps the header block it sent (`_header`, undocumented) for the life
 * of the response, as the rope of string concatenations it was built from:
 * about a hundred pieces. Reading a character makes V8 flatten it into one
 * string, which is 1 KB less per stream.
 */
function flattenHeaderBlock (res: ServerResponse): void {
  const head: unknown = (res as unknown as { _header?: unknown })._header
  if (typeof head === 'string' && head.length > 0) head.charCodeAt(0)
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

/**
 * One client's SSE response: a FrameWriter over node:http.
 *
 * Live frames are queued, and written together when the stream's turn in
 * the flush line comes: one chunk for all the frames queued meanwhile. When
 * the response says to wait (write() returned false), frames queue until it
 * drains. A client that stops reading is cut off once its unsent bytes pass
 * the bound, instead of buffering without limit; it resumes with its last
 * id.
 */
export class EventStream implements FrameWriter, Flushable {
  readonly #res: ServerResponse
  readonly #options: EventStreamOptions
  // Live frames not yet handed to the response, oldest first.
  #pending: Buffer[] = []
  #pendingBytes = 0
  #scheduled = false
  #waitingForDrain = false

  constructor (res: ServerResponse, options: EventStreamOptions) {
    this.#res = res
    this.#options = options
  }

  get ended (): boolean {
    return this.#res.writableEnded || this.#res.destroyed
  }

  /** Bytes written to this stream that the socket has not taken yet. */
  get unsentBytes (): number {
    return this.#pendingBytes + this.#res.writableLength
  }

  /** Sends the headers and the first frames. */
  open (headers: OutgoingHttpHeaders, preamble: string): void {
    this.#res.writeHead(200, headers)
    flattenHeaderBlock(this.#res)
    this.#res.write(preamble)
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
    if (this.ended) return false
    return this.#res.write(frame)
  }

  write (frame: Buffer): void {
    if (this.ended) return
    // Only a client that left data behind is measured: frames queued for the
    // next flush of a stream whose socket took everything are the gateway's
    // own backlog, shared Buffers that the flush will hand on.
    if (this.#waitingForDrain && this.#pendingBytes + frame.length + this.#res.writableLength > this.#options.maxBufferedBytes) {
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
   * Hands the queued frames to the response as one chunk. A stream waiting
   * for its socket to drain keeps them until it has.
   */
  flush (): void {
    this.#scheduled = false
    if (this.#waitingForDrain || this.#pending.length === 0) return
    if (this.ended) {
      this.#pending = []
      this.#pendingBytes = 0
      return
    }
    const pending = this.#pending
    if (this.#options.tally !== undefined) this.#options.tally.bytesWritten += this.#pendingBytes
    const chunk = this.#options.line.join(pending, this.#pendingBytes)
    this.#pending = []
    this.#pendingBytes = 0
    // Corked here, the response does not cork the socket itself and defer
    // the syscall to a nextTick: the write happens now, inside the slice
    // whose time it is counted in.
    const socket = this.#res.socket
    socket?.cork()
    const more = this.#res.write(chunk)
    socket?.uncork()
    if (!more) {
      this.#waitingForDrain = true
      this.#onDrain ??= (): void => {
        this.#waitingForDrain = false
        this.flush()
      }
      this.#res.once('drain', this.#onDrain)
    }
  }

  async drained (): Promise<void> {
    if (this.ended || !this.#res.writableNeedDrain) return
    await new Promise<void>((resolve) => {
      const done = (): void => {
        this.#res.off('drain', done)
        this.#res.off('close', done)
        resolve()
      }
      this.#res.on('drain', done)
      this.#res.on('close', done)
    })
  }

  async end (): Promise<void> {
    if (this.ended) return
    if (this.#onDrain !== undefined) this.#res.off('drain', this.#onDrain)
    this.#waitingForDrain = false
    this.flush()
    await new Promise<void>((resolve) => {
      this.#res.once('close', resolve)
      this.#res.end(resolve)
    })
  }

  // Made when the stream first waits for its socket: most streams never do,
  // and a closure made at construction costs each of them a context.
  #onDrain: (() => void) | undefined

  cutOff (dropped: number): void {
    if (this.ended) return
    dropped += this.#pending.length
    this.#pending = []
    this.#pendingBytes = 0
    // Reset, not closed: a socket closed with unsent bytes waits in
    // FIN-WAIT-1 for a peer that does not read, holding its send buffer
    // (megabytes) for minutes; a reset frees it now. The response is
    // destroyed too, so that it counts as ended at once.
    this.#res.socket?.resetAndDestroy()
    this.#res.destroy()
    this.#options.onCutOff?.(dropped)
  }
}
