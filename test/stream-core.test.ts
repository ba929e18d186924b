// The stream core without HTTP: a real database, a real listener and hub,
// and a writer that records what a client would receive.
import pg from 'pg'
import t from 'tap'
import { migrate, pruneLog, publishBatch } from '../src/event-log.js'
import type { FrameWriter } from '../src/event-stream.js'
import { ChannelHub, type EventSelector } from '../src/hub.js'
import { ListenerConnection } from '../src/listener.js'
import { type PreparedStream, StreamCore, type StreamDialect, type StreamRequest } from '../src/stream-core.js'
import { createDatabase, connect, waitFor } from './helper.js'

/** What a client would receive, as parsed frames. */
class RecordingWriter implements FrameWriter {
  readonly text: string[] = []
  ended = false
  cutOffWith: number | undefined

  write (frame: Buffer): void {
    if (!this.ended) this.text.push(frame.toString())
  }

  writeNow (frame: Buffer): boolean {
    this.write(frame)
    return true
  }

  async drained (): Promise<void> {}

  async end (): Promise<void> {
    this.ended = true
  }

  cutOff (dropped: number): void {
    this.cutOffWith = dropped
    this.ended = true
  }

  /** The events received, as [id, event, data]. */
  get events (): Array<[string | undefined, string | undefined, string]> {
    return this.text.join('').split('\n\n').filter((block) => block !== '' && !block.startsWith(':') && !block.startsWith('retry:')).map((block) => {
      const fields = new Map(block.split('\n').map((line) => [line.slice(0, line.indexOf(':')), line.slice(line.indexOf(':') + 2)]))
      return [fields.get('id'), fields.get('event'), fields.get('data') ?? '']
    })
  }
}

const url = await createDatabase(t)
const db = await connect(t, url)
await migrate(db)
const pool = new pg.Pool({ connectionString: url, max: 4 })
t.teardown(() => pool.end())
const listener = new ListenerConnection({ connectionString: url })
await listener.connect()
t.teardown(() => listener.close())
const hub = new ChannelHub(listener)
listener.on('event', (event) => hub.deliver(event))
const core = new StreamCore({ hub, log: pool, maxHeldBytes: 64 * 1024, retryMs: 1000 })
t.teardown(() => core.endAll())

async function publish (channel: string, ...payloads: string[]): Promise<string[]> {
  return await publishBatch(pool, payloads.map((payload) => ({ channel, payload })))
}

async function stream (request: Partial<StreamRequest> & { channels: string[] }): Promise<{ writer: RecordingWriter, prepared: PreparedStream }> {
  const writer = new RecordingWriter()
  const prepared = await core.prepare(writer, { resumeFrom: undefined, expiresAt: undefined, ...request })
  t.teardown(() => core.close(prepared))
  return { writer, prepared }
}

const open = (writer: RecordingWriter) => (preamble: string): void => { writer.text.push(preamble) }

t.test('a new stream starts at the head, and live events held during set-up follow gateway/open', async (t) => {
  const [before] = await publish('fresh', 'before')
  const { writer, prepared } = await stream({ channels: ['fresh'] })
  t.equal(String(prepared.start.after), before, 'it starts after the last event committed')
  const [during] = await publish('fresh', 'during set-up')
  await waitFor(() => hub.activity('fresh')?.lastEventId === Number(during), 'the live event to reach the hub')
  t.same(writer.text, [], 'held: nothing written before the stream begins')
  await core.begin(prepared, open(writer))
  t.match(writer.text[0], /^retry: (1[0-9]{3})\n\n/, 'a jittered retry: first')
  t.same(writer.events, [[before, 'gateway/open', JSON.stringify({ lastEventId: before, head: before })], [during, 'fresh', 'during set-up']])
})

t.test('a resuming stream: the replay, then the held live events, with no gap and no duplicate', async (t) => {
  const [resumeFrom, ...missed] = await publish('seam', 'seen', 'missed 1', 'missed 2')
  const { writer, prepared } = await stream({ channels: ['seam'], resumeFrom: Number(resumeFrom) })
  // Committed after the stream read its start: in the log and held live.
  const [both] = await publish('seam', 'both in the replay and live')
  await waitFor(() => hub.activity('seam')?.lastEventId === Number(both), 'the live event to reach the hub')
  await core.begin(prepared, open(writer))
  const [after] = await publish('seam', 'after')
  await waitFor(() => writer.events.some(([id]) => id === after), 'the event after')
  t.same(writer.events.slice(1).map(([id]) => id), [...missed, both, after], 'each event once, in id order')
})

t.test('a resume id the log no longer holds, or never held, is told as missed', async (t) => {
  const ids = await publish('pruned', 'a', 'b', 'c')
  await pruneLog(pool, { maxAgeSeconds: 86_400, maxEvents: 1, idempotencyWindowSeconds: 60 })
  const { rows } = await db.query<{ through: string, head: string }>('SELECT pruned_through::text AS through, sse_gateway.log_head_id()::text AS head FROM sse_gateway.log_retention')
  const through = rows[0]?.through as string
  const old = await stream({ channels: ['pruned'], resumeFrom: Number(ids[0]) - 1 })
  await core.begin(old.prepared, open(old.writer))
  t.same(old.writer.events[1], [undefined, 'gateway/missed', JSON.stringify({ lastEventId: String(Number(ids[0]) - 1), resumedAfter: through })], 'pruned: from where the log resumes')
  const head = rows[0]?.head as string
  const beyond = await stream({ channels: ['pruned'], resumeFrom: Number(head) + 1000 })
  await core.begin(beyond.prepared, open(beyond.writer))
  t.same(beyond.writer.events[1], [undefined, 'gateway/missed', JSON.stringify({ lastEventId: String(Number(head) + 1000), resumedAfter: head })], 'beyond the head: from the head')
})

