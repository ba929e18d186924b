import type { OutgoingHttpHeaders, ServerResponse } from 'node:http'
import type { EventSink } from './hub.js'

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
  /** The Last-Event-ID asked for is no longer (or not) in the log. */
  missed: 'gateway/missed',
  /** The listener was disconnected: plain NOTIFYs sent meanwhile are lost. */
  gap: 'gateway/gap'
} as const

export interface EventStreamOptions {
  /** Unsent bytes above which the client is deemed stalled and cut off. */
  maxBufferedBytes: number
  onCutOff?: () => void
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
 * A client that stops reading is cut off once its unsent bytes pass the
 * bound, instead of buffering without limit; it resumes with its last id.
 */
export class EventStream implements EventSink {
  readonly #res: ServerResponse
  readonly #options: EventStreamOptions
  #held: Array<{ frame: Buffer, id: number | undefined }> | null = []
  #heldBytes = 0
  #lastId = 0

  constructor (res: ServerResponse, options: EventStreamOptions) {
    this.#res = res
    this.#options = options
  }

  get ended (): boolean {
    return this.#res.writableEnded || this.#res.destroyed
  }

  /** Events up to this id are not for this stream. */
  startAfter (id: number): void {
    this.#lastId = id
  }

  /** Sends the headers and the first frames; live events are still held. */
  open (headers: OutgoingHttpHeaders, preamble: string): void {
    this.#res.writeHead(200, headers)
    this.#res.write(preamble)
  }

  /** Writes an event read from the log, ahead of the held live ones. */
  replay (frame: Buffer, id: number): boolean {
    if (id <= this.#lastId) return true
    this.#lastId = id
    return this.#send(frame)
  }

  /** Sends the held live events and goes live. */
  release (): void {
    const held = this.#held ?? []
    this.#held = null
    for (const { frame, id } of held) this.write(frame, id)
  }

  write (frame: Buffer, id?: number): void {
    if (this.#held !== null) {
      this.#held.push({ frame, id })
      this.#heldBytes += frame.length
      if (this.#heldBytes > this.#options.maxBufferedBytes) this.#cutOff()
      return
    }
    if (id !== undefined) {
      if (id <= this.#lastId) return
      this.#lastId = id
    }
    this.#send(frame)
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

  end (): void {
    if (!this.ended) this.#res.end()
  }

  #send (frame: Buffer | string): boolean {
    if (this.ended) return false
    if (this.#res.writableLength > this.#options.maxBufferedBytes) {
      this.#cutOff()
      return false
    }
    return this.#res.write(frame)
  }

  #cutOff (): void {
    if (this.ended) return
    this.#held = []
    this.#res.destroy()
    this.#options.onCutOff?.()
  }
}
