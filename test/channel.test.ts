import t from 'tap'
import { ChannelPatterns, checkChannelNames, isChannelName } from '../src/channel.js'
import { seededRandom } from './helper.js'

t.test('channel names: 1 to 63 bytes of A-Z a-z 0-9 _ . : -', async (t) => {
  for (const name of ['a', 'orders', 'Orders.EU', 'tenant:42', 'a-b_c.d:e', 'x'.repeat(63)]) {
    t.ok(isChannelName(name), `${name} is a channel name`)
  }
  for (const name of ['', 'x'.repeat(64), 'a b', 'a"b', 'a;b', 'é', 'a*', 'a\nb', 'a/b', "a'b"]) {
    t.notOk(isChannelName(name), `${JSON.stringify(name)} is not`)
  }
})

t.test('patterns: * matches any run of characters, the rest literally', async (t) => {
  const patterns = new ChannelPatterns(['orders.*', 'chat'])
  t.ok(patterns.matches('orders.eu'))
  t.ok(patterns.matches('orders.'), '* matches an empty run')
  t.ok(patterns.matches('chat'))
  t.notOk(patterns.matches('chatroom'), 'patterns are anchored')
  t.notOk(patterns.matches('ordersXeu'), 'a dot is a dot')
  t.notOk(patterns.matches('Orders.eu'), 'case-sensitive')
  t.ok(new ChannelPatterns(['*']).matches('anything:at.all'))
  t.ok(new ChannelPatterns(['a*b*c']).matches('a-x-b-y-c'))
  t.notOk(new ChannelPatterns([]).matches('a'), 'no patterns allow nothing')
  t.ok(patterns.matchesAll(['chat', 'orders.us']))
  t.notOk(patterns.matchesAll(['chat', 'news']))
})

t.test('a list parses commas and spaces; bad patterns are refused', async (t) => {
  t.same(ChannelPatterns.parse(' public.*, news ,').patterns, ['public.*', 'news'])
  t.same(ChannelPatterns.parse('').patterns, [])
  t.throws(() => ChannelPatterns.parse('a b'), /invalid channel pattern "a b"/)
  t.throws(() => new ChannelPatterns(['(.*)']), /invalid channel pattern/)
})

t.test('a claim that is not an array of patterns allows nothing', async (t) => {
  t.notOk(ChannelPatterns.fromClaim('*').matches('a'))
  t.notOk(ChannelPatterns.fromClaim(undefined).matches('a'))
  t.notOk(ChannelPatterns.fromClaim([42, null]).matches('a'))
  t.ok(ChannelPatterns.fromClaim(['a', 7, 'b.*']).matches('b.c'), 'the valid entries count')
  t.notOk(ChannelPatterns.fromClaim(['(.*)']).matches('a'), 'an entry that is not a pattern is ignored')
})

// The reference: dynamic programming over (pattern position, name position),
// obviously right and never exponential, for the matcher to agree with.
function referenceMatch (pattern: string, name: string): boolean {
  let row = Array.from({ length: name.length + 1 }, (_, j) => j === 0)
  for (const c of pattern) {
    const next = Array.from({ length: name.length + 1 }, () => false)
    for (let j = 0; j <= name.length; j++) {
      next[j] = c === '*' ? (row[j] === true || (j > 0 && next[j - 1] === true)) : (j > 0 && row[j - 1] === true && name[j - 1] === c)
    }
    row = next
  }
  return row[name.length] === true
}

t.test('patterns agree with a reference matcher on random patterns and names', async (t) => {
  const random = seededRandom(Number(process.env.FUZZ_SEED ?? 7))
  const pick = (alphabet: string, max: number): string =>
    Array.from({ length: 1 + Math.floor(random() * max) }, () => alphabet[Math.floor(random() * alphabet.length)]).join('')
  let disagreements = 0
  for (let i = 0; i < 5000; i++) {
    const pattern = pick('ab*.', 10)
    const name = pick('ab.', 12)
    if (new ChannelPatterns([pattern]).matches(name) !== referenceMatch(pattern, name)) {
      disagreements++
      t.fail(`${JSON.stringify(pattern)} against ${JSON.stringify(name)}`)
    }
  }
  t.equal(disagreements, 0, 'no disagreement in 5000 cases')
})

t.test('adversarial patterns match in linear time: a backtracking matcher would never finish', async (t) => {
  // With a regular expression, each of the 31 stars may take any split of
  // the 63 a's: C(63, 31) (about 10^18) ways to fail. The matcher reads the
  // name a bounded number of times per pattern.
  const name = 'a'.repeat(63)
  const star = `${'*a'.repeat(30)}*b`
  t.equal(star.length, 62)
  const claim = Array.from({ length: 200 }, () => star)
  t.notOk(ChannelPatterns.fromClaim(claim).matches(name), 'no match, found at once')
  t.notOk(ChannelPatterns.parse(`${star},${'*a'.repeat(31)}*`).matches(`${'a'.repeat(30)}`), 'nor for PUBLIC_CHANNELS')
  t.ok(new ChannelPatterns([`${'*a'.repeat(31)}*`]).matches(name), 'and a pattern that fits matches')
  t.ok(new ChannelPatterns(['*aab*']).matches('aaab'), 'a middle part that overlaps itself')
  t.notOk(new ChannelPatterns(['ab*ba']).matches('aba'), 'head and tail may not overlap')
})

t.test('checkChannelNames: 400 for the first name that is not a channel name, naming the rule', async (t) => {
  t.doesNotThrow(() => checkChannelNames(['a', 'orders.eu', 'x'.repeat(63)]))
  t.doesNotThrow(() => checkChannelNames([]), 'no names, nothing to refuse')
  t.throws(() => checkChannelNames(['ok', 'a b', 'a;b']), { code: 'GW_INVALID_CHANNEL', statusCode: 400, message: 'invalid channel name "a b": use 1 to 63 characters of A-Z a-z 0-9 _ . : -' })
})
