import type pg from 'pg'
import { connectionAnswered, type EventToPublish, type IdempotencyKey, type PublishResult, publishBatch, publishEvents } from './event-log.js'

/*
 * Why publishes are committed in groups.
 *
 * PostgreSQL serialises every transaction that NOTIFYs: it takes one lock
 * for the whole cluster before committing and holds it until the commit is
 * done, WAL flush included, so that notifications queue in commit order. A
 * transaction that also writes the event log must wait for that flush, so
 * a database commits one publishing transaction per flush, however many
 * clients publish at once (1,000 to 2,000 a second on the machine of
 * BENCHMARKS.md). A bare `SELECT pg_notify(...)` writes no WAL before its
 * commit record and does not wait for the flush, which is why it goes faster
 * and why it would not survive a crash.
 *
 * So the number of transactions is what to save. Publishes that arrive
 * while earlier ones are committing wait, and go together in the next
 * transaction: one call of sse_gateway.publish_batch_now with all their events,
 * in arrival order. Under light load a publish goes out at once, alone; under
 * heavy load each flush carries many. Each publish still gets what it asked
 * for: its events commit together or not at all, with consecutive ids, and
 * its promise resolves only after the COMMIT.
 *
 * When a group fails, what happens depends on why:
 *  - the database refused an event: a value (SQLSTATE class 22), a constraint
 *    (23) or a trigger that raised (P0). The transaction rolled back, so the
 *    group is split in halves and each half tried again, down to the
 *    publish at fault, which alone fails: about 2 log2(n) transactions for
 *    one bad publish among n, not n;
 *  - anything else (a lost connection, a cancelled statement, a full disk):
 *    every publish of the group fails with that error and none is retried.
 *    Retried alone, each would fail the same way; and a connection lost
 *    during COMMIT leaves the outcome unknown, where a retry could publish
 *    twice. The client decides (an Idempotency-Key makes its retry safe).
 *
 * A connection that goes silent (a partition, a half-open TCP connection)
 * is bounded by the pool's client-side query timeout: the query fails, its
 * outcome unknown, and the connection is destroyed, never returned to the
 * pool. So are the connections opened before it: they went through the same
 * network, and each would otherwise cost one more timeout to find dead.
 * Publishing goes on through new connections.
 *
 * Hand-written: it is a queue and a loop around one SQL call, and no library
 * of the node-postgres ecosystem batches statements into one transaction.
 */

export interface GroupPublisherOptions {
  /** A group holds at most this many events (a single larger publish goes alone). */
  maxEvents: number
  /** A group holds at most this many payload bytes (a single larger publish goes alone). */
  maxBytes: number
  /**
   * A publish still waiting for its group after this long fails with
   * PublishQueueTimeoutError, never having been sent: when the database
   * stalls (a lock held, a lost server), publishes fail instead of piling up.
   */
  maxWaitMs: number
  /**
   * A group still without the database's answer after this long makes the
   * publisher `stalled` (readiness says so), until it settles.
   */
  stalledAfterMs: number
}

export class PublishQueueTimeoutError extends Error {
  override name = 'PublishQueueTimeoutError'
  /** Not a SQLSTATE: nothing reached the database. */
  readonly code = 'GW_PUBLISH_QUEUE_TIMEOUT'
}

/**
 * No connection could be had for the group (refused, timed out, the server
 * starting up: see `cause`), so nothing was sent. Not a SQLSTATE.
 */
export class PublishNotSentError extends Error {
  override name = 'PublishNotSentError'
  readonly code = 'GW_PUBLISH_NOT_SENT'
}

// Socket errors that only a connection attempt can give: the server was
// never reached (a connected socket is reset or times out, never refused).
const CONNECT_ERRORS = new Set(['ECONNREFUSED', 'ENOTFOUND', 'EAI_AGAIN'])
// pg-pool's errors for a connection not had in time (it gives them no code).
const POOL_CONNECT_TIMEOUTS = new Set(['timeout exceeded when trying to connect', 'Connection terminated due to connection timeout'])

/**
 * Whether a failed publish certainly left nothing in the database, rather
 * than an outcome nobody can know. True for a publish never sent
 * (PublishQueueTimeoutError, PublishNotSentError, a connection refused, the
 * pool's connect timeout) and for a SQLSTATE, the database's answer about
 * the statement, which rolled back; except a connection exception (class
 * 08) or the server ending the session (57P01 and kin), which may come after
 * the COMMIT was done. 57P03 (cannot connect now) answers only a connection
 * attempt. Anything else (a query timeout, a connection reset or ended) may
 * come after the COMMIT too: false.
 */
