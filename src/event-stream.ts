import type { OutgoingHttpHeaders, ServerResponse } from 'node:http'
import type { EventSink } from './hub.js'

export const EVENT_STREAM_HEADERS: OutgoingHttpHeaders = {
  'content-type': 'text/event-stream; charset=utf-8',
  'cache-control': 'no-cache',
  connection: 'keep-alive',
  // nginx and some other proxies buffer responses unless told not to.
  'x-accel-buffering': 'no'
}

export interface EventStreamOptions {
  /** Unsent bytes above which the client is deemed stalled and cut off. */
  maxBufferedBytes: number
  onCutOff?: () => void
}

/**
 * One client's SSE response. Writes made before `open` are held, so an event
 * delivered while the stream's LISTENs are still being set up is sent right
 * after the headers, in order. A client that stops reading is cut off once
 * its unsent bytes pass the bound, instead of buffering without limit.
 */
export class EventStream implements EventSink {
  readonly #res: ServerResponse
  readonly #options: EventStreamOptions
  #held: Buffer[] | null = []

  constructor (res: ServerResponse, options: EventStreamOptions) {
    this.#res = res
    this.#options = options
  }

  get ended (): boolean {
    return this.#res.writableEnded || this.#res.destroyed
  }

  open (headers: OutgoingHttpHeaders, preamble: string): void {
    const held = this.#held ?? []
    this.#held = null
    this.#res.writeHead(200, headers)
    this.#res.write(preamble)
    for (const chunk of held) this.write(chunk)
  }

  write (chunk: Buffer | string): void {
    if (this.#held !== null) {
      this.#held.push(typeof chunk === 'string' ? Buffer.from(chunk) : chunk)
      return
    }
    if (this.ended) return
    if (this.#res.writableLength > this.#options.maxBufferedBytes) {
      this.#res.destroy()
      this.#options.onCutOff?.()
      return
    }
    this.#res.write(chunk)
  }

  end (): void {
    if (!this.ended) this.#res.end()
  }
}