t.test('a stream ends when its credential expires, with gateway/expired', async (t) => {
  const { writer, prepared } = await stream({ channels: ['expiring'], expiresAt: Math.floor(Date.now() / 1000) - 1 })
  await core.begin(prepared, open(writer))
  await waitFor(() => writer.ended, 'the end')
  t.equal(writer.events.at(-1)?.[1], 'gateway/expired')
})

t.test('closed before it begins, a stream holds nothing and begins never', async (t) => {
  const { writer, prepared } = await stream({ channels: ['closed-early'] })
  t.equal(hub.subscriberCount('closed-early'), 1)
  core.close(prepared)
  core.close(prepared)
  t.equal(hub.subscriberCount('closed-early'), 0, 'unsubscribed, once')
  await core.begin(prepared, open(writer))
  t.same(writer.text, [], 'nothing written')
  t.notOk(core.subscribers.has(prepared.subscriber))
})

t.test('live events held past the bound cut the stream off', async (t) => {
  const { writer } = await stream({ channels: ['flood'] })
  await publish('flood', ...Array.from({ length: 10 }, () => 'x'.repeat(8 * 1024)))
  await waitFor(() => writer.cutOffWith !== undefined, 'the cut-off')
  t.equal(writer.cutOffWith, 8, 'the frames held when the bound was passed are dropped with it')
})

/** Takes the events whose data starts with `prefix`, framed as `kept: <data>`; counts its select() calls. */
function prefixSelector (prefix: string): EventSelector & { calls: number } {
  return {
    key: `prefix:${prefix}`,
    calls: 0,
    select (view) {
      this.calls++
      return view.event.data.startsWith(prefix) ? Buffer.from(`data: kept ${view.event.data}\n\n`) : undefined
    }
  }
}

t.test('a selector: what it skips is not written, live or replayed, and streams that share its key share one select() per event', async (t) => {
  const [resumeFrom] = await publish('selected', 'seen')
  const replayed = await publish('selected', 'keep 1', 'drop 1', 'keep 2')
  const selector = prefixSelector('keep')
  const first = await stream({ channels: ['selected'], resumeFrom: Number(resumeFrom), selector })
  const sameKey = prefixSelector('keep')
  const second = await stream({ channels: ['selected'], selector: sameKey })
  const everything = await stream({ channels: ['selected'] })
  await core.begin(first.prepared, open(first.writer))
  await core.begin(second.prepared, open(second.writer))
  await core.begin(everything.prepared, open(everything.writer))
  t.same(first.writer.events.slice(1).map(([, , data]) => data), ['kept keep 1', 'kept keep 2'], 'the replay goes through the selector')
  t.equal(selector.calls, replayed.length, 'the replay offers each event once')
  const live = await publish('selected', 'drop 2', 'keep 3')
  await waitFor(() => everything.writer.events.length === 1 + live.length, 'the live events on the unfiltered stream')
  await waitFor(() => second.writer.events.length === 2, 'the live event on the second filtered stream')
  t.same(first.writer.events.slice(1).map(([, , data]) => data), ['kept keep 1', 'kept keep 2', 'kept keep 3'])
  t.same(second.writer.events.slice(1).map(([, , data]) => data), ['kept keep 3'])
  t.equal(selector.calls, replayed.length + live.length, 'one select() per live event for both streams: the first selector with the key serves the group')
  t.equal(sameKey.calls, 0, 'the second selector with the same key is never asked')
  t.same(everything.writer.events.slice(1).map(([id]) => id), live, 'a stream without a selector gets every event')
})

/** A dialect that says nothing: no preamble but a retry, no missed, gap or expiry frames. */
const SILENT: StreamDialect = {
  preamble: (_start, _head, retryMs) => `retry: ${retryMs}\n\n`,
  missed: () => undefined,
  gap: () => undefined,
  expired: () => undefined
}

t.test('a dialect: a stream that cannot say it missed events is ended instead; gaps and expiry go unsaid', async (t) => {
  const silent = await stream({ channels: ['dialect'], dialect: SILENT })
  const gateway = await stream({ channels: ['dialect'] })
  await core.begin(silent.prepared, open(silent.writer))
  await core.begin(gateway.prepared, open(gateway.writer))
  t.same(silent.writer.events, [], 'no gateway/open')
  const told = core.gap()
  t.ok(told >= 1, 'the gateway stream is told of the gap')
  t.same(silent.writer.events, [], 'the silent one is not')
  t.equal(gateway.writer.events.at(-1)?.[1], 'gateway/gap')
  core.missed('forked', 0)
  await waitFor(() => silent.writer.ended, 'the silent stream to end')
  t.equal(gateway.writer.events.at(-1)?.[1], 'gateway/missed', 'the gateway stream is told and goes on')
  t.notOk(gateway.writer.ended)
  const expiring = await stream({ channels: ['dialect'], dialect: SILENT, expiresAt: Math.floor(Date.now() / 1000) - 1 })
  await core.begin(expiring.prepared, open(expiring.writer))
  await waitFor(() => expiring.writer.ended, 'the expired stream to end')
  t.same(expiring.writer.events, [], 'it ends without a word')
})