export function nothingPublished (err: unknown): boolean {
  if (err instanceof PublishQueueTimeoutError || err instanceof PublishNotSentError) return true
  const code = (err as { code?: unknown } | null)?.code
  if (typeof code === 'string') {
    if (CONNECT_ERRORS.has(code)) return true
    if (/^[0-9A-Z]{5}$/.test(code)) return code === '57P03' || !(code.startsWith('08') || code.startsWith('57P'))
  }
  return err instanceof Error && POOL_CONNECT_TIMEOUTS.has(err.message)
}

function ignore (): void {}

interface PendingPublish {
  events: readonly EventToPublish[]
  bytes: number
  queuedAt: number
  resolve: (ids: string[]) => void
  reject: (err: unknown) => void
}

/** The database refused one of the events; the transaction rolled back and nothing else went wrong. */
function refusedAnEvent (err: unknown): boolean {
  const code = (err as { code?: unknown } | null)?.code
  return typeof code === 'string' && /^(22|23|P0)/.test(code)
}

export class GroupPublisher {
  readonly #pool: pg.Pool
  readonly #maxEvents: number
  readonly #maxBytes: number
  readonly #maxWaitMs: number
  readonly #stalledAfterMs: number
  #expiryTimer: NodeJS.Timeout | undefined
  #waiting: PendingPublish[] = []
  #committing = false
  // Idempotent publishes under way, each in a transaction of its own.
  #alone = 0
  #groups = 0
  // drain()'s waiters, told when no group commits, none waits and none goes alone.
  #idle: Array<() => void> = []
  // When the group now committing asked for its connection (performance.now()).
  #sentAt: number | undefined
  // Bumped by each connection failure; a connection opened before the last
  // one is not used (see the comment at the top).
  #generation = 0
  readonly #openedIn = new WeakMap<pg.ClientBase, number>()
  readonly #onConnect = (client: pg.PoolClient): void => { this.#adopt(client, this.#generation) }

