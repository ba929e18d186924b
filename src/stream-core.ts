import type pg from 'pg'
import type { EventId } from './event-id.js'
import { type LogBounds, readLogBounds, readReplayPage } from './event-log.js'
import { type FrameWriter, GATEWAY_EVENTS } from './event-stream.js'
import { CHANNEL_SELECTOR, type ChannelHub, type EventSelector, type EventSink, LazyEventView } from './hub.js'
import { encodeEvent, encodeRetry } from './sse.js'

/*
 * The stream core: history, then live, for every stream, with no HTTP in it
 * (the way Mercure's transport and subscriber do it). A route parses a
 * request, authorizes it, and hands the core a FrameWriter (the client's
 * byte stream) with what the client asks for; the core LISTENs, reads where
 * the stream starts, replays from the log at the client's pace, holds the
 * live events that arrive meanwhile, releases them, keeps ids growing, and
 * ends the stream when its token expires.
 */

/** What a client asks for. */
export interface StreamRequest {
  channels: readonly string[]
  /** The id it resumes after (`Last-Event-ID`), if any. */
  resumeFrom: EventId | undefined
  /** When its credential expires (epoch seconds): the stream ends then. */
  expiresAt: number | undefined
  /** Which of its channels' events it takes, framed how: every event, channel framing, by default. */
  selector?: EventSelector
  /** What the stream says of itself (its preamble, missed events, expiry): the gateway's own events by default. */
  dialect?: StreamDialect
}

/** Where a stream starts (log ids), and whether the id it resumes from was lost. */
export interface StartPosition {
  after: EventId
  missed: boolean
  /** The id the client resumed from, if any. */
  resumeFrom?: EventId | undefined
}

/**
 * What a stream says about itself, beside the events it takes: the gateway's
 * `gateway/*` events on channel streams; another protocol (Mercure) speaks
 * its own way, or not at all.
 */
export interface StreamDialect {
  /** The first bytes of the stream: `retryMs` is its (already jittered) `retry:` advice, `head` the log's head when it was set up. */
  preamble (start: StartPosition, head: EventId, retryMs: number): string
  /**
   * Logged events the stream will not get in order, from `lastEventId` on;
   * it goes on after `resumedAfter`. undefined: the stream is ended
   * instead, and the client resumes with the last id it got.
   */
  missed (lastEventId: EventId, resumedAfter: EventId): Buffer | undefined
  /** The listener was away: plain NOTIFYs sent meanwhile are lost (logged events are caught up). undefined: nothing to say. */
  gap (): Buffer | undefined
  /** Written when the stream's credential expires, just before it ends; undefined: it ends without a word. */
  expired (): Buffer | undefined
}

/** The gateway's own dialect, on `GET /events` streams: see GATEWAY_EVENTS. */
export const GATEWAY_DIALECT: StreamDialect = {
  preamble (start, head, retryMs) {
    let preamble = encodeRetry(retryMs) + encodeEvent({
      id: String(start.after),
      event: GATEWAY_EVENTS.open,
      data: JSON.stringify({ lastEventId: String(start.after), head: String(head) })
    })
    if (start.missed && start.resumeFrom !== undefined) preamble += missedFrame(start.resumeFrom, start.after).toString()
    return preamble
  },
  missed: missedFrame,
  gap: () => GAP_FRAME,
  expired: () => EXPIRED_FRAME
}

/** Why a stream could not be set up now; the client should come back. */
export class StreamUnavailableError extends Error {
  override name = 'StreamUnavailableError'
  constructor (readonly reason: 'listener' | 'log', message: string) {
    super(message)
  }
}

/**
 * The `retry:` a stream advises, drawn from [ms, 2 × ms): after a restart
 * its clients come back spread over that span instead of in one burst.
 */
export function jittered (ms: number, random: () => number = Math.random): number {
  return Math.floor(ms * (1 + random()))
}

/**
 * Where a stream starts: after the id it resumes from, or at the log's head.
 * An id the log no longer holds (pruned), or never held (beyond the head,
 * e.g. from another database), or drawn on a timeline the log forked away
 * from, is answered with a `gateway/missed` event and the stream starts
 * from what the log has.
 */
