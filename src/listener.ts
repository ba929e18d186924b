import { EventEmitter } from 'node:events'
import pg from 'pg'
import { decodeNotification, readEvents, readEventsAfter, readLogHead } from './event-log.js'

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
  /** How often the connection is checked with a query of its own. */
  livenessIntervalMs?: number
  /** How long that query (and a connection attempt) may take before the connection is deemed dead. */
  livenessTimeoutMs?: number
}

export type ListenerState = 'live' | 'catching-up' | 'disconnected' | 'closed'

export interface ConnectedInfo {
  /** False on the first connection. */
  reconnected: boolean
  /** Logged events missed while disconnected, read from the log and emitted. */
  caughtUp: number
}

interface ListenerEvents {
  event: [ChannelEvent]
  connected: [ConnectedInfo]
  disconnected: [Error]
  error: [Error]
}

interface PendingEvent {
  channel: string
  id: string | undefined
  data: string | undefined
}

// Rows read per query when catching up.
const CATCH_UP_PAGE = 1000

/**
 * The one dedicated, non-pooled connection that LISTENs for every channel
 * the gateway's streams want.
 *
 * Callers say which channels they want (`listen`/`unlisten`); the connection
 * converges on that set, one command batch at a time, so a join racing a
 * leave can never leave a wanted channel without its LISTEN.
 *
 * Events are emitted in the order PostgreSQL delivered them (commit order,
 * which is id order), including those whose payload must first be read from
 * the log. The connection is watched, not trusted: TCP keepalive, and a
 * periodic query with its own timeout, since a half-open connection fires no
 * error. That query also checks that the session still LISTENs on every
 * channel and is on a primary. When the connection is lost it reconnects
 * with backoff and jitter, LISTENs again, and before going live emits from
 * the log every logged event it missed; plain NOTIFYs sent meanwhile are gone,
 * which `connected` with `reconnected: true` tells.
 */
export class ListenerConnection extends EventEmitter<ListenerEvents> {
  readonly #options: Required<ListenerOptions>
  readonly #wanted = new Set<string>()
  readonly #listening = new Set<string>()
  #client: pg.Client | null = null
  #sync: Promise<void> = Promise.resolve()
  #pending: PendingEvent[] = []
  #draining = false
  // While catching up, live notifications wait behind the log read.
  #catchingUp = false
  #closed = false
  #everConnected = false
  #reconnectTimer: NodeJS.Timeout | null = null
  #livenessTimer: NodeJS.Timeout | null = null
  #failures = 0
  #reconnects = 0
  // The largest event id emitted: every logged event on a wanted channel up
  // to it has been emitted, since they arrive in id order.
  #position = 0

