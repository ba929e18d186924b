import { EventEmitter } from 'node:events'
import pg from 'pg'
import type { EventId } from './event-id.js'
import { decodeNotification, readEvents, readListenerStart, readReplayPage } from './event-log.js'
import { type ChannelEvent, EventOrderer } from './event-orderer.js'
import { reconnectDelay, watchLiveness } from './liveness.js'

export type { ChannelEvent } from './event-orderer.js'

export const LISTENER_APPLICATION_NAME = 'pg-sse-gateway:listener'

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

/** The defaults of the optional ListenerOptions (ms); config.ts takes its defaults from here. */
export const LISTENER_DEFAULTS: Readonly<Required<Omit<ListenerOptions, 'connectionString'>>> = {
  reconnectDelayMs: 100,
  reconnectDelayMaxMs: 10_000,
  livenessIntervalMs: 10_000,
  livenessTimeoutMs: 5_000
}

export type ListenerState = 'live' | 'catching-up' | 'disconnected' | 'closed'

/**
 * Logged events a stream may have missed, or may have seen that the log no
 * longer holds; told to every stream as `gateway/missed`.
 * - `pruned`: retention deleted events after the listener's position while
 *   it was away: streams behind `resumedAfter` skip to it.
 * - `forked`: the log lost events the listener had already delivered (a
 *   replica promoted without them, a point-in-time recovery): streams ahead
 *   of `resumedAfter` go back to it, so that the events the log now holds
 *   after it reach them, even where their ids were drawn again.
 */
export interface LogDiscontinuity {
  cause: 'pruned' | 'forked'
  resumedAfter: EventId
}

export interface ConnectedInfo {
  /** False on the first connection. */
  reconnected: boolean
  /** Logged events missed while disconnected, read from the log and emitted. */
  caughtUp: number
}

interface ListenerEvents {
  event: [ChannelEvent]
  discontinuity: [LogDiscontinuity]
  connected: [ConnectedInfo]
  disconnected: [Error]
  error: [Error]
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
  readonly #orderer: EventOrderer
  // While catching up, live notifications wait behind the log read.
  #catchingUp = false
  #closed = false
  #everConnected = false
  #reconnectTimer: NodeJS.Timeout | null = null
  #stopLiveness: (() => void) | undefined
  #failures = 0
  #reconnects = 0
  // The log's wire key: only notifications whose MAC it verifies are events.
  #wireKey: Buffer | undefined
  // The server session of the last connection, ended once a new one is up:
  // after a partition it may linger for minutes, pinning the NOTIFY queue.
  #previousBackend: { pid: number, startedAt: string } | undefined

