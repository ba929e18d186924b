import { randomBytes } from 'node:crypto'
import type { AddressInfo } from 'node:net'
import { createParser, type EventSourceMessage } from 'eventsource-parser'
import type { FastifyInstance } from 'fastify'
import pg from 'pg'
import { build } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import type { GatewayClaims } from '../src/plugins/auth.js'

// The test runner (test/run.ts) sets DATABASE_URL, to the local server or an
// embedded one; every test file works in a database of its own.
export const ADMIN_URL = process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres'
export const JWT_SECRET = 'test-secret-that-is-at-least-32-bytes-long'

interface Teardown {
  teardown (fn: () => unknown): void
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
  #waiters: Array<() => void> = []
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
        this.#wake()
      },
      onRetry: (ms) => { this.retry = ms; this.#wake() },
      onComment: (c) => { this.comments.push(c); this.#wake() }
    })
    this.done = (async () => {
      const decoder = new TextDecoder()
      try {
        for await (const chunk of response.body as AsyncIterable<Uint8Array>) parser.feed(decoder.decode(chunk, { stream: true }))
      } catch {}
      this.#ended = true
      this.#wake()
    })()
  }

  get ended (): boolean {
    return this.#ended
  }

  #wake (): void {
    const waiters = this.#waiters
    this.#waiters = []
    for (const w of waiters) w()
  }

  /** Resolves once `predicate` holds; rejects if the stream ends first. */
  async until (predicate: () => boolean, what = 'condition'): Promise<void> {
    while (!predicate()) {
      if (this.#ended) throw new Error(`stream ended before ${what}`)
      await new Promise<void>((resolve) => this.#waiters.push(resolve))
    }
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

/** Polls a condition on state nothing announces, until it holds or the deadline passes. */
export async function waitFor (condition: () => boolean, what: string, ms = 5000): Promise<void> {
  const deadline = Date.now() + ms
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 5))
  }
}

/** Polls an async condition (a query, a request) until it holds or the deadline passes. */
export async function eventually (condition: () => Promise<boolean>, what: string, ms = 10_000): Promise<void> {
  const deadline = Date.now() + ms
  while (!await condition()) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`)
    await new Promise((resolve) => setTimeout(resolve, 20))
  }
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

/** A subtest's `t`. */
export type Test = Parameters<Parameters<typeof import('tap').default.test>[0]>[0]

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

/** A seeded generator (mulberry32) of numbers in [0, 1): a failing run can be replayed with its seed. */
// Notifications as a plain LISTENing client sees them, with a way to wait for
// a condition on them instead of sleeping.
export class Inbox {
  readonly messages: pg.Notification[] = []
  #waiters: Array<() => void> = []

  constructor (client: pg.Client) {
    client.on('notification', (m) => {
      this.messages.push(m)
      const waiters = this.#waiters
      this.#waiters = []
      for (const w of waiters) w()
    })
  }

  payloads (channel: string): string[] {
    return this.messages.filter((m) => m.channel === channel).map((m) => m.payload ?? '')
  }

  /** Resolves once `predicate` holds; rejects after 10 s so a failure names what was missing. */
  async until (predicate: () => boolean, what: string): Promise<void> {
    const deadline = Date.now() + 10_000
    while (!predicate()) {
      const left = deadline - Date.now()
      if (left <= 0) throw new Error(`timed out waiting for ${what}; got ${JSON.stringify(this.messages.map((m) => [m.channel, m.payload]))}`)
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left)
        this.#waiters.push(() => { clearTimeout(timer); resolve() })
      })
    }
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

export function seededRandom (seed: number): () => number {
  let a = seed >>> 0
  return () => {
    a = (a + 0x6d2b79f5) >>> 0
    let x = Math.imul(a ^ (a >>> 15), 1 | a)
    x = (x + Math.imul(x ^ (x >>> 7), 61 | x)) ^ x
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296
  }
}
