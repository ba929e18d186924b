import t from 'tap'
import { LazyEventView } from '../../src/hub.js'
import { ANONYMOUS, grantsOf } from '../../src/mercure/authorization.js'
import { MERCURE_DIALECT, MercureSelector } from '../../src/mercure/selector.js'
import { TopicMatcher } from '../../src/mercure/topic-selector.js'
import { encodeUpdatePayload, MERCURE_CHANNEL, type MercureUpdate } from '../../src/mercure/update.js'

const matcher = new TopicMatcher({ hubUrl: 'https://hub.example/.well-known/mercure' })
const books = matcher.compile({ type: 'legacy', value: 'https://e/books/{id}' })
const users = matcher.compile({ type: 'exact', value: 'https://e/users/1' })
const reader = grantsOf({}, { mercure: { subscribe: ['https://e/users/1'] } }, matcher)

function view (update: Partial<MercureUpdate>, logged = true): LazyEventView {
  return new LazyEventView({ channel: MERCURE_CHANNEL, id: logged ? 1 : undefined, data: encodeUpdatePayload({ id: 'u', topics: ['https://e/books/1'], data: 'd', private: false, ...update }) })
}

t.test('a subscriber takes the updates one of whose topics its selectors match', async (t) => {
  const selector = new MercureSelector(matcher, [books], ANONYMOUS)
  t.equal(selector.select(view({}))?.toString(), 'id: u\ndata: d\n\n')
  t.ok(selector.select(view({ topics: ['https://other/1', 'https://e/books/2'] })), 'an alternate topic matches')
  t.equal(selector.select(view({ topics: ['https://e/authors/1'] })), undefined)
})

t.test('private updates reach only subscribers allowed to read one of their topics', async (t) => {
  const update = { private: true, topics: ['https://e/books/1', 'https://e/users/1'] }
  t.equal(new MercureSelector(matcher, [books], ANONYMOUS).select(view(update)), undefined, 'not an anonymous one')
  t.ok(new MercureSelector(matcher, [books], reader).select(view(update)), 'one allowed to read the alternate topic')
  t.equal(new MercureSelector(matcher, [books], reader).select(view({ private: true })), undefined, 'not one allowed other topics')
  t.equal(new MercureSelector(matcher, [users], reader).select(view({ private: true })), undefined, 'its grants never widen its selectors')
})

t.test('only logged updates: a plain NOTIFY or a payload that is no update is nothing', async (t) => {
  const selector = new MercureSelector(matcher, [books], ANONYMOUS)
  t.equal(selector.select(view({}, false)), undefined, 'no log id: any role may NOTIFY the reserved channel')
  t.equal(selector.select(new LazyEventView({ channel: MERCURE_CHANNEL, id: 2, data: 'not json' })), undefined)
  t.equal(selector.select(new LazyEventView({ channel: MERCURE_CHANNEL, id: 2, data: '{"id":"x\\nid: y","topics":["https://e/books/1"],"data":""}' })), undefined)
})

t.test('equal selectors and grants share a key; every subscriber shares the frame', async (t) => {
  const a = new MercureSelector(matcher, [books, users], reader)
  const b = new MercureSelector(matcher, [users, books, users], grantsOf({}, { mercure: { subscribe: ['https://e/users/1'], publish: ['*'] } }, matcher))
  t.equal(a.key, b.key, 'order and repeats do not matter, nor publish grants')
  t.not(a.key, new MercureSelector(matcher, [books, users], ANONYMOUS).key, 'other read grants, another key')
  t.not(a.key, new MercureSelector(matcher, [books], reader).key, 'other selectors, another key')
  const shared = view({ topics: ['https://e/books/1', 'https://e/users/1'] })
  const frame = a.select(shared)
  t.ok(frame)
  t.equal(new MercureSelector(matcher, [users], ANONYMOUS).select(shared), frame, 'the same Buffer, framed once')
})

t.test('the dialect says nothing of the gateway: a retry and a comment, then only updates', async (t) => {
  t.equal(MERCURE_DIALECT.preamble({ after: 0, missed: false }, 0, 1234), 'retry: 1234\n\n: mercure\n\n')
  t.equal(MERCURE_DIALECT.missed(1, 2), undefined, 'a discontinuity ends the stream: the client resumes with its last id')
  t.equal(MERCURE_DIALECT.gap(), undefined)
  t.equal(MERCURE_DIALECT.expired(), undefined)
})