export function startPosition (resumeFrom: EventId | undefined, bounds: LogBounds): StartPosition {
  if (resumeFrom === undefined) return { after: bounds.head, missed: false }
  // An id from a timeline the log no longer follows (a failover lost it):
  // the stream goes on from the last event kept before the fork.
  if (bounds.forkedAfter !== undefined) return { after: bounds.forkedAfter, missed: true, resumeFrom }
  if (resumeFrom > bounds.head) return { after: bounds.head, missed: true, resumeFrom }
  if (resumeFrom < bounds.prunedThrough) return { after: bounds.prunedThrough, missed: true, resumeFrom }
  return { after: resumeFrom, missed: false, resumeFrom }
}

function missedFrame (lastEventId: EventId, resumedAfter: EventId): Buffer {
  return Buffer.from(encodeEvent({
    event: GATEWAY_EVENTS.missed,
    data: JSON.stringify({ lastEventId: String(lastEventId), resumedAfter: String(resumedAfter) })
  }))
}

const GAP_FRAME = Buffer.from(encodeEvent({
  event: GATEWAY_EVENTS.gap,
  data: JSON.stringify({ reason: 'listener reconnected: plain notifications sent meanwhile may be lost' })
}))

const EXPIRED_FRAME = Buffer.from(encodeEvent({
  event: GATEWAY_EVENTS.expired,
  data: JSON.stringify({ reason: 'the token expired: reconnect with a fresh one' })
}))

/**
 * One stream's seam between history and live: the no-gap, no-duplicate rule,
 * in one place.
 *
 * It starts holding: live events delivered while the stream is set up (its
 * LISTENs, its start position, a replay from the log) wait, in order, and
 * count toward the bound on unsent bytes. `release()` sends them and the
 * stream goes live. Ids only grow: a logged event at or below the last id
 * the stream carried (one the replay already sent, or older than where it
 * started) is dropped, so the seam between replay and live has no gap and
 * no duplicate.
 */
export class Subscriber implements EventSink {
  readonly writer: FrameWriter
  readonly dialect: StreamDialect
  readonly #maxHeldBytes: number
  #held: Array<{ frame: Buffer, id: EventId | undefined }> | null = []
  #heldBytes = 0
  #lastId: EventId = 0

  constructor (writer: FrameWriter, maxHeldBytes: number, dialect: StreamDialect = GATEWAY_DIALECT) {
    this.writer = writer
    this.#maxHeldBytes = maxHeldBytes
    this.dialect = dialect
  }

  /** The last logged event id the stream carried, or where it started. */
  get lastId (): EventId {
    return this.#lastId
  }

  /** Events up to this id are not for this stream. */
  startAfter (id: EventId): void {
    this.#lastId = id
  }

