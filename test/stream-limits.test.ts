import t from 'tap'
import { StreamLimits } from '../src/stream-limits.js'

t.test('counts streams per address and in all; a release frees one slot, once', async (t) => {
  const limits = new StreamLimits(2, 3)
  const a1 = limits.acquire('a')
  limits.acquire('a')
  t.throws(() => limits.acquire('a'), { statusCode: 429, code: 'GW_TOO_MANY_REQUESTS' }, 'the address has its share')
  limits.acquire('b')
  t.equal(limits.total, 3)
  t.throws(() => limits.acquire('c'), { statusCode: 503, code: 'GW_UNAVAILABLE' }, 'the instance is full')
  a1()
  a1()
  t.equal(limits.total, 2, 'a second release changes nothing')
  t.equal(limits.count('a'), 1)
  limits.acquire('c')
  t.equal(limits.count('c'), 1)
  t.throws(() => limits.acquire('d'), { statusCode: 503, code: 'GW_UNAVAILABLE' }, 'full again')
})

t.test('an address whose streams are all released is forgotten', async (t) => {
  const limits = new StreamLimits(1, 10)
  const releases = ['x', 'y', 'z'].map((address) => limits.acquire(address))
  for (const release of releases) release()
  t.equal(limits.total, 0)
  t.equal(limits.count('x'), 0)
  t.doesNotThrow(() => limits.acquire('x'), 'its share is whole again')
})
