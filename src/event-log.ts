import { createHmac, timingSafeEqual } from 'node:crypto'
import { readdirSync, readFileSync } from 'node:fs'
import pg from 'pg'
import { type EventId, parseEventId } from './event-id.js'

// The event log lives in its own schema; every gateway instance on a database
// shares it. Names starting with pg_ are reserved by PostgreSQL.
export const LOG_SCHEMA = 'sse_gateway'

// A notification payload must be shorter than 8000 bytes. Payloads up to this
// size travel inline in the NOTIFY; larger ones travel as a reference to
// their log row, which the listener reads. The migrations' append_checked
// writes the same number (test/event-log.test.ts holds them to it), as it
// does FORK_ID_GAP and MAX_EVENT_ID.
export const INLINE_PAYLOAD_BYTES = 7900

/*
 * The wire between a publishing transaction and every listener.
 *
 * An event published through the gateway (the POST routes or the SQL
 * functions sse_gateway.publish and publish_batch) is NOTIFYed on its own
 * channel with a payload that starts with the unit separator U+001F, its
 * decimal id, a colon and a MAC:
 *
 *   "\x1f<id>:<mac>\n<payload>"   the payload inline
 *   "\x1f<id>:<mac>"              the payload is in sse_gateway.events, row <id>
 *
 * Any role may NOTIFY any channel (PostgreSQL checks no privilege), so the
 * form alone proves nothing. The MAC is HMAC-SHA-256 (RFC 2104), cut to its
 * first 16 bytes, in hex, of "<id>\n<channel>\n<payload>" (inline) or
 * "<id>\n<channel>" (reference), all in UTF-8, keyed with the log's wire key:
 * a random key made with the log, in a table only its owner can read, used
 * by append_checked (SECURITY DEFINER) and read by the listener. A
 * notification whose MAC does not verify is a plain NOTIFY, delivered as is
 * without an id, whatever it looks like: it can move no position and replace
 * no payload. Because every gateway event carries its own id, two events
 * with the same channel and payload in one transaction stay two
 * notifications (PostgreSQL folds identical pairs).
 *
 * Ids follow commit order: the publishing transaction takes the advisory
 * lock ID_LOCK_KEY when it draws its ids, from the sequence
 * sse_gateway.event_ids, and keeps it until it ends. PostgreSQL releases a
 * transaction's locks after the transaction became visible to others, so a
 * transaction that draws later also commits later, and once an id is
 * visible every smaller one is committed or will never be: the head is the
 * largest committed id (sse_gateway.log_head_id()). Ids never go backwards
 * but may skip: a transaction that aborts after drawing (its commit failed
 * after the flush) leaves a hole, and so does a fork (FORK_ID_GAP). Neither
 * the lock nor the sequence reads through a snapshot, so drawing never
 * fails a REPEATABLE READ or SERIALIZABLE transaction (an UPDATE of a head
 * row did, until migration 007). It draws them as late as it can: a
 * publish from SQL stages its events, and a deferred constraint trigger
 * draws their ids, writes their log rows and NOTIFYs just before COMMIT
 * (migration 007), so that a transaction that publishes holds nothing that
 * blocks other publishers until it commits. The gateway's own publish (publishBatch) draws in a
 * one-statement transaction, which commits at once.
 */
export const WIRE_MARK = '\x1f'

// Hex digits of the MAC on the wire: 16 bytes.
const WIRE_MAC_HEX = 32

/**
 * Ids skipped when the log finds itself on a new PostgreSQL timeline (a
 * replica promoted, a point-in-time recovery): events the old primary
 * committed after the last one replicated are gone, and their ids would
 * otherwise be drawn again for other events. Drawing the next id this far
 * above the head instead, every id the old timeline may have handed out
 * lies in a hole the new one never fills, recorded in sse_gateway.log_forks:
 * a client or a listener that comes back with such an id is told what was
 * lost instead of silently skipping the new events. 10^12 is 115 days of
 * 100,000 events a second on a primary cut off from its replica, and leaves
 * room for 9,000 forks below MAX_EVENT_ID.
 */
export const FORK_ID_GAP = 1_000_000_000_000

/** A notification that verified as a gateway event; `data` is undefined when it must be read from the log. */
export interface WireEvent {
  id: EventId
  data: string | undefined
}