  /** An event read from the log, written ahead of the held live ones; false when the client should drain first. */
  replay (frame: Buffer, id: EventId): boolean {
    if (id <= this.#lastId) return true
    this.#lastId = id
    return this.writer.writeNow(frame)
  }

  /** A live event (from the hub), or a gateway frame without an id. */
  write (frame: Buffer, id?: EventId): void {
    if (this.#held !== null) {
      if (this.writer.ended) return
      this.#held.push({ frame, id })
      this.#heldBytes += frame.length
      if (this.#heldBytes > this.#maxHeldBytes) {
        const dropped = this.#held.length
        this.#held = []
        this.#heldBytes = 0
        this.writer.cutOff(dropped)
      }
      return
    }
    if (id !== undefined) {
      if (id <= this.#lastId) return
      this.#lastId = id
    }
    this.writer.write(frame)
  }

  /** Sends the held live events and goes live. */
  release (): void {
    const held = this.#held ?? []
    this.#held = null
    this.#heldBytes = 0
    for (const { frame, id } of held) this.write(frame, id)
  }

  /**
   * Tells the client about logged events it will not get in order (the
   * dialect's missed frame: `gateway/missed` with `{lastEventId,
   * resumedAfter}` on channel streams), and moves the stream's position to
   * `resumedAfter`; a dialect with nothing to say ends the stream instead:
   * - `pruned`: a stream behind it skips to it (the events in between are gone);
   * - `forked`: a stream ahead of it goes back to it, so that events the log
   *   now holds after it, with ids the stream may already have carried, still
   *   reach it.
   * Returns whether the stream was told.
   */
  missed (cause: 'pruned' | 'forked', resumedAfter: EventId): boolean {
    if (cause === 'pruned' ? this.#lastId >= resumedAfter : this.#lastId <= resumedAfter) return false
    const frame = this.dialect.missed(this.#lastId, resumedAfter)
    this.#lastId = resumedAfter
    if (frame === undefined) this.writer.end().catch(() => {})
    else this.write(frame)
    return true
  }
}

/** A stream the core set up: subscribed and positioned, not begun yet. */
export interface PreparedStream {
  readonly subscriber: Subscriber
  /** Where the log stood when the stream was set up. */
  readonly bounds: LogBounds
  /** Where the stream starts, and whether the client is told it missed events. */
  readonly start: StartPosition
}

interface StreamState extends PreparedStream {
  readonly request: StreamRequest
  unsubscribe: () => void
  closed: boolean
}

// setTimeout takes at most 2^31 - 1 ms (24.8 days); a later expiry re-arms.
const MAX_TIMER_MS = 2 ** 31 - 1

/**
 * Ends each stream when its credential's `exp` (whole seconds) passes.
 * Streams that expire in the same second share one timer: a Timeout and its
 * closures per stream would cost more than the stream's own state.
 */
class ExpiryTimers {
  readonly #due = new Map<number, { subscribers: Set<Subscriber>, timer: NodeJS.Timeout }>()
  readonly #expire: (subscriber: Subscriber) => void

  constructor (expire: (subscriber: Subscriber) => void) {
    this.#expire = expire
  }

  add (subscriber: Subscriber, exp: number): void {
    if (exp * 1000 <= Date.now()) {
      this.#expire(subscriber)
      return
    }
    let bucket = this.#due.get(exp)
    if (bucket === undefined) {
      bucket = { subscribers: new Set(), timer: this.#arm(exp) }
      this.#due.set(exp, bucket)
    }
    bucket.subscribers.add(subscriber)
  }

  delete (subscriber: Subscriber, exp: number): void {
    const bucket = this.#due.get(exp)
    if (bucket === undefined || !bucket.subscribers.delete(subscriber)) return
    if (bucket.subscribers.size === 0) {
      clearTimeout(bucket.timer)
      this.#due.delete(exp)
    }
  }

  clear (): void {
    for (const { timer } of this.#due.values()) clearTimeout(timer)
    this.#due.clear()
  }

  #arm (exp: number): NodeJS.Timeout {
    return setTimeout(() => {
      const bucket = this.#due.get(exp)
      if (bucket === undefined) return
      if (exp * 1000 > Date.now()) {
        bucket.timer = this.#arm(exp)
        return
      }
      this.#due.delete(exp)
      for (const subscriber of bucket.subscribers) this.#expire(subscriber)
    }, Math.min(exp * 1000 - Date.now(), MAX_TIMER_MS))
  }
}

export interface StreamCoreOptions {
  hub: ChannelHub
  /** Where the log is read (the start position, replays). */
  log: pg.Pool
  /** Live events held while a stream is set up, in bytes, above which it is cut off. */
  maxHeldBytes: number
  /** The base of every stream's `retry:` advice (ms), jittered per stream. */
  retryMs: number
  /** Events replayed from the log, for the metrics. */
  onReplayed?: (count: number) => void
}

// Pages of the log a replay reads at a time.
const REPLAY_PAGE = 500

/**
 * Every stream of an app, from set-up to end. Owned by the gateway plugin,
 * which ends every stream before the app closes.
 */
export class StreamCore {
  /** Every stream that has begun and not closed. */
  readonly subscribers = new Set<Subscriber>()
  readonly #options: StreamCoreOptions
  readonly #expiries = new ExpiryTimers((subscriber) => { expire(subscriber) })

  constructor (options: StreamCoreOptions) {
    this.#options = options
  }

  /**
   * Sets a stream up to its first byte: LISTENs on its channels (live events
   * are held from now on), then reads where it starts, so that whatever
   * commits later arrives live. Rejects with StreamUnavailableError when the
   * listener or the log cannot be reached now; then nothing is held.
   */
  async prepare (writer: FrameWriter, request: StreamRequest): Promise<PreparedStream> {
    const subscriber = new Subscriber(writer, this.#options.maxHeldBytes, request.dialect)
    let unsubscribe: () => void
    try {
      unsubscribe = await this.#options.hub.subscribe(request.channels, subscriber, request.selector)
    } catch {
      throw new StreamUnavailableError('listener', 'the gateway cannot listen to the database right now; retry shortly')
    }
    let bounds: LogBounds
    try {
      bounds = await readLogBounds(this.#options.log, request.resumeFrom)
    } catch {
      unsubscribe()
      throw new StreamUnavailableError('log', 'the event log cannot be read right now; retry shortly')
    }
    const start = startPosition(request.resumeFrom, bounds)
    subscriber.startAfter(start.after)
    const state: StreamState = { subscriber, bounds, start, request, unsubscribe, closed: false }
    return state
  }

  /**
   * Begins a prepared stream: `open` sends its preamble (the dialect's: on
   * channel streams `retry:`, `gateway/open` whose id is where it starts,
   * `gateway/missed` when the resume id is not in the log) with whatever
   * opens the client's stream;
   * then the replay from the log, at the client's pace; then the live
   * events. Resolves once live, or once the stream ended (a failed replay
   * ends it: the client resumes with the last id it got).
   */
  async begin (prepared: PreparedStream, open: (preamble: string) => void): Promise<void> {
    const state = prepared as StreamState
    if (state.closed) return
    const { subscriber, start, bounds, request } = state
    this.subscribers.add(subscriber)
    open(subscriber.dialect.preamble(start, bounds.head, jittered(this.#options.retryMs)))
    // The stream lives no longer than its credential: the client reconnects with a fresh one.
    if (request.expiresAt !== undefined) this.#expiries.add(subscriber, request.expiresAt)
    if (start.after < bounds.head) {
      try {
        // Awaited apart: `f?.(await g())` would not run g when f is absent.
        const replayed = await this.#replay(subscriber, request.channels, request.selector ?? CHANNEL_SELECTOR, start.after)
        this.#options.onReplayed?.(replayed)
      } catch (err) {
        subscriber.writer.end().catch(() => {})
        throw err
      }
    }
    subscriber.release()
  }

  /** Releases what a stream holds (its LISTENs, its timer); idempotent, at any point after prepare(). */
  close (prepared: PreparedStream): void {
    const state = prepared as StreamState
    if (state.closed) return
    state.closed = true
    state.unsubscribe()
    if (state.request.expiresAt !== undefined) this.#expiries.delete(state.subscriber, state.request.expiresAt)
    this.subscribers.delete(state.subscriber)
  }

  /** Tells every stream of a discontinuity in the log (see Subscriber.missed); returns how many were told. */
  missed (cause: 'pruned' | 'forked', resumedAfter: EventId): number {
    let told = 0
    for (const subscriber of this.subscribers) if (subscriber.missed(cause, resumedAfter)) told++
    return told
  }

  /** Tells every stream that the listener was away (see StreamDialect.gap); returns how many were told. */
  gap (): number {
    let told = 0
    for (const subscriber of this.subscribers) {
      const frame = subscriber.dialect.gap()
      if (frame === undefined) continue
      subscriber.write(frame)
      told++
    }
    return told
  }

  /** Ends every stream after what is queued (clients reconnect, elsewhere if need be); resolves once all are ended. */
  async endAll (): Promise<void> {
    this.#expiries.clear()
    await Promise.all([...this.subscribers].map(async (subscriber) => { await subscriber.writer.end() }))
  }

  // Reads the log after `after`, a page at a time, never faster than the
  // client takes it, through the stream's selector: what it skips still
  // moves the position. Retention may prune past the position between
  // pages: the events in between are gone, and the client is told, as for
  // a pruned Last-Event-ID, rather than skipping them silently.
  async #replay (subscriber: Subscriber, channels: readonly string[], selector: EventSelector, after: EventId): Promise<number> {
    let count = 0
    let position = after
    for (;;) {
      const { prunedThrough, events } = await readReplayPage(this.#options.log, channels, position, REPLAY_PAGE)
      if (prunedThrough > position) {
        const frame = subscriber.dialect.missed(position, prunedThrough)
        if (frame === undefined) {
          await subscriber.writer.end()
          return count
        }
        subscriber.replay(frame, prunedThrough)
        position = prunedThrough
      }
      for (const row of events) {
        position = Number(row.id)
        const frame = selector.select(new LazyEventView({ id: position, channel: row.channel, data: row.payload }))
        if (frame !== undefined) subscriber.replay(frame, position)
      }
      count += events.length
      if (events.length < REPLAY_PAGE || subscriber.writer.ended) return count
      await subscriber.writer.drained()
    }
  }
}

// Straight to the writer, past any live events still held: the stream ends
// here, and the client resumes with its last id.
function expire (subscriber: Subscriber): void {
  const frame = subscriber.dialect.expired()
  if (frame !== undefined) subscriber.writer.write(frame)
  subscriber.writer.end().catch(() => {})
}
