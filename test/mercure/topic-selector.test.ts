import t from 'tap'
import { InvalidSelectorError, type SelectorType, TopicMatcher, uriTemplateExpression } from '../../src/mercure/topic-selector.js'

const HUB = 'https://hub.example/.well-known/mercure'

function matches (type: SelectorType, selector: string, topic: string, matcher = new TopicMatcher({ hubUrl: HUB })): boolean {
  return matcher.compile({ type, value: selector }).matches(topic)
}

t.test('draft-07 selectors: *, the topic itself, or a URI template it expands from', async (t) => {
  const cases: Array<[string, string, boolean]> = [
    ['*', 'anything at all', true],
    ['raw-string', 'raw-string', true],
    ['raw-string', 'raw-strin', false],
    ['https://example.net/foo/1', 'https://example.net/foo/1', true],
    ['https://example.net/foo/{id}', 'https://example.net/foo/42', true],
    ['https://example.net/foo/{id}', 'https://example.net/foo/a/b', false],
    ['https://example.net/foo/{+path}', 'https://example.net/foo/a/b', true],
    ['https://example.net/bar/{id}', 'https://example.net/foo/42', false],
    ['https://example.com/users/foo/{?topic}', 'https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1', true],
    // Mercure's own selector for subscription events: two adjacent expressions.
    ['/.well-known/mercure/subscriptions{/topic}{/subscriber}', '/.well-known/mercure/subscriptions/https%3A%2F%2Fexample.com%2Ffoo/urn%3Auuid%3Aabc', true],
    ['https://example.com/{a,b}{#frag}', 'https://example.com/1,2#x/y', true],
    ['{id}', 'https://example.net/foo/{id}', false],
    // A selector matches itself: a template compared with a template.
    ['https://example.net/foo/{id}', 'https://example.net/foo/{id}', true],
    // Not a valid template: matched as a plain string.
    ['https://example.net/{bad', 'https://example.net/{bad', true],
    ['https://example.net/{bad', 'https://example.net/x', false]
  ]
  for (const [selector, topic, expected] of cases) t.equal(matches('legacy', selector, topic), expected, `${selector} ${expected ? 'matches' : 'does not match'} ${topic}`)
})

t.test('Mercure 1.0 exact matchers compare byte for byte; * matches every topic', async (t) => {
  t.ok(matches('exact', 'https://example.net/a', 'https://example.net/a'))
  t.notOk(matches('exact', 'https://example.net/a', 'https://EXAMPLE.net/a'), 'no normalization')
  t.notOk(matches('exact', 'https://example.net/{id}', 'https://example.net/1'), 'no templates')
  t.ok(matches('exact', '*', 'whatever'))
  t.ok(matches('urlpattern', '*', 'not even a URL'))
})

t.test('URL patterns, relative ones and relative topics resolved against the hub', async (t) => {
  const cases: Array<[string, string, boolean]> = [
    ['https://example.net/foo/:random', 'https://example.net/foo/abc', true],
    ['https://example.net/foo/:random', 'https://example.net/foo/a/b', false],
    ['https://example.net/bar/:var', 'https://example.net/foo/abc', false],
    ['https://example.net/foo/*', 'https://example.net/foo/a/b', true],
    ['https://example.net/:id(\\d+)', 'https://example.net/12', true],
    ['https://example.net/:id(\\d+)', 'https://example.net/1a', false],
    ['https://EXAMPLE.net/foo', 'https://example.net/foo', true],
    ['/.well-known/mercure/subscriptions/:type/:match/:subscriber', '/.well-known/mercure/subscriptions/exact/x/y', true],
    ['/.well-known/mercure/subscriptions/:type/:match/:subscriber', 'https://hub.example/.well-known/mercure/subscriptions/exact/x/y', true],
    ['/.well-known/mercure/subscriptions/:type/:match/:subscriber', 'https://other.example/.well-known/mercure/subscriptions/exact/x/y', false],
    ['https://example.net/*', 'a plain string', false]
  ]
  for (const [pattern, topic, expected] of cases) t.equal(matches('urlpattern', pattern, topic), expected, `${pattern} ${expected ? 'matches' : 'does not match'} ${topic}`)
})

t.test('invalid selectors are refused; long ones too', async (t) => {
  const matcher = new TopicMatcher({ hubUrl: HUB, maxSelectorLength: 64 })
  for (const bad of ['https://example.net/:id(', 'https://example.net/:id((a)\\2)']) {
    t.throws(() => matcher.compile({ type: 'urlpattern', value: bad }), InvalidSelectorError, bad)
  }
  for (const bad of ['{}', '{!x}', '{a b}', 'a}b{c']) t.throws(() => uriTemplateExpression(bad), InvalidSelectorError, bad)
  t.throws(() => matcher.compile({ type: 'exact', value: 'x'.repeat(65) }), InvalidSelectorError)
})

t.test('matching takes linear time, whatever the pattern and the topic', async (t) => {
  const matcher = new TopicMatcher({ hubUrl: HUB })
  const long = 'a'.repeat(100_000)
  // Six adjacent groups backtrack for minutes in a JavaScript RegExp.
  const cases: Array<[SelectorType, string, string]> = [
    ['urlpattern', 'https://e.com/:a:b:c:d:e:f/x', `https://e.com/${long}/y`],
    ['urlpattern', 'https://e.com/*a*a*a*a*a*b', `https://e.com/${long}`],
    ['legacy', '{a}{b}{c}{d}{e}{f}x', `${long}y`],
    ['legacy', '{+a}{+b}{+c}{+d}x', `${long}y`]
  ]
  for (const [type, selector, topic] of cases) {
    const started = performance.now()
    t.notOk(matcher.compile({ type, value: selector }).matches(topic), selector)
    t.ok(performance.now() - started < 2000, `${selector} against 100,000 characters took ${Math.round(performance.now() - started)} ms`)
  }
})

t.test('a selector is compiled once per type and value, and remembers its answers', async (t) => {
  const matcher = new TopicMatcher({ hubUrl: HUB, maxAnswersPerSelector: 2 })
  const first = matcher.compile({ type: 'legacy', value: 'https://e/{id}' })
  t.equal(matcher.compile({ type: 'legacy', value: 'https://e/{id}' }), first, 'the same compiled selector')
  t.not(matcher.compile({ type: 'exact', value: 'https://e/{id}' }), first, 'another type is another selector')
  for (const topic of ['https://e/1', 'https://e/2', 'https://e/3', 'https://e/1']) t.ok(first.matches(topic), `${topic}, answered past the bound`)
  t.ok(matcher.matchesAny([first], ['nope', 'https://e/9']), 'any topic of any selector')
  t.notOk(matcher.matchesAny([first], ['nope']))
})
