import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import { createParser, type EventSourceMessage } from 'eventsource-parser'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { build } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { ID_LOCK_KEY } from '../src/event-log.js'
import type { GatewayClaims } from '../src/plugins/auth.js'

// The test runner (test/run.ts) sets DATABASE_URL, to the local server or an
// embedded one; every test file works in a database of its own.
export const ADMIN_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'
export const JWT_SECRET = 'test-secret-that-is-at-least-32-bytes-long'

/** What a resource needs to be torn down: a subtest's `t`, or the file's own. */
export interface Teardown {
  teardown (fn: () => unknown): void
}

/** A subtest's `t`. */
export type Test = Parameters<Parameters<typeof import('tap').default.test>[0]>[0]

/** How long `Signal.until` waits, and what it reports when it gives up. */
export interface UntilOptions {
  /** Give up after this many ms (10 s); Infinity leaves the bound to the caller (`within`). */
  ms?: number
  /** Holds once nothing more can come (a stream ended): fail now, not at the deadline. */
  ended?: () => boolean
  /** What arrived, named in the timeout's error. */
  got?: () => string
}

/**
 * Wakes whoever waits for a condition on state that changes by events (a
 * stream's events, notifications, writes to a sink), instead of polling or
 * sleeping: whatever changes that state calls `wake()`.
 */
export class Signal {
  #waiters: Array<() => void> = []

  wake (): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }

  /** Resolves once `predicate` holds; rejects after `options.ms`, or once `options.ended` holds. */
  async until (predicate: () => boolean, what: string, { ms = 10_000, ended, got }: UntilOptions = {}): Promise<void> {
    const deadline = Date.now() + ms
    while (!predicate()) {
      if (ended?.() === true) throw new Error(`stream ended before ${what}`)
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`timed out waiting for ${what}${got === undefined ? '' : `; got ${got()}`}`)
      await new Promise<void>((resolve) => {
        const timer = Number.isFinite(left) ? setTimeout(resolve, left) : undefined
        this.#waiters.push(() => { clearTimeout(timer); resolve() })
      })
    }
  }
}

function databaseUrl (name: string): string {
  const url = new URL(ADMIN_URL)
  url.pathname = `/${name}`
  return url.toString()
}

/** A fresh, empty database, dropped when the test ends. */
export async function createDatabase (t: Teardown): Promise<string> {
  const name = `pgsse_test_${process.pid}_${randomBytes(4).toString('hex')}`
  const admin = new pg.Client({ connectionString: ADMIN_URL })
  await admin.connect()
  try {
    await admin.query(`CREATE DATABASE ${name}`)
  } finally {
    await admin.end()
  }
  t.teardown(async () => {
    const client = new pg.Client({ connectionString: ADMIN_URL })
    await client.connect()
    await client.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await client.end()
  })
  return databaseUrl(name)
}

/** A client on the test database, ended when the test ends. */
export async function connect (t: Teardown, connectionString: string): Promise<pg.Client> {
  const client = new pg.Client({ connectionString })
  await client.connect()
  t.teardown(() => client.end())
  return client
}

/**
 * Opens a transaction on `db` that holds the lock every draw of ids takes
 * (ID_LOCK_KEY): publishes wait on it (pg_stat_activity shows a Lock wait)
 * until `db` commits or rolls back.
 */
export async function holdIdLock (db: pg.ClientBase): Promise<void> {
  await db.query('BEGIN')
  await db.query('SELECT pg_advisory_xact_lock($1)', [ID_LOCK_KEY])
}

/** The head of the log: the last committed id, as text. */
export async function logHeadId (db: pg.ClientBase): Promise<string> {
  const { rows } = await db.query<{ id: string }>('SELECT sse_gateway.log_head_id()::text AS id')
  return (rows[0] as { id: string }).id
}

/**
 * Moves the log's next id: the next draw is `last + 1` (tests only; the
 * sequence is not rolled back with a transaction).
 */
export async function setLastDrawnId (db: pg.ClientBase, last: number | string): Promise<void> {
  await db.query("SELECT setval('sse_gateway.event_ids', $1)", [last])
}

/**
 * Makes COMMIT fail for events with this payload, with a deferred constraint
 * trigger that raises (SQLSTATE P0001): a real commit-time failure, as a
 * full NOTIFY queue or a lost server would give. Resolves with its undo.
 */
