import { createParser, type EventSourceMessage } from 'eventsource-parser'
import t from 'tap'
import { addressesHub, hasDotSegment, decodeUpdatePayload, encodeUpdatePayload, frameUpdate, InvalidUpdateError, type MercureUpdate, parsePublishForm } from '../../src/mercure/update.js'
import { FRAMING_CASES } from '../helper.js'

const HUB = 'https://hub.example/.well-known/mercure'
const limits = { maxTopics: 3, maxFieldLength: 100, hubUrl: HUB }

function form (pairs: Array<[string, string]>): string {
  return new URLSearchParams(pairs).toString()
}

// What an SSE client reads of a frame.
function read (frame: Buffer): { events: EventSourceMessage[], retry: number | undefined } {
  const events: EventSourceMessage[] = []
  let retry: number | undefined
  const parser = createParser({ onEvent: (e) => events.push(e), onRetry: (ms) => { retry = ms } })
  parser.feed(frame.toString())
  return { events, retry }
}

t.test('a publish form: every field of both generations', async (t) => {
  const update = parsePublishForm(form([['topic', 'https://e/1'], ['topic', 'https://e/alt'], ['data', 'hello'], ['private', ''], ['id', 'my-id'], ['type', 'greeting'], ['retry', '1500'], ['unknown', 'ignored']]), limits)
  t.same(update, { id: 'my-id', topics: ['https://e/1', 'https://e/alt'], data: 'hello', private: true, type: 'greeting', retry: 1500 })
  const minimal = parsePublishForm(form([['topic', 'x']]), limits)
  t.equal(minimal.private, false, 'private only when present')
  t.equal(minimal.data, '')
  t.match(minimal.id, /^urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/, 'a UUIDv7 IRI when the publisher gives none')
  t.equal(parsePublishForm(form([['topic', 'x'], ['private', 'off']]), limits).private, true, 'whatever its value')
  t.equal(parsePublishForm(form([['topic', 'x'], ['id', 'same']]), limits).id, 'same', 'a given id is kept, even one used before')
})

t.test('what a publish form may not hold', async (t) => {
  const refused: Array<[string, Array<[string, string]>, number]> = [
    ['no topic', [['data', 'x']], 400],
    ['the topic *', [['topic', '*']], 400],
    ['a topic under the hub', [['topic', '/.well-known/mercure/subscriptions/x']], 400],
    ['an absolute topic under the hub', [['topic', 'https://hub.example/.well-known/mercure']], 400],
    ['a disguised topic under the hub', [['topic', 'https://hub.example/.well-known/%6Dercure/../mercure/x']], 400],
    ['a control character in a topic', [['topic', 'a\nb']], 400],
    ['an id starting with #', [['topic', 'x'], ['id', '#1']], 400],
    ['the id earliest', [['topic', 'x'], ['id', 'earliest']], 400],
    ['an id with a line break', [['topic', 'x'], ['id', 'a\r\nid: 2']], 400],
    ['the type mercure', [['topic', 'x'], ['type', 'mercure']], 400],
    ['a format character in the type', [['topic', 'x'], ['type', 'a\u200bb']], 400],
    ['a retry that is not digits', [['topic', 'x'], ['retry', '1e3']], 400],
    ['too many topics', [['topic', 'a'], ['topic', 'b'], ['topic', 'c'], ['topic', 'd']], 413],
    ['too long a topic', [['topic', 'x'.repeat(101)]], 413]
  ]
  for (const [what, pairs, status] of refused) {
    t.throws(() => parsePublishForm(form(pairs), limits), InvalidUpdateError, what)
    try {
      parsePublishForm(form(pairs), limits)
    } catch (err) {
      t.equal((err as InvalidUpdateError).statusCode, status, `${what}: ${status}`)
    }
  }
  t.notOk(addressesHub('https://hub.example/.well-known/mercurex', HUB), 'a sibling path is not the hub')
  t.notOk(addressesHub('urn:x:/.well-known/mercure', HUB))
})

t.test('the log payload is JSON and reads back; anything else is no update', async (t) => {
  const update: MercureUpdate = { id: 'i', topics: ['a', 'b'], data: 'd', private: true, type: 't', retry: 5 }
  t.same(decodeUpdatePayload(JSON.parse(encodeUpdatePayload(update))), update)
  t.same(decodeUpdatePayload(JSON.parse(encodeUpdatePayload({ id: 'i', topics: ['a'], data: '', private: false }))), { id: 'i', topics: ['a'], data: '', private: false, type: undefined, retry: undefined })
  for (const bad of [null, 'text', { topics: ['a'], data: '' }, { id: 'i', topics: [], data: '' }, { id: 'i\nid: 2', topics: ['a'], data: '' }, { id: 'i', topics: ['a'], data: '', type: 'x\ry' }, { id: 'i', topics: ['a'], data: 1 }, { id: 'i', topics: ['a'], data: '', private: 'true' }, { id: 'i', topics: ['a'], data: '', private: 1 }]) {
    t.equal(decodeUpdatePayload(bad), undefined, JSON.stringify(bad))
  }
})

t.test('framing: id, event only with a type, retry when set, data split on CR, LF and CRLF', async (t) => {
  const plain = frameUpdate({ id: 'urn:uuid:1', topics: ['a'], data: 'x', private: false }).toString()
  t.equal(plain, 'id: urn:uuid:1\ndata: x\n\n', 'no event: line, no retry: line')
  const typed = read(frameUpdate({ id: 'i', topics: ['a'], data: 'x', private: false, type: 'greeting', retry: 2500 }))
  t.equal(typed.retry, 2500)
  t.match(typed.events[0], { id: 'i', event: 'greeting', data: 'x' })
  for (const [data, expected] of FRAMING_CASES) {
    t.equal(read(frameUpdate({ id: 'i', topics: ['a'], data, private: false })).events[0]?.data, expected, JSON.stringify(data))
  }
})

t.test('a topic with a dot segment is refused: a grant matched on its text would not match what it resolves to', async (t) => {
  for (const topic of ['https://example.com/public/../secret/1', '/public/../admin/x', 'https://example.com/public/%2e%2E', 'https://example.com/public\\..\\secret', 'https://example.com/a/./b', '..']) {
    t.throws(() => parsePublishForm(form([['topic', topic]]), limits), InvalidUpdateError, topic)
  }
  for (const topic of ['https://example.com/a.b/..c', 'https://example.com/a?q=/../', 'urn:x:..', 'https://example.com/x#/../']) {
    t.doesNotThrow(() => parsePublishForm(form([['topic', topic]]), limits), `${topic} has none`)
  }
  t.notOk(hasDotSegment('https://example.com/...'), 'three dots are a name')
})

t.test('data with NUL is a 400, not a fault of the database', async (t) => {
  t.throws(() => parsePublishForm(form([['topic', 'x'], ['data', 'a\0b']]), limits), InvalidUpdateError)
})