  constructor (pool: pg.Pool, options: GroupPublisherOptions) {
    this.#pool = pool
    this.#maxEvents = options.maxEvents
    this.#maxBytes = options.maxBytes
    this.#maxWaitMs = options.maxWaitMs
    this.#stalledAfterMs = options.stalledAfterMs
    pool.on('connect', this.#onConnect)
  }

  /** Stops watching the pool's new connections. */
  close (): void {
    this.#pool.off('connect', this.#onConnect)
  }

  /**
   * True while the group being committed has waited longer than
   * stalledAfterMs for a connection or the database's answer: publishing
   * cannot commit now. It ends when the group settles (the pool's query
   * timeout bounds that).
   */
  get stalled (): boolean {
    return this.#sentAt !== undefined && performance.now() - this.#sentAt > this.#stalledAfterMs
  }

  /** Transactions committed (or attempted) so far, retries included. */
  get groups (): number {
    return this.#groups
  }

  /**
   * Publishes the events atomically, possibly in one transaction with other
   * publishes. Resolves with their ids, in order, once committed.
   */
  publish (events: readonly EventToPublish[]): Promise<string[]> {
    if (events.length === 0) return Promise.resolve([])
    let bytes = 0
    for (const e of events) bytes += Buffer.byteLength(e.payload)
    const published = new Promise<string[]>((resolve, reject) => {
      this.#waiting.push({ events, bytes, queuedAt: performance.now(), resolve, reject })
    })
    this.#startGroups()
    this.#watchOldest()
    // The promise itself, not an async wrapper: a caller's reactions are
    // queued when it settles, before drain() hears that the group is done.
    return published
  }

  /**
   * Publishes the events with an idempotency key (publishEvents): in a
   * transaction of their own, never grouped, since the key is claimed in
   * it. Rejects with IdempotencyConflictError for the same key with other
   * events. drain() waits for it as for a grouped publish.
   */
  publishIdempotent (events: readonly EventToPublish[], idempotency: IdempotencyKey): Promise<PublishResult> {
    const published = publishEvents(this.#pool, events, idempotency)
    this.#alone++
    const settled = (): void => {
      this.#alone--
      this.#settled()
    }
    published.then(settled, settled)
    return published
  }

  /** Resolves once every publish handed over so far has settled. */
  async drain (): Promise<void> {
    // A waiting publish means a group is committing (#startGroups starts
    // one whenever none is), so that flag alone tells whether a group is left.
    if (!this.#committing && this.#alone === 0) return
    await new Promise<void>((resolve) => this.#idle.push(resolve))
  }

  // Tells drain()'s waiters, once no group commits and no publish goes alone.
  #settled (): void {
    if (this.#committing || this.#alone > 0) return
    const idle = this.#idle
    this.#idle = []
    for (const resolve of idle) resolve()
  }

  // One group at a time: a second one would only wait in the database for
  // the first one's lock, and the publishes arriving meanwhile would make
  // two small groups instead of one large one (16 publishers straight on
  // the pool, on the machine of BENCHMARKS.md: 6,500 publishes/s with two
  // groups at a time, 12,600 with one).
  #startGroups (): void {
    if (this.#committing || this.#waiting.length === 0) return
    this.#committing = true
    const group = this.#takeGroup()
    this.#commitGroup(group).catch((err: unknown) => {
      // Not expected (#commitGroup settles every publish itself), but a
      // publish must never be left waiting, nor the publisher stuck.
      for (const pending of group) pending.reject(err)
    }).finally(() => {
      this.#committing = false
      this.#startGroups()
      this.#settled()
    })
  }

  // One timer, for the oldest waiting publish (the queue is in arrival
  // order): it fails those past maxWaitMs, then watches the next one.
  #watchOldest (): void {
    const oldest = this.#waiting[0]
    if (this.#expiryTimer !== undefined || oldest === undefined) return
    this.#expiryTimer = setTimeout(() => {
      this.#expiryTimer = undefined
      const now = performance.now()
      while (this.#waiting[0] !== undefined && now - this.#waiting[0].queuedAt >= this.#maxWaitMs) {
        this.#waiting.shift()?.reject(new PublishQueueTimeoutError(`waited ${this.#maxWaitMs} ms for the database`))
      }
      this.#watchOldest()
    }, Math.max(0, oldest.queuedAt + this.#maxWaitMs - performance.now()))
    this.#expiryTimer.unref()
  }

  // The longest run of waiting publishes, in arrival order, within the
  // limits; at least one.
  #takeGroup (): PendingPublish[] {
    let events = 0
    let bytes = 0
    let taken = 0
    for (const pending of this.#waiting) {
      if (taken > 0 && (events + pending.events.length > this.#maxEvents || bytes + pending.bytes > this.#maxBytes)) break
      events += pending.events.length
      bytes += pending.bytes
      taken++
    }
    return this.#waiting.splice(0, taken)
  }

  async #commitGroup (group: PendingPublish[]): Promise<void> {
    let ids: string[]
    try {
      this.#groups++
      this.#sentAt = performance.now()
      ids = await this.#send(group.flatMap((pending) => pending.events))
    } catch (err) {
      if (group.length > 1 && refusedAnEvent(err)) {
        const half = Math.ceil(group.length / 2)
        await this.#commitGroup(group.slice(0, half))
        await this.#commitGroup(group.slice(half))
        return
      }
      for (const pending of group) pending.reject(err)
      return
    } finally {
      this.#sentAt = undefined
    }
    let offset = 0
    for (const pending of group) {
      pending.resolve(ids.slice(offset, offset + pending.events.length))
      offset += pending.events.length
    }
  }

  // One statement on a connection of its own: its failure says whether
  // anything was sent, and a connection that did not answer is destroyed.
  async #send (events: EventToPublish[]): Promise<string[]> {
    let client: pg.PoolClient
    try {
      client = await this.#connect()
    } catch (err) {
      // The cause's message, for the log: the client's answer is the route's own.
      throw new PublishNotSentError(`no database connection (${(err as Error).message}): nothing was sent`, { cause: err })
    }
    try {
      const ids = await publishBatch(client, events)
      client.release()
      return ids
    } catch (err) {
      if (connectionAnswered(err)) {
        client.release()
      } else {
        this.#generation++
        // release(err) destroys the connection (pg-pool ends a client
        // released with an error; with a query still on it, pg destroys the
        // socket): its state is unknown.
        client.release(err as Error)
      }
      throw err
    }
  }

  // Records the generation a connection was opened in, and listens to its
  // errors once for its whole life: a connection error reaches the query,
  // and the client emits it too, and an 'error' event nobody listens to
  // would end the process.
  #adopt (client: pg.ClientBase, generation: number): void {
    this.#openedIn.set(client, generation)
    client.on('error', ignore)
  }

  // A pool connection opened since the last connection failure.
  async #connect (): Promise<pg.PoolClient> {
    for (;;) {
      const client = await this.#pool.connect()
      // Unknown: opened before this publisher watched; as old as the pool.
      if (!this.#openedIn.has(client)) this.#adopt(client, 0)
      if ((this.#openedIn.get(client) as number) >= this.#generation) return client
      client.release(new Error('opened before a connection failure'))
    }
  }
}