  constructor (options: ListenerOptions) {
    super()
    this.#options = {
      reconnectDelayMs: 100,
      reconnectDelayMaxMs: 10_000,
      livenessIntervalMs: 10_000,
      livenessTimeoutMs: 5_000,
      ...options
    }
  }

  get connected (): boolean {
    return this.#client !== null && !this.#catchingUp
  }

  /** `live`, `catching-up` (reconnected, reading what it missed), `disconnected` or `closed`. */
  get state (): ListenerState {
    if (this.#closed) return 'closed'
    if (this.#client === null) return 'disconnected'
    return this.#catchingUp ? 'catching-up' : 'live'
  }

  /** Times the connection was re-established since the first connect. */
  get reconnects (): number {
    return this.#reconnects
  }

  /** Channels LISTENed on the live connection right now. */
  get channels (): ReadonlySet<string> {
    return this.#listening
  }

  /** The id of the last logged event emitted (or the log head at start). */
  get position (): number {
    return this.#position
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
    if (this.#livenessTimer !== null) clearInterval(this.#livenessTimer)
    const client = this.#client
    this.#client = null
    this.#listening.clear()
    if (client !== null) await client.end().catch(() => {})
  }

  async #open (): Promise<void> {
    const client = new pg.Client({
      connectionString: this.#options.connectionString,
      application_name: LISTENER_APPLICATION_NAME,
      keepAlive: true,
      connectionTimeoutMillis: this.#options.livenessTimeoutMs
    })
    client.on('notification', (message) => this.#onNotification(message.channel, message.payload ?? ''))
    client.on('error', (err) => this.#onLost(client, err))
    client.on('end', () => this.#onLost(client, new Error('listener connection ended')))
    try {
      await client.connect()
      // A listening session sits idle by design: a server-side idle timeout
      // would silently cut it.
      await client.query('SET idle_session_timeout = 0')
      const { rows } = await client.query<{ standby: boolean }>('SELECT pg_is_in_recovery() AS standby')
      // LISTEN fails on a standby; after a failover, wait for the primary.
      if (rows[0]?.standby === true) throw new Error('the server is a standby: LISTEN needs a primary')
      if (!this.#everConnected) this.#position = await readLogHead(client)
    } catch (err) {
      client.removeAllListeners('end')
      await client.end().catch(() => {})
      throw err
    }
    if (this.#closed) {
      await client.end()
      return
    }
    const reconnected = this.#everConnected
    this.#client = client
    this.#listening.clear()
    this.#catchingUp = reconnected
    try {
      await this.#converge()
      const caughtUp = reconnected ? await this.#catchUp(client) : 0
      this.#failures = 0
      if (reconnected) this.#reconnects++
      this.#everConnected = true
      this.#startLiveness(client)
      this.emit('connected', { reconnected, caughtUp })
    } finally {
      this.#catchingUp = false
      if (this.#pending.length > 0 && !this.#draining) this.#startDrain()
    }
  }

  // Emits, in id order, the logged events on wanted channels committed since
  // the last one emitted. LISTEN is already in place, so whatever commits
  // from now on arrives live and waits in #pending; duplicates are dropped
  // there by id.
  async #catchUp (client: pg.Client): Promise<number> {
    let count = 0
    for (;;) {
      const rows = await readEventsAfter(client, [...this.#wanted], this.#position, CATCH_UP_PAGE)
      for (const row of rows) {
        this.#position = Number(row.id)
        this.emit('event', { channel: row.channel, id: row.id, data: row.payload })
      }
      count += rows.length
      if (rows.length < CATCH_UP_PAGE) return count
    }
  }

  #startLiveness (client: pg.Client): void {
    if (this.#livenessTimer !== null) clearInterval(this.#livenessTimer)
    // One check at a time: with an interval shorter than the timeout, checks
    // would otherwise pile up as concurrent queries on a silent connection
    // (which pg deprecates) until the first one times out.
    let checking = false
    this.#livenessTimer = setInterval(() => {
      if (checking) return
      checking = true
      this.#checkLiveness(client)
        .catch((err: Error) => this.#kill(client, err))
        .finally(() => { checking = false })
    }, this.#options.livenessIntervalMs)
    this.#livenessTimer.unref()
  }

  async #checkLiveness (client: pg.Client): Promise<void> {
    if (this.#client !== client) return
    let timer: NodeJS.Timeout | undefined
    const timeout = new Promise<never>((_resolve, reject) => {
      timer = setTimeout(() => reject(new Error(`listener liveness query took over ${this.#options.livenessTimeoutMs} ms`)), this.#options.livenessTimeoutMs)
    })
    try {
      const { rows } = await Promise.race([
        client.query<{ standby: boolean, channels: string[] }>('SELECT pg_is_in_recovery() AS standby, ARRAY(SELECT pg_listening_channels()) AS channels'),
        timeout
      ])
      const row = rows[0]
      if (row?.standby === true) throw new Error('the server became a standby: LISTEN needs a primary')
      const listened = new Set(row?.channels ?? [])
      const lost = [...this.#listening].filter((c) => !listened.has(c))
      if (lost.length > 0) {
        this.emit('error', new Error(`the session had stopped listening on ${lost.length} channel(s); listening again`))
        for (const c of lost) this.#listening.delete(c)
        await this.#converge()
      }
    } finally {
      clearTimeout(timer)
    }
  }

  // Drops a connection deemed dead: its socket may never report an error.
  #kill (client: pg.Client, err: Error): void {
    const socket = (client as unknown as { connection?: { stream?: { destroy (): void } } }).connection?.stream
    socket?.destroy()
    this.#onLost(client, err)
  }

  #onLost (client: pg.Client, err: Error): void {
    if (this.#client !== client) return
    this.#client = null
    this.#listening.clear()
    if (this.#livenessTimer !== null) clearInterval(this.#livenessTimer)
    this.#livenessTimer = null
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
        const client = this.#client
        // Lost again half-way through: drop it and start over.
        if (client !== null && !this.#closed) this.#kill(client, err)
        else if (!this.#closed && this.#reconnectTimer === null) this.#scheduleReconnect()
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
    if (!this.#draining && !this.#catchingUp) this.#startDrain()
  }

  #startDrain (): void {
    this.#drain().catch((err: Error) => this.emit('error', err))
  }

  // Emits pending events in arrival order. An event whose payload is in the
  // log holds back those behind it until it has been read. A logged event at
  // or below the position was already emitted (by a catch-up): dropped.
  async #drain (): Promise<void> {
    this.#draining = true
    try {
      while (this.#pending.length > 0 && !this.#catchingUp) {
        const missing = this.#pending.filter((e) => e.data === undefined && e.id !== undefined)
        // Only the events that were pending before the read are settled:
        // a reference that arrived during it has not been read yet and must
        // wait for the next round, or it would be dropped as missing.
        const settled = this.#pending.length
        if (missing.length > 0 && !await this.#fill(missing)) return
        const batch = this.#pending.splice(0, settled)
        for (const e of batch) {
          if (e.data === undefined) continue
          if (e.id !== undefined) {
            const id = Number(e.id)
            if (id <= this.#position) continue
            this.#position = id
          }
          this.emit('event', { channel: e.channel, id: e.id, data: e.data })
        }
      }
    } finally {
      this.#draining = false
    }
  }

  // Reads referenced payloads from the log. If the read fails, the
  // connection is dropped with everything pending: the catch-up after the
  // reconnect reads those events again, in order.
  async #fill (missing: PendingEvent[]): Promise<boolean> {
    const client = this.#client
    try {
      if (client === null) throw new Error('listener is not connected')
      const rows = await readEvents(client, missing.map((e) => e.id as string))
      const byId = new Map(rows.map((r) => [r.id, r]))
      for (const e of missing) {
        const row = byId.get(e.id as string)
        // A row for another channel would be a forged reference: drop it.
        if (row !== undefined && row.channel === e.channel) e.data = row.payload
      }
      return true
    } catch (err) {
      this.#pending = []
      this.emit('error', err as Error)
      if (client !== null) this.#kill(client, err as Error)
      return false
    }
  }
}
