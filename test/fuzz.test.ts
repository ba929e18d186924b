import t from 'tap'
import { openStream, seededRandom, startGateway, type StreamClient, streamUrl, type Test, type TestGateway, within } from './helper.js'
import { stillServing } from './security-helper.js'

// Random channel names and payloads, from a seed printed with the results
// (FUZZ_SEED=<n> replays a run): whatever is sent either arrives exactly as
// sent (line breaks as LF) or is refused with a clean JSON 4xx.

const SEED = Number(process.env.FUZZ_SEED ?? Math.floor(Math.random() * 2 ** 31))

const random = seededRandom(SEED)
const int = (n: number): number => Math.floor(random() * n)
const pick = <T>(items: readonly T[]): T => items[int(items.length)] as T

const NAME_CHARS = 'ABCXYZabcxyz0189_.:-'
const NASTY = [' ', '"', "'", ';', '\\', '/', '%', '*', '?', '#', '&', '=', '+', '\u0000', '\r', '\n', 'é', 'ü', '😀', '\u001f', '\u2028', '$', '(', ')', ',', '\t', '..']
const TEXT = ['a', 'Z', ' ', '  ', '\n', '\r', '\r\n', '\n\n', ':', 'data: ', 'id: 1', 'event: x', '\u001f', '\u2028', '\ufeff', 'é', '中文', '😀', '\u0007', '\u007f', '\u00a0', '{', '"', '\\', '\t', 'retry: 1']

const VALID_NAME = /^[A-Za-z0-9_.:-]{1,63}$/

function randomName (): string {
  if (random() < 0.5) {
    const length = 1 + int(random() < 0.2 ? 63 : 12)
    return Array.from({ length }, () => pick([...NAME_CHARS])).join('')
  }
  const kind = int(4)
  if (kind === 0) return ''
  if (kind === 1) return 'x'.repeat(64 + int(10))
  const parts = Array.from({ length: 1 + int(6) }, () => random() < 0.5 ? pick([...NAME_CHARS]) : pick(NASTY))
  return parts.join('')
}

function randomText (): string {
  return Array.from({ length: int(12) }, () => random() < 0.15 ? String.fromCodePoint(1 + int(0x10fff)) : pick(TEXT)).join('')
}

function randomBytes (): Buffer {
  return Buffer.from(Array.from({ length: int(24) }, () => random() < 0.6 ? 0x20 + int(0x5f) : int(256)))
}

/** What a client reads of a payload: line breaks as LF, the rest exact. */
const asRead = (payload: string): string => payload.replace(/\r\n|\r/g, '\n')

const STRICT_UTF8 = new TextDecoder('utf-8', { fatal: true, ignoreBOM: true })

/** The payload a body is published as, or undefined when it must be refused. */
function acceptableText (bytes: Buffer): string | undefined {
  let text: string
  try {
    text = STRICT_UTF8.decode(bytes)
  } catch {
    return undefined
  }
  return text.includes('\u0000') ? undefined : text
}

const refusable = (text: string): boolean => text.includes('\u0000') || /\p{Surrogate}/u.test(text)

/** A label for an input, ASCII only: TAP reads U+2028 and the like as line breaks. */
function show (input: string): string {
  const text = input.length > 40 ? `${input.slice(0, 40)}…` : input
  return JSON.stringify(text).replace(/[^\x20-\x7e]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)
}

async function clean4xx (t: Test, res: Response, what: string): Promise<void> {
  t.ok(res.status >= 400 && res.status < 500, `${what}: a 4xx (${res.status})`)
  const body = await res.json() as Record<string, unknown>
  t.same(Object.keys(body).sort(), ['error', 'message', 'statusCode'], `${what}: a JSON error`)
}

const auth = (gateway: TestGateway): Record<string, string> => ({ authorization: `Bearer ${gateway.token({ publish: ['*'], subscribe: ['*'] })}` })

t.comment(`FUZZ_SEED=${SEED}`)