export async function refuseAtCommit (db: pg.ClientBase, payload: string): Promise<() => Promise<void>> {
  await db.query(`
    CREATE FUNCTION refuse_at_commit() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF NEW.payload = ${db.escapeLiteral(payload)} THEN RAISE EXCEPTION 'refused at commit'; END IF;
      RETURN NULL;
    END $$;
    CREATE CONSTRAINT TRIGGER refuse_at_commit AFTER INSERT ON sse_gateway.events
      DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION refuse_at_commit();
  `)
  return async () => { await db.query('DROP TRIGGER refuse_at_commit ON sse_gateway.events; DROP FUNCTION refuse_at_commit()') }
}

export interface TestGateway {
  app: FastifyInstance
  baseUrl: string
  databaseUrl: string
  token (claims: GatewayClaims, options?: { expiresIn?: string | number }): string
}

/**
 * A gateway on a fresh database, listening on a port from the OS, closed
 * when the test ends. `env` overrides configuration variables.
 */
export async function startGateway (t: Teardown, env: Record<string, string> = {}, database?: string): Promise<TestGateway> {
  const url = database ?? await createDatabase(t)
  const config = loadConfig({ JWT_SECRET, LOG_LEVEL: 'silent', ...env, DATABASE_URL: url }, false)
  const app = await build({ ...config, DATABASE_URL: url, JWT_SECRET: config.JWT_SECRET ?? JWT_SECRET })
  t.teardown(() => app.close())
  await app.listen({ host: '127.0.0.1', port: 0 })
  const { port } = app.server.address() as AddressInfo
  return {
    app,
    baseUrl: `http://127.0.0.1:${port}`,
    databaseUrl: url,
    token: (claims, options) => app.jwt.sign(claims, options)
  }
}

export interface ReceivedEvent {
  id: string | undefined
  event: string | undefined
  data: string
}

/** A real SSE client: fetch and a spec-following parser. */
export class StreamClient {
  readonly response: Response
  /** Events of channels. */
  readonly events: ReceivedEvent[] = []
  /** Events of the gateway itself (`gateway/open`, `gateway/missed`, `gateway/gap`). */
  readonly control: ReceivedEvent[] = []
  /** Both, in the order they came. */
  readonly arrived: ReceivedEvent[] = []
  readonly comments: string[] = []
  retry: number | undefined
  readonly #abort: AbortController
  readonly #signal = new Signal()
  #ended = false
  readonly done: Promise<void>

