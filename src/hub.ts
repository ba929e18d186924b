import type { EventId } from './event-id.js'
import type { ChannelEvent } from './listener.js'
import { encodeEvent } from './sse.js'

/** Where a stream's bytes go. */
export interface EventSink {
  /** `id` is the event's log id, for events that have one. */
  write (frame: Buffer, id?: EventId): void
}

/** The subset of the listener that the hub drives. */
export interface ChannelListener {
  listen (channel: string): Promise<void>
  unlisten (channel: string): Promise<void>
}

/** A channel's last delivered event, for the operator's status. */
export interface ChannelActivity {
  /** Epoch milliseconds. */
  lastEventAt: number
  lastEventId: EventId | undefined
}

interface ChannelEntry extends ChannelActivity {
  sinks: Set<EventSink>
  /** Settles when the channel's LISTEN has run; every joiner waits on it. */
  listening: Promise<void>
}

/**
 * Channel → streams. The first stream on a channel makes the listener LISTEN,
 * the last one to leave makes it UNLISTEN; each event is framed once and the
 * same bytes are written to every stream on its channel.
 */
export class ChannelHub {
  readonly #listener: ChannelListener
  readonly #channels = new Map<string, ChannelEntry>()

  constructor (listener: ChannelListener) {
    this.#listener = listener
  }

  get channelCount (): number {
    return this.#channels.size
  }

  subscriberCount (channel: string): number {
    return this.#channels.get(channel)?.sinks.size ?? 0
  }

  /** The channel's last event, while it has subscribers; lastEventAt is 0 before the first. */
  activity (channel: string): ChannelActivity | undefined {
    const entry = this.#channels.get(channel)
    return entry === undefined ? undefined : { lastEventAt: entry.lastEventAt, lastEventId: entry.lastEventId }
  }

  /**
   * Adds a sink to channels and resolves, with the function that removes it,
   * once every channel is LISTENed. If a LISTEN fails the sink is removed
   * again and the promise rejects.
   */
  async subscribe (channels: readonly string[], sink: EventSink): Promise<() => void> {
    const waits: Promise<void>[] = []
    for (const channel of channels) {
      let entry = this.#channels.get(channel)
      if (entry === undefined) {
        entry = { sinks: new Set(), listening: this.#listener.listen(channel), lastEventAt: 0, lastEventId: undefined }
        // A failed LISTEN is reported to whoever waits; never unhandled.
        entry.listening.catch(() => {})
        this.#channels.set(channel, entry)
      }
      entry.sinks.add(sink)
      waits.push(entry.listening)
    }
    let subscribed = true
    const unsubscribe = (): void => {
      if (!subscribed) return
      subscribed = false
      for (const channel of channels) this.#remove(channel, sink)
    }
    try {
      await Promise.all(waits)
    } catch (err) {
      unsubscribe()
      throw err
    }
    return unsubscribe
  }

  /** Frames the event once and writes it to every sink on its channel. */
  deliver (event: ChannelEvent): number {
    const entry = this.#channels.get(event.channel)
    if (entry === undefined) return 0
    const frame = Buffer.from(encodeEvent({ id: event.id === undefined ? undefined : String(event.id), event: event.channel, data: event.data }))
    for (const sink of entry.sinks) sink.write(frame, event.id)
    entry.lastEventAt = Date.now()
    entry.lastEventId = event.id
    return entry.sinks.size
  }

  /** Writes a frame once to every sink of every channel. */
  broadcast (frame: Buffer): number {
    const sinks = new Set<EventSink>()
    for (const entry of this.#channels.values()) for (const sink of entry.sinks) sinks.add(sink)
    for (const sink of sinks) sink.write(frame)
    return sinks.size
  }

  #remove (channel: string, sink: EventSink): void {
    const entry = this.#channels.get(channel)
    if (entry === undefined || !entry.sinks.delete(sink) || entry.sinks.size > 0) return
    this.#channels.delete(channel)
    // Failure here means the connection is gone, and with it the LISTEN.
    this.#listener.unlisten(channel).catch(() => {})
  }
}