t.test('random channel names: valid ones deliver, the others are a clean 400', async (t) => {
  const gateway = await startGateway(t)
  const names = [...new Set(Array.from({ length: 120 }, randomName))]
  const valid = names.filter((n) => VALID_NAME.test(n))

  // Streams of at most 32 channels, open before anything is published.
  const streams: StreamClient[] = []
  for (let i = 0; i < valid.length; i += 32) {
    const stream = await openStream(t, streamUrl(gateway.baseUrl, valid.slice(i, i + 32)), auth(gateway))
    t.equal(stream.response.status, 200)
    streams.push(stream)
  }
  const expected = new Map<string, string[]>()
  for (const name of names) {
    const label = show(name)
    const data = `to ${name}`
    const batch = await fetch(`${gateway.baseUrl}/events`, {
      method: 'POST',
      headers: { ...auth(gateway), 'content-type': 'application/json' },
      body: JSON.stringify({ events: [{ channel: name, data }] })
    })
    const single = await fetch(`${gateway.baseUrl}/channels/${encodeURIComponent(name)}`, {
      method: 'POST',
      headers: { ...auth(gateway), 'content-type': 'text/plain' },
      body: data
    })
    if (VALID_NAME.test(name)) {
      t.equal(batch.status, 201, `batch to ${label}`)
      // `.` and `..` are valid names, but a URL resolves them as path segments.
      if (/^\.{1,2}$/.test(name)) await clean4xx(t, single, `POST /channels/${label}`)
      else t.equal(single.status, 201, `POST /channels/${label}`)
      expected.set(name, /^\.{1,2}$/.test(name) ? [data] : [data, data])
      await batch.arrayBuffer()
      if (single.status === 201) await single.arrayBuffer()
    } else {
      await clean4xx(t, batch, `batch to ${label}`)
      await clean4xx(t, single, `POST /channels/${label}`)
      await clean4xx(t, await fetch(streamUrl(gateway.baseUrl, [name]), { headers: auth(gateway) }), `stream on ${label}`)
    }
  }
  const total = [...expected.values()].reduce((n, list) => n + list.length, 0)
  await within(Promise.all(streams.map(async (s, i) => {
    const mine = valid.slice(i * 32, i * 32 + 32)
    const count = mine.reduce((n, name) => n + (expected.get(name)?.length ?? 0), 0)
    await s.take(count)
  })), `${total} events`, 15_000)
  const received = new Map<string, string[]>()
  for (const stream of streams) {
    for (const e of stream.events) received.set(e.event as string, [...(received.get(e.event as string) ?? []), e.data])
  }
  t.same(Object.fromEntries(received), Object.fromEntries(expected), 'each valid channel got exactly its events')
  t.same([...gateway.app.listener.channels].filter((c) => !VALID_NAME.test(c)), [], 'no invalid name was LISTENed')
  await stillServing(t, gateway)
})

t.test('random payloads arrive exactly as sent, or are a clean 4xx', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['fuzz']), auth(gateway))
  const expected: string[] = []
  const post = async (path: string, contentType: string, body: string | Buffer): Promise<Response> =>
    await fetch(gateway.baseUrl + path, {
      method: 'POST',
      headers: { ...auth(gateway), 'content-type': contentType },
      body: typeof body === 'string' ? body : new Uint8Array(body)
    })

  for (let i = 0; i < 150; i++) {
    const kind = i % 4
    if (kind === 0) {
      const bytes = randomBytes()
      const text = acceptableText(bytes)
      const res = await post('/channels/fuzz', 'text/plain', bytes)
      if (text === undefined) {
        await clean4xx(t, res, `bytes ${bytes.toString('hex')}`)
      } else {
        t.equal(res.status, 201, `bytes ${bytes.toString('hex')}`)
        expected.push(asRead(text))
        await res.arrayBuffer()
      }
    } else if (kind === 1 || kind === 2) {
      const text = randomText()
      const res = kind === 1
        ? await post('/channels/fuzz', 'text/plain', text)
        : await post('/events', 'application/json', JSON.stringify({ events: [{ channel: 'fuzz', data: text }] }))
      // fetch encodes a lone surrogate of a text body as U+FFFD; JSON keeps it escaped.
      const sent = kind === 1 ? text.replace(/\p{Surrogate}/gu, '\ufffd') : text
      if (refusable(sent)) {
        await clean4xx(t, res, `text ${show(text)}`)
      } else {
        t.equal(res.status, 201, `text ${show(text)}`)
        expected.push(asRead(sent))
        await res.arrayBuffer()
      }
    } else {
      // JSON as sent: the payload is the JSON text itself.
      const json = JSON.stringify({ text: randomText(), n: random() }, null, int(3))
      const res = await post('/channels/fuzz', 'application/json', json)
      t.equal(res.status, 201, `json ${show(json)}`)
      expected.push(asRead(json))
      await res.arrayBuffer()
    }
  }
  const events = await within(stream.take(expected.length), `${expected.length} events`, 15_000)
  t.same(events.map((e) => e.data), expected, 'every accepted payload arrived exactly, in order')
  t.equal(stream.events.length, expected.length, 'and nothing else')
})
