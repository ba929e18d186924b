import t from 'tap'
import { ChannelPatterns, isChannelName } from '../src/channel.js'

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