/** HMAC-SHA-256 of a wire message, cut to its first WIRE_MAC_HEX / 2 bytes. */
function wireMac (key: Buffer, id: string, channel: string, data: string | undefined): Buffer {
  const hmac = createHmac('sha256', key).update(id).update('\n').update(channel)
  if (data !== undefined) hmac.update('\n').update(data)
  return hmac.digest().subarray(0, WIRE_MAC_HEX / 2)
}

/**
 * Reads a notification received on `channel`. Returns the event when the
 * payload is in the wire form and its MAC verifies under `key`; null for
 * anything else (a plain NOTIFY, or one forged to look like an event).
 * Without a key (no log in this database) every notification is plain.
 */
export function decodeNotification (channel: string, payload: string, key: Buffer | undefined): WireEvent | null {
  if (key === undefined || !payload.startsWith(WIRE_MARK)) return null
  const newline = payload.indexOf('\n')
  const head = newline === -1 ? payload.slice(1) : payload.slice(1, newline)
  const colon = head.indexOf(':')
  if (colon === -1 || head.length - colon - 1 !== WIRE_MAC_HEX) return null
  const idText = head.slice(0, colon)
  const id = parseEventId(idText)
  if (id === undefined || id === 0) return null
  // Hex decoding stops at the first character that is not a hex digit: the
  // length check refuses such a MAC.
  const given = Buffer.from(head.slice(colon + 1), 'hex')
  if (given.length !== WIRE_MAC_HEX / 2) return null
  const data = newline === -1 ? undefined : payload.slice(newline + 1)
  if (!timingSafeEqual(given, wireMac(key, idText, channel, data))) return null
  return { id, data }
}

/** Makes a notification payload as the log's append_checked does (tests and tools). */
export function encodeNotification (key: Buffer, id: EventId, channel: string, data: string | undefined): string {
  const idText = String(id)
  const mac = wireMac(key, idText, channel, data).toString('hex')
  return `${WIRE_MARK}${idText}:${mac}${data === undefined ? '' : `\n${data}`}`
}

// The migrations, numbered .sql files in sql/migrations (001-log.sql, …):
// each runs once, in order, in its own transaction, and is recorded in
// sse_gateway.schema_version. Hand-written rather than a migration library:
// it is one schema owned by this program, migrated at start-up under an
// advisory lock so that instances starting together do not race. The files
// are history: a change is a new file. They are read relative to this
// module, which sits in src/ when run with tsx and in dist/ when built.
const MIGRATIONS_DIR = new URL('../sql/migrations/', import.meta.url)
const MIGRATION_FILE = /^(\d{3})-[a-z0-9-]+\.sql$/

function readMigrations (): readonly string[] {
  const files = readdirSync(MIGRATIONS_DIR).filter((f) => MIGRATION_FILE.test(f)).sort()
  files.forEach((file, i) => {
    if (Number(file.slice(0, 3)) !== i + 1) throw new Error(`sql/migrations: expected migration ${i + 1}, found ${file}`)
  })
  return files.map((file) => readFileSync(new URL(file, MIGRATIONS_DIR), 'utf8'))
}

const MIGRATIONS = readMigrations()

// The client-side bound (pg's query_timeout) for the statements that may
// run long on a large log: a migration that rebuilds an index, a prune of a
// large backlog. The pool's own bound (PG_QUERY_TIMEOUT_MS) is for short
// statements; this one still ends the wait on a connection gone silent.
const LONG_STATEMENT_TIMEOUT_MS = 30 * 60_000

// pg reads query_timeout from a query's config; its types leave it out.
function longStatement (text: string, values: unknown[] = []): pg.QueryConfig {
  return { text, values, query_timeout: LONG_STATEMENT_TIMEOUT_MS } as pg.QueryConfig
}

/** The schema version migrate() brings a database to. */
export const SCHEMA_VERSION = MIGRATIONS.length

// An arbitrary constant: the key of the advisory lock that serialises migrations.
const MIGRATION_LOCK_KEY = 0x5e5e_0001

/**
 * The key of the advisory lock a transaction takes to draw ids and holds
 * until it ends (the wire comment above). Written, in decimal, in the
 * migrations' append_checked; test/event-log.test.ts holds them to it.
 */
export const ID_LOCK_KEY = 0x5e5e_0003

/**
 * Creates or upgrades the log schema. Safe to run from many instances at
 * once. `toVersion` (tests only) stops at an older version.
 */
