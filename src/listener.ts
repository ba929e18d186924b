import { EventEmitter } from 'node:events'
import pg from 'pg'
import { decodeNotification, readEvents } from './event-log.js'

export const LISTENER_APPLICATION_NAME = 'pg-sse-gateway:listener'

/** What the listener hands on: a gateway event (with id) or a plain NOTIFY. */
export interface ChannelEvent {
  channel: string
  id: string | undefined
  data: string
}

export interface ListenerOptions {
  connectionString: string
  /** First delay before reconnecting; doubles on each failure, with jitter. */
  reconnectDelayMs?: number
  reconnectDelayMaxMs?: number
}

interface ListenerEvents {
  event: [ChannelEvent]
  connected: []
  disconnected: [Error]
  error: [Error]
}

interface PendingEvent {
  channel: string
  id: string | undefined
  data: string | undefined
}

/**
 * The one dedicated, non-pooled connection that LISTENs for every channel
 * the gateway's streams want.
 *
 * Callers say which channels they want (`listen`/`unlisten`); the connection
 * converges on that set, one command batch at a time, so a join racing a
 * leave can never leave a wanted channel without its LISTEN. After a lost
 * connection it reconnects with backoff and LISTENs the whole set again.
 *
 * Events are emitted in the order PostgreSQL delivered them (commit order),
 * including those whose payload must first be read from the log.
 */
export class ListenerConnection extends EventEmitter<ListenerEvents> {
  readonly #options: Required<ListenerOptions>
  readonly #wanted = new Set<string>()
  readonly #listening = new Set<string>()
  #client: pg.Client | null = null
  #sync: Promise<void> = Promise.resolve()
  #pending: PendingEvent[] = []
  #draining = false
  #closed = false
  #reconnectTimer: NodeJS.Timeout | null = null
  #failures = 0

  constructor (options: ListenerOptions) {
    super()
    this.#options = { reconnectDelayMs: 100, reconnectDelayMaxMs: 10_000, ...options }
  }

  get connected (): boolean {
    return this.#client !== null
  }

  /** Channels LISTENed on the live connection right now. */
  get channels (): ReadonlySet<string> {
    return this.#listening
  }

  /** Connects for the first time; rejects if the database cannot be reached. */
  async connect (): Promise<void> {
    await this.#open()
  }

  /** Resolves once the channel is LISTENed on the live connection. */
  listen (channel: string): Promise<void> {
    this.#wanted.add(channel)
    return this.#converge()
  }

  /** Resolves once the channel is no longer LISTENed (unless wanted again). */
  unlisten (channel: string): Promise<void> {
    this.#wanted.delete(channel)
    return this.#converge()
  }

  async close (): Promise<void> {
    this.#closed = true
    if (this.#reconnectTimer !== null) clearTimeout(this.#reconnectTimer)
    const client = this.#client
    this.#client = null
    this.#listening.clear()
    if (client !== null) await client.end().catch(() => {})
  }

  async #open (): Promise<void> {
    const client = new pg.Client({
      connectionString: this.#options.connectionString,
      application_name: LISTENER_APPLICATION_NAME,
      keepAlive: true
    })
    client.on('notification', (message) => this.#onNotification(message.channel, message.payload ?? ''))
    client.on('error', (err) => this.#onLost(client, err))
    client.on('end', () => this.#onLost(client, new Error('listener connection ended')))
    await client.connect()
    // A listening session sits idle by design: a server-side idle timeout
    // would silently cut it.
    await client.query('SET idle_session_timeout = 0')
    if (this.#closed) {
      await client.end()
      return
    }
    this.#client = client
    this.#listening.clear()
    this.#failures = 0
    await this.#converge()
    this.emit('connected')
  }

  #onLost (client: pg.Client, err: Error): void {
    if (this.#client !== client) return
    this.#client = null
    this.#listening.clear()
    client.end().catch(() => {})
    if (this.#closed) return
    this.emit('disconnected', err)
    // A 'disconnected' handler may have closed the listener.
    if (this.#closed) return
    this.#scheduleReconnect()
  }

  #scheduleReconnect (): void {
    const { reconnectDelayMs, reconnectDelayMaxMs } = this.#options
    const ceiling = Math.min(reconnectDelayMaxMs, reconnectDelayMs * 2 ** this.#failures)
    // Full jitter: instances that lost the same server do not come back in step.
    const delay = Math.random() * ceiling
    this.#failures++
    this.#reconnectTimer = setTimeout(() => {
      this.#reconnectTimer = null
      this.#open().catch((err: Error) => {
        this.emit('error', err)
        if (!this.#closed && this.#client === null && this.#reconnectTimer === null) this.#scheduleReconnect()
      })
    }, delay)
  }

  /** Brings the live connection's LISTENs in line with the wanted set. */
  #converge (): Promise<void> {
    const run = this.#sync.then(async () => {
      const client = this.#client
      if (client === null) {
        if (this.#closed) throw new Error('listener is closed')
        throw new Error('listener is not connected')
      }
      const toListen = [...this.#wanted].filter((c) => !this.#listening.has(c))
      const toUnlisten = [...this.#listening].filter((c) => !this.#wanted.has(c))
      if (toListen.length === 0 && toUnlisten.length === 0) return
      // One round trip for the whole change; identifiers quoted.
      const sql = [
        ...toListen.map((c) => `LISTEN ${client.escapeIdentifier(c)}`),
        ...toUnlisten.map((c) => `UNLISTEN ${client.escapeIdentifier(c)}`)
      ].join('; ')
      await client.query(sql)
      for (const c of toListen) this.#listening.add(c)
      for (const c of toUnlisten) this.#listening.delete(c)
    })
    // The chain goes on whatever this step did; the caller sees its outcome.
    this.#sync = run.catch(() => {})
    return run
  }

  #onNotification (channel: string, payload: string): void {
    const decoded = decodeNotification(payload)
    this.#pending.push(decoded === null
      ? { channel, id: undefined, data: payload }
      : { channel, id: decoded.id, data: decoded.data })
    if (!this.#draining) this.#drain().catch((err: Error) => this.emit('error', err))
  }

  // Emits pending events in arrival order. An event whose payload is in the
  // log holds back those behind it until it has been read.
  async #drain (): Promise<void> {
    this.#draining = true
    try {
      while (this.#pending.length > 0) {
        const missing = this.#pending.filter((e) => e.data === undefined && e.id !== undefined)
        // Only the events that were pending before the read are settled:
        // a reference that arrived during it has not been read yet and must
        // wait for the next round, or it would be dropped as missing.
        const settled = this.#pending.length
        if (missing.length > 0) await this.#fill(missing)
        const batch = this.#pending.splice(0, settled)
        for (const e of batch) {
          if (e.data !== undefined) this.emit('event', { channel: e.channel, id: e.id, data: e.data })
        }
      }
    } finally {
      this.#draining = false
    }
  }

  async #fill (missing: PendingEvent[]): Promise<void> {
    const client = this.#client
    if (client === null) return
    try {
      const rows = await readEvents(client, missing.map((e) => e.id as string))
      const byId = new Map(rows.map((r) => [r.id, r]))
      for (const e of missing) {
        const row = byId.get(e.id as string)
        // A row for another channel would be a forged reference: drop it.
        if (row !== undefined && row.channel === e.channel) e.data = row.payload
      }
    } catch (err) {
      this.emit('error', err as Error)
    }
  }
}
