import type { OutgoingHttpHeaders, ServerResponse } from 'node:http'
import type { EventSink } from './hub.js'
import { encodeEvent } from './sse.js'

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
   * cut off. Live events held while the stream is set up count too.
   */
  maxBufferedBytes: number
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

let line: EventStream[] = []
let head = 0
let flushScheduled = false

function flushSlice (): void {
  const deadline = performance.now() + FLUSH_SLICE_MS
  while (head < line.length) {
    const end = Math.min(line.length, head + FLUSH_CHECK_EVERY)
    for (; head < end; head++) (line[head] as EventStream).flush()
    if (performance.now() >= deadline) break
  }
  if (head < line.length) {
    // Under steady load the line never empties: drop the part already written.
    if (head >= 4096) {
      line = line.slice(head)
      head = 0
    }
    setImmediate(flushSlice)
    return
  }
  line = []
  head = 0
  flushScheduled = false
  lastJoined = []
  lastChunk = undefined
}

// Streams on the same channels queue the same frames (the same Buffers), so
// consecutive flushes usually join the same list: the chunk made for one
// stream serves the next ones, instead of each copying the same bytes.
let lastJoined: Buffer[] = []
let lastChunk: Buffer | undefined

function joinFrames (frames: Buffer[], bytes: number): Buffer {
  if (frames.length === 1) return frames[0] as Buffer
  if (lastChunk !== undefined && frames.length === lastJoined.length && frames.every((frame, i) => frame === lastJoined[i])) return lastChunk
  lastJoined = frames
  lastChunk = Buffer.concat(frames, bytes)
  return lastChunk
}

function enqueue (stream: EventStream): void {
  line.push(stream)
  if (flushScheduled) return
  flushScheduled = true
  setImmediate(flushSlice)
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
 * One client's SSE response.
 *
 * A stream starts holding: live events delivered while it is set up (its
 * LISTENs, its start position, a replay from the log) wait, in order. Then
 * `release()` sends them and the stream goes live. Ids only grow on a
 * stream: a logged event at or below the last id it carried (one the replay
 * already sent, or older than where it started) is dropped, so the seam
 * between replay and live has no gap and no duplicate.
 *
 * Live frames are queued, and written together when the stream's turn in
 * the flush line comes: one chunk for all the frames queued meanwhile. When
 * the response says to wait (write() returned false), frames queue until it
 * drains. A client that stops
 * reading is cut off once its unsent bytes pass the bound, instead of
 * buffering without limit; it resumes with its last id.
 */
export class EventStream implements EventSink {
  readonly #res: ServerResponse
  readonly #options: EventStreamOptions
  #held: Array<{ frame: Buffer, id: number | undefined }> | null = []
  #heldBytes = 0
  #lastId = 0
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
    return this.#heldBytes + this.#pendingBytes + this.#res.writableLength
  }

  /** Events up to this id are not for this stream. */
  startAfter (id: number): void {
    this.#lastId = id
  }

  /** Sends the headers and the first frames; live events are still held. */
  open (headers: OutgoingHttpHeaders, preamble: string): void {
    this.#res.writeHead(200, headers)
    flattenHeaderBlock(this.#res)
    this.#res.write(preamble)
  }

  /**
   * Writes an event read from the log, ahead of the held live ones. The
   * replay paces itself with `drained()` between pages, so it buffers one
   * page at most and is not held to the bound: a page of large events may
   * pass it, and cutting the stream there would make a client that resumes
   * after such events fail again each time. A client that stalls in a replay
   * is cut off by the live events held meanwhile.
   */
  replay (frame: Buffer, id: number): boolean {
    if (id <= this.#lastId) return true
    this.#lastId = id
    if (this.ended) return false
    return this.#res.write(frame)
  }

  /**
   * Tells the client about logged events it will not get in order, with a
   * `gateway/missed` event (`{lastEventId, resumedAfter}`), and moves the
   * stream's position to `resumedAfter`:
   * - `pruned`: a stream behind it skips to it (the events in between are gone);
   * - `forked`: a stream ahead of it goes back to it, so that events the log
   *   now holds after it, with ids the stream may already have carried, still
   *   reach it.
   * Returns whether the stream was told.
   */
  missed (cause: 'pruned' | 'forked', resumedAfter: number): boolean {
    if (cause === 'pruned' ? this.#lastId >= resumedAfter : this.#lastId <= resumedAfter) return false
    const frame = Buffer.from(encodeEvent({
      event: GATEWAY_EVENTS.missed,
      data: JSON.stringify({ lastEventId: String(this.#lastId), resumedAfter: String(resumedAfter) })
    }))
    this.#lastId = resumedAfter
    this.write(frame)
    return true
  }

  /** Sends the held live events and goes live. */
  release (): void {
    const held = this.#held ?? []
    this.#held = null
    this.#heldBytes = 0
    for (const { frame, id } of held) this.write(frame, id)
  }

  write (frame: Buffer, id?: number): void {
    if (this.#held !== null) {
      if (this.ended) return
      this.#held.push({ frame, id })
      this.#heldBytes += frame.length
      if (this.#heldBytes > this.#options.maxBufferedBytes) this.#cutOff()
      return
    }
    if (id !== undefined) {
      if (id <= this.#lastId) return
      this.#lastId = id
    }
    if (this.ended) return
    // Only a client that left data behind is measured: frames queued for the
    // next flush of a stream whose socket took everything are the gateway's
    // own backlog, shared Buffers that the flush will hand on.
    if (this.#waitingForDrain && this.#pendingBytes + frame.length + this.#res.writableLength > this.#options.maxBufferedBytes) {
      this.#cutOff(1)
      return
    }
    this.#pending.push(frame)
    this.#pendingBytes += frame.length
    if (!this.#scheduled && !this.#waitingForDrain) {
      this.#scheduled = true
      enqueue(this)
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
    const chunk = joinFrames(pending, this.#pendingBytes)
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

  /** Resolves when the client has taken what was written, or the stream ended. */
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

  /** Ends the response after what is queued; resolves once it is sent (or the client is gone). */
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

  /** `refused`: a frame the caller was writing, dropped too. */
  #cutOff (refused = 0): void {
    if (this.ended) return
    const dropped = (this.#held?.length ?? 0) + this.#pending.length + refused
    this.#held = []
    this.#heldBytes = 0
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