export async function migrate (client: pg.ClientBase, toVersion = SCHEMA_VERSION): Promise<void> {
  await client.query('BEGIN')
  try {
    // A migration may rebuild an index of a large log: no statement timeout.
    // But it must not queue forever behind a long transaction, with every
    // publish and replay of running instances queued behind it: it fails,
    // and the gateway with it, to be started again later.
    await client.query("SET LOCAL statement_timeout = 0; SET LOCAL lock_timeout = '10s'")
    await client.query('SELECT pg_advisory_xact_lock($1)', [MIGRATION_LOCK_KEY])
    await client.query(`CREATE SCHEMA IF NOT EXISTS ${LOG_SCHEMA}`)
    await client.query(`CREATE TABLE IF NOT EXISTS ${LOG_SCHEMA}.schema_version (version integer NOT NULL)`)
    const { rows } = await client.query<{ version: number | null }>(`SELECT max(version) AS version FROM ${LOG_SCHEMA}.schema_version`)
    const applied = rows[0]?.version ?? 0
    for (let version = applied + 1; version <= toVersion; version++) {
      await client.query(longStatement(MIGRATIONS[version - 1] as string))
      await client.query(`INSERT INTO ${LOG_SCHEMA}.schema_version (version) VALUES ($1)`, [version])
    }
    await client.query('COMMIT')
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {})
    throw err
  }
}

/** What the log's SQL side takes from the gateway's configuration. */
export interface LogSettings {
  /** MAX_PAYLOAD_BYTES: a captured row whose event would be larger is sent as its primary key, `"truncated": true`. */
  maxPayloadBytes: number
}

/**
 * Writes the settings into the log (sse_gateway.settings), where the row
 * capture triggers read them; writes nothing when they are already there.
 * Every instance on a database should be configured alike: the last one
 * started wins.
 */
export async function recordSettings (client: pg.ClientBase, settings: LogSettings): Promise<void> {
  await client.query(
    `UPDATE ${LOG_SCHEMA}.settings SET max_payload_bytes = $1 WHERE max_payload_bytes IS DISTINCT FROM $1`,
    [settings.maxPayloadBytes]
  )
}

/**
 * Whether a failed statement was answered by the server, on a connection
 * that can serve again: a SQLSTATE error, but for a connection exception
 * (class 08) or the server ending the session (57P01 and kin). Any other
 * failure (a reset, a query timeout on a silent connection) leaves the
 * connection's state unknown: it must be destroyed, never reused, and a
 * ROLLBACK on it would only wait.
 */
export function connectionAnswered (err: unknown): boolean {
  return err instanceof pg.DatabaseError && !/^(08|57P)/.test(err.code ?? '')
}

export interface EventToPublish {
  channel: string
  payload: string
}

export interface IdempotencyKey {
  /** The key, already scoped to its client. */
  key: string
  /** A digest of the request: the same key with another request is refused. */
  requestHash: string
}

export interface PublishResult {
  ids: string[]
  /** True when the key had been used: the ids are the first request's, nothing was published. */
  replayed: boolean
}

export class IdempotencyConflictError extends Error {
  override name = 'IdempotencyConflictError'
}

/**
 * Publishes events in one statement, hence in one implicit transaction that
 * commits before the database answers: one round trip, and no lock held
 * while an answer travels to the gateway and a COMMIT travels back.
 * Resolves with their ids, in order, once committed. It draws the ids in
 * the statement (publish_batch_now), so that it can answer with them: the
 * log's lock is held from there to the commit, which follows at once (or,
 * in publishEvents' keyed transaction, after one more statement).
 */
export async function publishBatch (db: pg.Pool | pg.ClientBase, events: readonly EventToPublish[]): Promise<string[]> {
  if (events.length === 0) return []
  // Not a named statement: those break behind PgBouncer's transaction
  // pooling, and measured no faster here.
  const { rows } = await db.query<{ ids: string[] }>(
    `SELECT ${LOG_SCHEMA}.publish_batch_now($1::text[], $2::text[])::text[] AS ids`,
    [events.map((e) => e.channel), events.map((e) => e.payload)]
  )
  return rows[0]?.ids ?? []
}

/**
 * Publishes events atomically: one transaction writes their log rows and
 * NOTIFYs them; either all are delivered or none is. Resolves with their ids,
 * in order, once COMMIT has succeeded. With an idempotency key, a repeat of
 * the request returns the first ids and publishes nothing; a concurrent
 * repeat waits on the key's row until the first commits or rolls back.
 */
