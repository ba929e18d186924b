import { createSigner } from 'fast-jwt'
import t from 'tap'
import { grantsOf, InvalidTokenError, MERCURE_DETAIL_TYPE, mayPublish, mayRead, type MercureTokenOptions, MercureTokens, payloadFor } from '../../src/mercure/authorization.js'
import { TopicMatcher } from '../../src/mercure/topic-selector.js'

const HUB = 'https://hub.example/.well-known/mercure'
const PUBLISHER_KEY = 'publisher-secret-that-is-long-enough-32'
const SUBSCRIBER_KEY = 'subscriber-secret-that-is-long-enough-32'

function tokens (options: Partial<MercureTokenOptions> = {}): MercureTokens {
  return new MercureTokens({ algorithm: 'HS256', publisherKey: PUBLISHER_KEY, subscriberKey: SUBSCRIBER_KEY, requireExp: true, clockToleranceSeconds: 0, ...options }, new TopicMatcher({ hubUrl: HUB }))
}

function sign (claims: Record<string, unknown>, key = SUBSCRIBER_KEY): string {
  return createSigner({ key, algorithm: 'HS256' })(claims)
}

const detail = (actions: unknown, topics: unknown, payload?: unknown): Record<string, unknown> => ({ type: MERCURE_DETAIL_TYPE, actions, topics, ...(payload === undefined ? {} : { payload }) })
const inAnHour = (): number => Math.floor(Date.now() / 1000) + 3600

t.test('draft-07 grants: the mercure claim', async (t) => {
  const matcher = new TopicMatcher({ hubUrl: HUB })
  const grants = grantsOf({}, { mercure: { publish: ['https://e/{id}'], subscribe: ['https://e/1', 42], payload: { user: 'u' } } }, matcher)
  t.equal(grants.generation, 'legacy')
  t.ok(mayPublish(matcher, grants, ['https://e/1', 'https://e/2']), 'every topic matches a publish selector')
  t.notOk(mayPublish(matcher, grants, ['https://e/1', 'https://other/1']), 'one topic outside is a refusal')
  t.ok(mayRead(matcher, grants, ['https://e/2', 'https://e/1']), 'one topic of the update is enough to read it')
  t.notOk(mayRead(matcher, grants, ['https://e/2']))
  t.same(payloadFor(grants, 'https://anything'), { user: 'u' }, 'the payload goes with every subscription')
  t.same(grantsOf({}, { sub: 'x' }, matcher).publish, [], 'no claim, no grant')
  t.same(grantsOf({}, { mercure: { publish: 'not an array' } }, matcher).publish, [])
})

t.test('Mercure 1.0 grants: authorization_details', async (t) => {
  const matcher = new TopicMatcher({ hubUrl: HUB })
  const grants = grantsOf({ typ: 'at+jwt' }, {
    authorization_details: [
      { type: 'https://example.com/another-kind', anything: true },
      detail(['publish'], [{ match: '*' }]),
      detail(['subscribe', 'some-future-action'], [{ match: 'https://e/books/:id', match_type: 'urlpattern' }], { tier: 'books' }),
      detail(['subscribe'], [{ match: 'https://e/users/1' }], { tier: 'user' })
    ]
  }, matcher)
  t.equal(grants.generation, '1.0')
  t.ok(mayPublish(matcher, grants, ['anything', 'at all']))
  t.ok(mayRead(matcher, grants, ['https://e/books/7']))
  t.notOk(mayRead(matcher, grants, ['https://e/books/7/reviews']))
  t.ok(mayRead(matcher, grants, ['https://e/users/1']), 'exact by default')
  t.same(payloadFor(grants, 'https://e/books/:id'), { tier: 'books' }, 'a subscription takes the payload of the first detail that matches its selector')
  t.same(payloadFor(grants, 'https://e/users/1'), { tier: 'user' })
  t.equal(payloadFor(grants, 'https://e/nothing'), undefined)
  t.equal(grantsOf({ typ: 'application/AT+JWT' }, {}, matcher).generation, '1.0', 'typ compared without application/ and case')

  const invalid: unknown[] = [
    'not an array',
    [detail([], [{ match: 'a' }])],
    [detail(['subscribe'], [])],
    [detail(['subscribe'], ['a bare string'])],
    [detail(['subscribe'], [{ match: 'a', match_type: 'EXACT' }])],
    [detail(['subscribe'], [{ match: 'a', match_type: 'uritemplate' }])],
    [detail(['subscribe'], [{ match: 'https://e/:id(', match_type: 'urlpattern' }])],
    [detail(['subscribe'], Array.from({ length: 101 }, () => ({ match: 'a' })))]
  ]
  for (const details of invalid) {
    t.throws(() => grantsOf({ typ: 'at+jwt' }, { authorization_details: details }, matcher), InvalidTokenError, JSON.stringify(details).slice(0, 80))
  }
})

t.test('tokens are verified with the key of their role, and exp is required unless told otherwise', async (t) => {
  const hub = tokens()
  const exp = inAnHour()
  const subscriberToken = sign({ exp, mercure: { subscribe: ['*'] } })
  t.equal(hub.verify(subscriberToken, 'subscribe').grants.subscribe.length, 1)
  t.equal(hub.verify(subscriberToken, 'subscribe').exp, exp, 'exp is kept: the stream ends then')
  t.throws(() => hub.verify(subscriberToken, 'publish'), InvalidTokenError, 'a subscriber key does not sign a publisher token')
  t.ok(hub.verify(sign({ exp: inAnHour(), mercure: { publish: ['*'] } }, PUBLISHER_KEY), 'publish'))
  t.throws(() => hub.verify(sign({ mercure: { subscribe: ['*'] } }), 'subscribe'), InvalidTokenError, 'no exp')
  t.equal(tokens({ requireExp: false }).verify(sign({ mercure: { subscribe: ['*'] } }), 'subscribe').exp, undefined, 'no exp, when allowed')
  t.throws(() => hub.verify(sign({ exp: Math.floor(Date.now() / 1000) - 10 }), 'subscribe'), InvalidTokenError, 'expired')
  t.throws(() => hub.verify('not.a.token', 'subscribe'), InvalidTokenError)
  t.throws(() => hub.verify(sign({ exp: inAnHour() }, 'another-secret-that-is-long-enough-32'), 'subscribe'), InvalidTokenError, 'another key')
})

t.test('aud and iss are checked when configured', async (t) => {
  const hub = tokens({ audience: HUB, issuer: 'https://issuer.example' })
  const good = { exp: inAnHour(), aud: HUB, iss: 'https://issuer.example' }
  t.ok(hub.verify(sign(good), 'subscribe'))
  t.ok(hub.verify(sign({ ...good, aud: ['https://other', HUB] }), 'subscribe'), 'aud may be an array holding it')
  t.throws(() => hub.verify(sign({ ...good, aud: 'https://other' }), 'subscribe'), InvalidTokenError)
  t.throws(() => hub.verify(sign({ exp: good.exp, iss: good.iss }), 'subscribe'), InvalidTokenError, 'no aud')
  t.throws(() => hub.verify(sign({ ...good, iss: 'https://evil.example' }), 'subscribe'), InvalidTokenError)
  t.ok(tokens().verify(sign({ exp: inAnHour(), aud: 'https://anything' }), 'subscribe'), 'not checked when not configured')
})