  constructor (response: Response, abort: AbortController) {
    this.response = response
    this.#abort = abort
    const parser = createParser({
      onEvent: (e: EventSourceMessage) => {
        const received = { id: e.id, event: e.event, data: e.data };
        (e.event?.startsWith('gateway/') === true ? this.control : this.events).push(received)
        this.arrived.push(received)
        this.#signal.wake()
      },
      onRetry: (ms) => { this.retry = ms; this.#signal.wake() },
      onComment: (c) => { this.comments.push(c); this.#signal.wake() }
    })
    this.done = (async () => {
      const decoder = new TextDecoder()
      try {
        for await (const chunk of response.body as AsyncIterable<Uint8Array>) parser.feed(decoder.decode(chunk, { stream: true }))
      } catch {}
      this.#ended = true
      this.#signal.wake()
    })()
  }

  get ended (): boolean {
    return this.#ended
  }

  /** Resolves once `predicate` holds; rejects if the stream ends first. Unbounded: wrap it in `within`. */
  async until (predicate: () => boolean, what = 'condition'): Promise<void> {
    await this.#signal.until(predicate, what, { ms: Infinity, ended: () => this.#ended })
  }

  /** Waits for `n` events in all and returns them. */
  async take (n: number): Promise<ReceivedEvent[]> {
    await this.until(() => this.events.length >= n, `${n} events (got ${this.events.length})`)
    return this.events.slice(0, n)
  }

  close (): void {
    this.#abort.abort()
  }
}

/** Opens a stream; resolves with the response once its headers arrived. */
export async function openStream (t: Teardown, url: string, headers: Record<string, string> = {}): Promise<StreamClient> {
  const abort = new AbortController()
  const response = await fetch(url, { headers, signal: abort.signal })
  const client = new StreamClient(response, abort)
  t.teardown(async () => {
    client.close()
    await client.done
  })
  return client
}

export function streamUrl (baseUrl: string, channels: string[], query: Record<string, string> = {}): string {
  const url = new URL('/events', baseUrl)
  for (const c of channels) url.searchParams.append('channel', c)
  for (const [k, v] of Object.entries(query)) url.searchParams.set(k, v)
  return url.toString()
}

/** POSTs a payload to /channels/:channel. */
export async function publish (gateway: TestGateway, channel: string, body: string, options: { token?: string, contentType?: string } = {}): Promise<Response> {
  return await fetch(`${gateway.baseUrl}/channels/${encodeURIComponent(channel)}`, {
    method: 'POST',
    headers: {
      'content-type': options.contentType ?? 'text/plain',
      authorization: `Bearer ${options.token ?? gateway.token({ publish: ['*'] })}`
    },
    body
  })
}

/** Bounds a wait: a missing event fails the test in seconds, not at the file's timeout. */
export async function within<T> (promise: Promise<T>, what: string, ms = 5000): Promise<T> {
  promise.catch(() => {})
  let timer: NodeJS.Timeout | undefined
  const timeout = new Promise<never>((_resolve, reject) => {
    timer = setTimeout(() => reject(new Error(`timed out waiting for ${what}`)), ms)
  })
  try {
    return await Promise.race([promise, timeout])
  } finally {
    clearTimeout(timer)
  }
}

/**
 * Polls a condition on state nothing announces (a getter, a query, a
 * request) until it holds; rejects after `ms` naming `what`, or with the
 * condition's own error. A condition that answers with a promise (a round
 * trip) is polled every 20 ms, a plain one every 5 ms.
 */
export async function waitFor (condition: () => boolean | Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms
  for (;;) {
    const answer = condition()
    if (typeof answer === 'boolean' ? answer : await answer) return
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, typeof answer === 'boolean' ? 5 : 20))
  }
}

/** The application_name of the gateway's publishing pool (src/app.ts). */
export const POOL_APPLICATION_NAME = 'pg-sse-gateway:pool'

/** A backend of the gateway's pool, as pg_stat_activity shows it. */
export interface PoolBackend {
  pid: number
  /** The client's port as the server sees it (a proxy's, behind test/tcp-proxy.ts). */
  clientPort: number
}

/** Resolves, with them, once backends of the gateway's pool wait on a lock: a wait nothing announces. */
export async function poolWaitingOnLock (db: pg.ClientBase): Promise<PoolBackend[]> {
  let waiting: PoolBackend[] = []
  await waitFor(async () => {
    const { rows } = await db.query<{ pid: number, client_port: number }>(
      `SELECT pid, client_port FROM pg_stat_activity
       WHERE datname = current_database() AND application_name = $1 AND wait_event_type = 'Lock'`, [POOL_APPLICATION_NAME])
    waiting = rows.map((r) => ({ pid: r.pid, clientPort: r.client_port }))
    return waiting.length > 0
  }, 'a publish to wait on a lock')
  return waiting
}

/**
 * Publishes with sse_gateway.publish in a transaction of its own (the
 * client must not be in one) and resolves with the event's id, which is
 * drawn at commit: sse_gateway.published_ids() tells it afterwards.
 */
export async function publishedWithSql (db: pg.ClientBase, channel: string, payload: string): Promise<string> {
  await db.query('SELECT sse_gateway.publish($1, $2)', [channel, payload])
  const { rows } = await db.query<{ ids: string[] }>('SELECT sse_gateway.published_ids()::text[] AS ids')
  return rows[0]?.ids[0] as string
}

/** The status GET /readyz answers now. */
export async function readyStatus (gateway: TestGateway): Promise<number> {
  const res = await fetch(`${gateway.baseUrl}/readyz`)
  await res.body?.cancel()
  return res.status
}