  constructor (options: ListenerOptions) {
    super()
    this.#options = { ...LISTENER_DEFAULTS, ...options }
    this.#orderer = new EventOrderer({
      read: async (ids) => {
        if (this.#client === null) throw new Error('listener is not connected')
        return await readEvents(this.#client, ids)
      },
      emit: (event) => this.emit('event', event),
      // The connection is dropped: the catch-up after the reconnect reads
      // what was pending again, in order.
      onReadFailed: (err) => {
        this.emit('error', err)
        if (this.#client !== null) this.#kill(this.#client, err)
      }
    })
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
    return this.#orderer.position
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
    this.#stopLiveness?.()
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
    let backend: { pid: number, startedAt: string }
    let rewindTo: EventId | undefined
    try {
      await client.connect()
      // A listening session sits idle by design: a server-side idle timeout
      // would silently cut it. And the server must drop the session when
      // this end is gone without a FIN: otherwise it lingers in ClientWrite
      // for the kernel's retransmission timeout (~15 min) and the
      // cluster-wide NOTIFY queue cannot advance past it.
      await client.query(`SET idle_session_timeout = 0; SET tcp_user_timeout = ${this.#serverTimeoutMs}; ` +
        'SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3')
      const { rows } = await client.query<{ standby: boolean, pid: number, started_at: string }>(
        'SELECT pg_is_in_recovery() AS standby, pg_backend_pid() AS pid, backend_start::text AS started_at FROM pg_stat_activity WHERE pid = pg_backend_pid()'
      )
      // LISTEN fails on a standby; after a failover, wait for the primary.
      if (rows[0]?.standby === true) throw new Error('the server is a standby: LISTEN needs a primary')
      backend = { pid: rows[0]?.pid ?? 0, startedAt: rows[0]?.started_at ?? '' }
      const position = this.#orderer.position
      const start = await readListenerStart(client, position)
      this.#wireKey = start.wireKey
      if (!this.#everConnected) this.#orderer.position = start.head
      // The log no longer holds what was delivered up to the position: it
      // forked (a hole in the ids tells), or its head fell behind before
      // anything was published on the new timeline.
      else if (start.forkedAfter !== undefined) rewindTo = start.forkedAfter
      else if (start.head < position) rewindTo = start.head
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
    if (reconnected) this.#orderer.hold()
    let settled = false
    try {
      await this.#converge()
      let caughtUp = 0
      if (reconnected) {
        await this.#endPreviousBackend(client)
        if (rewindTo !== undefined) {
          this.#orderer.position = rewindTo
          this.emit('discontinuity', { cause: 'forked', resumedAfter: rewindTo })
        }
        caughtUp = await this.#catchUp(client)
      }
      this.#previousBackend = backend
      this.#failures = 0
      if (reconnected) this.#reconnects++
      this.#everConnected = true
      this.#stopLiveness?.()
      this.#stopLiveness = watchLiveness(
        async () => { await this.#checkSession(client) },
        { intervalMs: this.#options.livenessIntervalMs, timeoutMs: this.#options.livenessTimeoutMs },
        (err) => this.#kill(client, err)
      )
      settled = true
      this.emit('connected', { reconnected, caughtUp })
    } finally {
      this.#catchingUp = false
      // A reconnect cut short (its catch-up failed) keeps notifications held
      // and drops those pending: emitting them would move the position past
      // events the catch-up had not read yet, and the next catch-up would
      // start after them. Logged ones are in the log, where the next
      // catch-up reads them; plain ones are lost, which gateway/gap tells.
      if (settled || !reconnected) this.#orderer.release()
      else this.#orderer.dropPending()
    }
  }

  // How long the server waits on a silent client (tcp_user_timeout, ms):
  // well above a liveness round, so that a slow but live gateway is never
  // cut, yet bounded.
  get #serverTimeoutMs (): number {
    return Math.max(10_000, 2 * (this.#options.livenessIntervalMs + this.#options.livenessTimeoutMs))
  }

  // Ends the previous connection's server session if it is still there
  // (the same pid and start time: never another session that reuses the
  // pid). Best effort: a role may lack the right to signal it.
  async #endPreviousBackend (client: pg.Client): Promise<void> {
    const previous = this.#previousBackend
    if (previous === undefined) return
    try {
      await client.query(
        'SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE pid = $1 AND backend_start::text = $2 AND pid <> pg_backend_pid()',
        [previous.pid, previous.startedAt]
      )
    } catch (err) {
      this.emit('error', new Error(`could not end the previous listener session (pid ${previous.pid}): ${(err as Error).message}`))
    }
  }

  // Emits, in id order, the logged events on wanted channels committed since
  // the last one emitted. LISTEN is already in place, so whatever commits
  // from now on arrives live and waits in #pending; duplicates are dropped
  // there by id. Each page is read with the log's retention in one
  // snapshot: events pruned past the position before they could be read
  // are told as a discontinuity, never skipped silently.
  async #catchUp (client: pg.Client): Promise<number> {
    if (this.#wireKey === undefined) return 0
    let count = 0
    for (;;) {
      const { prunedThrough, events } = await readReplayPage(client, [...this.#wanted], this.#orderer.position, CATCH_UP_PAGE)
      if (prunedThrough > this.#orderer.position) {
        this.#orderer.position = prunedThrough
        this.emit('discontinuity', { cause: 'pruned', resumedAfter: prunedThrough })
      }
      for (const row of events) this.#orderer.emitLogged(row)
      count += events.length
      if (events.length < CATCH_UP_PAGE) return count
    }
  }

  // The periodic check: the session answers, is on a primary, and still
  // LISTENs on every channel it should.
  async #checkSession (client: pg.Client): Promise<void> {
    if (this.#client !== client) return
    const { rows } = await client.query<{ standby: boolean, channels: string[] }>('SELECT pg_is_in_recovery() AS standby, ARRAY(SELECT pg_listening_channels()) AS channels')
    const row = rows[0]
    if (row?.standby === true) throw new Error('the server became a standby: LISTEN needs a primary')
    const listened = new Set(row?.channels ?? [])
    const lost = [...this.#listening].filter((c) => !listened.has(c))
    if (lost.length > 0) {
      this.emit('error', new Error(`the session had stopped listening on ${lost.length} channel(s); listening again`))
      for (const c of lost) this.#listening.delete(c)
      await this.#converge()
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
    this.#stopLiveness?.()
    this.#stopLiveness = undefined
    client.end().catch(() => {})
    if (this.#closed) return
    this.emit('disconnected', err)
    // A 'disconnected' handler may have closed the listener.
    if (this.#closed) return
    this.#scheduleReconnect()
  }

  #scheduleReconnect (): void {
    const delay = reconnectDelay(this.#failures, this.#options.reconnectDelayMs, this.#options.reconnectDelayMaxMs)
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
    const decoded = decodeNotification(channel, payload, this.#wireKey)
    if (decoded === null) this.#orderer.push(channel, undefined, payload)
    else this.#orderer.push(channel, decoded.id, decoded.data)
  }
}
