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

/** An event on its way to streams: live from the listener, or read back from the log. */
export interface DeliveredEvent {
  channel: string
  /** The log id; undefined for a plain NOTIFY. */
  id: EventId | undefined
  data: string
}

/**
 * One event, as every selector on its channel sees it: made once per event
 * and delivery, so that what one selector computes (the frame, the parsed
 * payload) the others reuse.
 */
export interface EventView {
  readonly event: DeliveredEvent
  /** The event framed for a channel stream (`id:` the log id, `event:` the channel, `data:`); built once. */
  channelFrame (): Buffer
  /** The data parsed as JSON, once; undefined when it is not JSON. */
  json (): unknown
}

/**
 * What a stream takes of its channels' events, and how they are framed for
 * it: a channel stream takes all of them as they are; a filtered stream
 * (row filters) or another protocol (Mercure's topic selectors) takes some,
 * framed its own way. Streams whose selectors have the same `key` on a
 * channel share one `select()` per event and the Buffer it returns, so the
 * key must say everything select() depends on. select() must not throw.
 */
export interface EventSelector {
  readonly key: string
  /** The frame to write, or undefined when the stream does not take the event. */
  select (view: EventView): Buffer | undefined
}

/** Every event, framed for a channel stream: what `GET /events` streams get. */
export const CHANNEL_SELECTOR: EventSelector = {
  key: '',
  select: (view) => view.channelFrame()
}

const UNPARSED = Symbol('unparsed')

/** An EventView that computes each of its parts on first use. */
export class LazyEventView implements EventView {
  readonly event: DeliveredEvent
  #frame: Buffer | undefined
  #json: unknown = UNPARSED

  constructor (event: DeliveredEvent) {
    this.event = event
  }

  channelFrame (): Buffer {
    this.#frame ??= Buffer.from(encodeEvent({ id: this.event.id === undefined ? undefined : String(this.event.id), event: this.event.channel, data: this.event.data }))
    return this.#frame
  }

  json (): unknown {
    if (this.#json === UNPARSED) {
      try {
        this.#json = JSON.parse(this.event.data)
      } catch {
        this.#json = undefined
      }
    }
    return this.#json
  }
}

/** The streams of a channel that share a selector key. */
interface SelectorGroup {
  readonly selector: EventSelector
  readonly sinks: Set<EventSink>
}

interface ChannelEntry extends ChannelActivity {
  /** By selector key. */
  groups: Map<string, SelectorGroup>
  sinkCount: number
  /** Settles when the channel's LISTEN has run; every joiner waits on it. */
  listening: Promise<void>
}

/**
 * Channel → streams. The first stream on a channel makes the listener LISTEN,
 * the last one to leave makes it UNLISTEN. Each event is offered once to each
 * distinct selector on its channel, and the Buffer that selector returns is
 * written to every stream that shares it.
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
    return this.#channels.get(channel)?.sinkCount ?? 0
  }

  /** The channel's last event, while it has subscribers; lastEventAt is 0 before the first. */
  activity (channel: string): ChannelActivity | undefined {
    const entry = this.#channels.get(channel)
    return entry === undefined ? undefined : { lastEventAt: entry.lastEventAt, lastEventId: entry.lastEventId }
  }

  /**
   * Adds a sink to channels, behind a selector (every event, channel
   * framing, by default), and resolves, with the function that removes it,
   * once every channel is LISTENed. If a LISTEN fails the sink is removed
   * again and the promise rejects.
   */
  async subscribe (channels: readonly string[], sink: EventSink, selector: EventSelector = CHANNEL_SELECTOR): Promise<() => void> {
    const waits: Promise<void>[] = []
    for (const channel of channels) {
      let entry = this.#channels.get(channel)
      if (entry === undefined) {
        entry = { groups: new Map(), sinkCount: 0, listening: this.#listener.listen(channel), lastEventAt: 0, lastEventId: undefined }
        // A failed LISTEN is reported to whoever waits; never unhandled.
        entry.listening.catch(() => {})
        this.#channels.set(channel, entry)
      }
      let group = entry.groups.get(selector.key)
      if (group === undefined) {
        group = { selector, sinks: new Set() }
        entry.groups.set(selector.key, group)
      }
      if (!group.sinks.has(sink)) {
        group.sinks.add(sink)
        entry.sinkCount++
      }
      waits.push(entry.listening)
    }
    let subscribed = true
    const unsubscribe = (): void => {
      if (!subscribed) return
      subscribed = false
      for (const channel of channels) this.#remove(channel, selector.key, sink)
    }
    try {
      await Promise.all(waits)
    } catch (err) {
      unsubscribe()
      throw err
    }
    return unsubscribe
  }

  /** Offers the event to each selector on its channel and writes what each returns to its streams; returns the streams written to. */
  deliver (event: ChannelEvent): number {
    const entry = this.#channels.get(event.channel)
    if (entry === undefined) return 0
    const view = new LazyEventView(event)
    let delivered = 0
    for (const group of entry.groups.values()) {
      const frame = group.selector.select(view)
      if (frame === undefined) continue
      for (const sink of group.sinks) sink.write(frame, event.id)
      delivered += group.sinks.size
    }
    entry.lastEventAt = Date.now()
    entry.lastEventId = event.id
    return delivered
  }

  #remove (channel: string, key: string, sink: EventSink): void {
    const entry = this.#channels.get(channel)
    const group = entry?.groups.get(key)
    if (entry === undefined || group === undefined || !group.sinks.delete(sink)) return
    entry.sinkCount--
    if (group.sinks.size === 0) entry.groups.delete(key)
    if (entry.sinkCount > 0) return
    this.#channels.delete(channel)
    // Failure here means the connection is gone, and with it the LISTEN.
    this.#listener.unlisten(channel).catch(() => {})
  }
}