/** Payloads and what a client must read of them: line breaks as LF, the rest exact. */
export const FRAMING_CASES: ReadonlyArray<readonly [string, string]> = [
  ['plain', 'plain'],
  ['', ''],
  ['two\nlines', 'two\nlines'],
  ['crlf\r\nline', 'crlf\nline'],
  ['lone\rcr', 'lone\ncr'],
  ['\n', '\n'],
  ['\r\n\r\n', '\n\n'],
  ['trailing\n', 'trailing\n'],
  ['  leading spaces', '  leading spaces'],
  [' one space', ' one space'],
  ['data: looks like a field', 'data: looks like a field'],
  [':colon first', ':colon first'],
  ['id: 99\nevent: spoof', 'id: 99\nevent: spoof'],
  ['ünïcödé ✓ 🚀', 'ünïcödé ✓ 🚀'],
  ['\u001fnot an id', '\u001fnot an id'],
  ['{"json":\n  "pretty"}', '{"json":\n  "pretty"}']
]

/** Headers of a subscriber allowed `patterns` (every channel by default). */
export function subscriber (gateway: TestGateway, patterns: string[] = ['*']): Record<string, string> {
  return { authorization: `Bearer ${gateway.token({ subscribe: patterns })}` }
}

/** POSTs a text payload and resolves with its id; any answer but 201 throws. */
export async function published (gateway: TestGateway, channel: string, body: string): Promise<string> {
  const res = await publish(gateway, channel, body)
  if (res.status !== 201) throw new Error(`publish to ${channel} answered ${res.status}: ${await res.text()}`)
  return ((await res.json()) as { id: string }).id
}

/** Publishes a batch through POST /events; resolves with the ids. */
export async function publishedBatch (gateway: TestGateway, events: Array<{ channel: string, data: unknown }>): Promise<string[]> {
  const res = await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${gateway.token({ publish: ['*'] })}` },
    body: JSON.stringify({ events })
  })
  if (res.status !== 201) throw new Error(`batch answered ${res.status}: ${await res.text()}`)
  return ((await res.json()) as { ids: string[] }).ids
}

/** Waits for the event whose data is `data` on the stream. */
export async function waitForData (stream: StreamClient, data: string, ms = 10_000): Promise<void> {
  await within(stream.until(() => stream.events.some((e) => e.data === data), data), JSON.stringify(data), ms)
}

/** Checks a JSON error answer: the status and a {statusCode, error, message} body. */
export async function errorBody (t: Test, res: Response, statusCode: number): Promise<Record<string, unknown>> {
  t.equal(res.status, statusCode, `answers ${statusCode}`)
  t.match(res.headers.get('content-type'), /^application\/json/)
  const body = await res.json() as Record<string, unknown>
  t.same(Object.keys(body).sort(), ['error', 'message', 'statusCode'], 'error body is {statusCode, error, message}')
  t.match(body, { statusCode, error: /./, message: /./ })
  return body
}

// Notifications as a plain LISTENing client sees them, with a way to wait for
// a condition on them instead of sleeping.
export class Inbox {
  readonly messages: pg.Notification[] = []
  readonly #signal = new Signal()

  constructor (client: pg.Client) {
    client.on('notification', (m) => {
      this.messages.push(m)
      this.#signal.wake()
    })
  }

  payloads (channel: string): string[] {
    return this.messages.filter((m) => m.channel === channel).map((m) => m.payload ?? '')
  }

  /** Resolves once `predicate` holds; rejects after 10 s so a failure names what was missing. */
  async until (predicate: () => boolean, what: string): Promise<void> {
    await this.#signal.until(predicate, what, { got: () => JSON.stringify(this.messages.map((m) => [m.channel, m.payload])) })
  }
}

/** The log's wire key (src/event-log.ts), to make or read gateway notifications. */
export async function readWireKey (db: pg.ClientBase): Promise<Buffer> {
  const { rows } = await db.query<{ key: Buffer }>('SELECT key FROM sse_gateway.wire_key')
  return rows[0]?.key as Buffer
}

/** A plain client LISTENing on the channels, ended when the test ends. */
export async function listenOn (t: Teardown, url: string, ...channels: string[]): Promise<Inbox> {
  const client = await connect(t, url)
  const inbox = new Inbox(client)
  for (const c of channels) await client.query(`LISTEN ${client.escapeIdentifier(c)}`)
  return inbox
}

/** Event ids that follow each other with no gap. */
export function consecutive (ids: readonly string[]): boolean {
  return ids.every((id, i) => i === 0 || BigInt(id) === BigInt(ids[i - 1] as string) + 1n)
}

/** A seeded generator (mulberry32) of numbers in [0, 1): a failing run can be replayed with its seed. */
export function seededRandom (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = Math.imul(a ^ (a >>> 15), 1 | a)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}