export async function publishEvents (pool: pg.Pool, events: readonly EventToPublish[], idempotency?: IdempotencyKey): Promise<PublishResult> {
  if (idempotency === undefined) return { ids: await publishBatch(pool, events), replayed: false }
  const client = await pool.connect()
  let failed: unknown
  try {
    await client.query('BEGIN')
    const claimed = await client.query(
      `INSERT INTO ${LOG_SCHEMA}.idempotency_keys (key, request_hash, ids) VALUES ($1, $2, '{}') ON CONFLICT (key) DO NOTHING`,
      [idempotency.key, idempotency.requestHash]
    )
    if (claimed.rowCount === 0) {
      const { rows } = await client.query<{ ids: string[], request_hash: string }>(
        `SELECT ids::text[] AS ids, request_hash FROM ${LOG_SCHEMA}.idempotency_keys WHERE key = $1`,
        [idempotency.key]
      )
      await client.query('COMMIT')
      const row = rows[0]
      if (row === undefined || row.request_hash !== idempotency.requestHash) {
        throw new IdempotencyConflictError('this Idempotency-Key was used for another request')
      }
      return { ids: row.ids, replayed: true }
    }
    const ids = await publishBatch(client, events)
    await client.query(`UPDATE ${LOG_SCHEMA}.idempotency_keys SET ids = $2::bigint[] WHERE key = $1`, [idempotency.key, ids])
    await client.query('COMMIT')
    return { ids, replayed: false }
  } catch (err) {
    if (err instanceof IdempotencyConflictError) throw err
    failed = err
    // Only a connection on which the server answered can take a ROLLBACK;
    // on one that went silent it would wait out another query timeout. The
    // connection is destroyed below, and the server ends the transaction.
    if (connectionAnswered(err)) await client.query('ROLLBACK').catch(() => {})
    throw err
  } finally {
    // A client whose connection broke must not go back to the pool.
    client.release(failed instanceof Error && !connectionAnswered(failed) ? failed : undefined)
  }
}

export interface LoggedEvent {
  id: string
  channel: string
  payload: string
}

/** Reads events by id, in id order. */
export async function readEvents (client: pg.ClientBase, ids: readonly string[]): Promise<LoggedEvent[]> {
  // ORDER BY events.id, not id: a bare name means the output column, the
  // text id::text, which sorts "10" before "9".
  const { rows } = await client.query<LoggedEvent>(
    `SELECT id::text AS id, channel, payload FROM ${LOG_SCHEMA}.events WHERE id = ANY($1::bigint[]) ORDER BY events.id`,
    [ids]
  )
  return rows
}

export interface LogBounds {
  /** The id of the last committed event. */
  head: EventId
  /** Events up to this id have been pruned. */
  prunedThrough: EventId
  /**
   * Set when the id asked about lies in the hole of a fork (FORK_ID_GAP): it
   * was drawn on a timeline the log no longer follows, and this is the last
   * id that the log kept from before the fork.
   */
  forkedAfter: EventId | undefined
}

function boundsOf (row: { head: string | null, pruned_through: string | null, forked_after: string | null } | undefined): LogBounds {
  return {
    head: Number(row?.head ?? 0),
    prunedThrough: Number(row?.pruned_through ?? 0),
    forkedAfter: row?.forked_after == null ? undefined : Number(row.forked_after)
  }
}

const BOUNDS_COLUMNS = `${LOG_SCHEMA}.log_head_id()::text AS head,
  (SELECT pruned_through FROM ${LOG_SCHEMA}.log_retention)::text AS pruned_through,
  (SELECT max(fork_id) FROM ${LOG_SCHEMA}.log_forks WHERE fork_id < $1 AND resumed_after >= $1)::text AS forked_after`

/** The log's head and retention, and whether `id` (default 0) lies in a fork's hole; one snapshot. */
export async function readLogBounds (client: pg.ClientBase | pg.Pool, id: EventId = 0): Promise<LogBounds> {
  const { rows } = await client.query<{ head: string, pruned_through: string, forked_after: string | null }>(`SELECT ${BOUNDS_COLUMNS}`, [id])
  return boundsOf(rows[0])
}

/** What a listener reads on each (re)connect: the log's bounds as seen from its position, and the wire key. */
export interface ListenerStart extends LogBounds {
  /** The wire key; undefined when the database holds no log (yet). */
  wireKey: Buffer | undefined
}

// 42P01: undefined_table; 3F000: invalid_schema_name, 42883:
// undefined_function (log_head_id). A listener may run on a database the
// gateway has not migrated (yet): it then has no log to read.
const MISSING_LOG = new Set(['42P01', '3F000', '42883'])
function isMissingTable (err: unknown): boolean {
  return MISSING_LOG.has((err as { code?: unknown }).code as string)
}

