import type { EventId } from './event-id.js'
import type { LoggedEvent } from './event-log.js'

/** What the listener hands on: a gateway event (with id) or a plain NOTIFY. */
export interface ChannelEvent {
  channel: string
  /** A logged event's id; undefined for a plain NOTIFY. */
  id: EventId | undefined
  data: string
}

/** Reads logged events by id (the payloads too large for their notification). */
export type PayloadReader = (ids: readonly string[]) => Promise<LoggedEvent[]>

interface PendingEvent {
  channel: string
  id: EventId | undefined
  data: string | undefined
}

export interface EventOrdererOptions {
  /** Reads the payloads that travel by reference; called with the ids, in id order. */
  read: PayloadReader
  emit (event: ChannelEvent): void
  /** A read failed: everything pending was dropped, and the caller starts over from `position`. */
  onReadFailed (err: Error): void
}

/**
 * Puts a listener's notifications out in the order PostgreSQL delivered
 * them (commit order, which is id order), whatever waits for a log read.
 *
 * A logged event whose payload travels by reference holds back those behind
 * it until it has been read. A logged event at or below `position` was
 * already emitted (by a catch-up): dropped. While held (during a catch-up
 * that emits through `emitLogged`), notifications wait.
 */
export class EventOrderer {
  readonly #options: EventOrdererOptions
  #pending: PendingEvent[] = []
  #draining = false
  #held = false
  /**
   * The largest logged event id emitted: every logged event on a wanted
   * channel up to it has been emitted, since they arrive in id order.
   */
  position: EventId = 0

  constructor (options: EventOrdererOptions) {
    this.#options = options
  }

  /** Notifications wait until `release()`. */
  hold (): void {
    this.#held = true
  }

  release (): void {
    this.#held = false
    if (this.#pending.length > 0 && !this.#draining) this.#startDrain()
  }

  /** Drops every notification waiting (held, or behind a read); the position stays. */
  dropPending (): void {
    this.#pending = []
  }

  /** A notification: `id` for a logged event, `data` undefined when its payload must be read. */
  push (channel: string, id: EventId | undefined, data: string | undefined): void {
    this.#pending.push({ channel, id, data })
    if (!this.#draining && !this.#held) this.#startDrain()
  }

  /** Emits a logged event read from the log (a catch-up), moving the position to it. */
  emitLogged (event: LoggedEvent): void {
    // The log's row is an edge: its id arrives as PostgreSQL prints it.
    this.position = Number(event.id)
    this.#options.emit({ channel: event.channel, id: this.position, data: event.payload })
  }

  #startDrain (): void {
    this.#drain().catch((err: Error) => this.#options.onReadFailed(err))
  }

  async #drain (): Promise<void> {
    this.#draining = true
    try {
      while (this.#pending.length > 0 && !this.#held) {
        const missing = this.#pending.filter((e) => e.data === undefined && e.id !== undefined)
        // Only the events that were pending before the read are settled:
        // a reference that arrived during it has not been read yet and must
        // wait for the next round, or it would be dropped as missing.
        const settled = this.#pending.length
        if (missing.length > 0 && !await this.#fill(missing)) return
        for (const e of this.#pending.splice(0, settled)) {
          if (e.data === undefined) continue
          if (e.id !== undefined) {
            if (e.id <= this.position) continue
            this.position = e.id
          }
          this.#options.emit({ channel: e.channel, id: e.id, data: e.data })
        }
      }
    } finally {
      this.#draining = false
    }
  }

  // Reads referenced payloads. If the read fails, everything pending is
  // dropped: the caller reconnects, and its catch-up reads those events
  // again, in order.
  async #fill (missing: PendingEvent[]): Promise<boolean> {
    try {
      const rows = await this.#options.read(missing.map((e) => String(e.id)))
      const byId = new Map(rows.map((r) => [Number(r.id), r]))
      for (const e of missing) {
        const row = byId.get(e.id as EventId)
        // A row of another channel cannot be this event's.
        if (row !== undefined && row.channel === e.channel) e.data = row.payload
      }
      return true
    } catch (err) {
      this.#pending = []
      this.#options.onReadFailed(err as Error)
      return false
    }
  }
}