/** Reads the log's bounds from `position` and the wire key, in one statement. */
export async function readListenerStart (client: pg.ClientBase, position: EventId): Promise<ListenerStart> {
  try {
    const { rows } = await client.query<{ head: string, pruned_through: string, forked_after: string | null, key: Buffer }>(
      `SELECT ${BOUNDS_COLUMNS}, (SELECT key FROM ${LOG_SCHEMA}.wire_key) AS key`,
      [position]
    )
    return { ...boundsOf(rows[0]), wireKey: rows[0]?.key ?? undefined }
  } catch (err) {
    if (isMissingTable(err)) return { head: 0, prunedThrough: 0, forkedAfter: undefined, wireKey: undefined }
    throw err
  }
}

/**
 * Up to `limit` events on the channels after an id, in id order, together with how far the log was pruned, both
 * read in one statement, hence one snapshot: a replay can tell that
 * retention deleted events after its position while it read (after it had
 * read the log's bounds, or between two pages), instead of skipping them
 * unannounced.
 */
export async function readReplayPage (client: pg.ClientBase | pg.Pool, channels: readonly string[], afterId: number, limit: number): Promise<{ prunedThrough: number, events: LoggedEvent[] }> {
  const { rows } = await client.query<{ pruned_through: string, id: string | null, channel: string, payload: string }>(
    `SELECT r.pruned_through::text AS pruned_through, e.id::text AS id, e.channel, e.payload
     FROM ${LOG_SCHEMA}.log_retention r
     LEFT JOIN LATERAL (
       SELECT events.id, events.channel, events.payload FROM ${LOG_SCHEMA}.events
       WHERE events.channel = ANY($1::text[]) AND events.id > $2 ORDER BY events.id LIMIT $3
     ) e ON true
     ORDER BY e.id`,
    [channels, afterId, limit]
  )
  return {
    prunedThrough: Number(rows[0]?.pruned_through ?? 0),
    events: rows.filter((r) => r.id !== null).map((r) => ({ id: r.id as string, channel: r.channel, payload: r.payload }))
  }
}

export interface RetentionPolicy {
  /** Events older than this are pruned. */
  maxAgeSeconds: number
  /** At most this many of the newest events are kept. */
  maxEvents: number
  /** Idempotency keys are remembered this long. */
  idempotencyWindowSeconds: number
}

// An arbitrary constant: the key of the advisory lock held by the instance pruning.
const PRUNE_LOCK_KEY = 0x5e5e_0002

/**
 * Deletes events past the retention policy and old idempotency keys, and
 * records how far the log is pruned. One instance at a time does it; the
 * others skip. Resolves with the number of events deleted.
 */
export async function pruneLog (pool: pg.Pool, policy: RetentionPolicy): Promise<number> {
  const client = await pool.connect()
  try {
    await client.query('BEGIN')
    // Deleting a large backlog may take longer than the pool's statement timeout.
    await client.query('SET LOCAL statement_timeout = 0')
    const { rows: [lock] } = await client.query<{ locked: boolean }>('SELECT pg_try_advisory_xact_lock($1) AS locked', [PRUNE_LOCK_KEY])
    if (lock?.locked !== true) {
      await client.query('ROLLBACK')
      return 0
    }
    const { rows: [cut] } = await client.query<{ through: string }>(
      `SELECT greatest(
         (SELECT pruned_through FROM ${LOG_SCHEMA}.log_retention),
         ${LOG_SCHEMA}.log_head_id() - $2,
         coalesce((SELECT max(id) FROM ${LOG_SCHEMA}.events WHERE created_at < now() - make_interval(secs => $1)), 0)
       ) AS through`,
      [policy.maxAgeSeconds, policy.maxEvents]
    )
    const through = cut?.through ?? '0'
    const deleted = await client.query(longStatement(`DELETE FROM ${LOG_SCHEMA}.events WHERE id <= $1`, [through]))
    await client.query(`UPDATE ${LOG_SCHEMA}.log_retention SET pruned_through = $1 WHERE pruned_through < $1`, [through])
    await client.query(`DELETE FROM ${LOG_SCHEMA}.idempotency_keys WHERE created_at < now() - make_interval(secs => $1)`, [policy.idempotencyWindowSeconds])
    await client.query('COMMIT')
    return deleted.rowCount ?? 0
  } catch (err) {
    await client.query('ROLLBACK').catch(() => {})
    throw err
  } finally {
    client.release()
  }
}
