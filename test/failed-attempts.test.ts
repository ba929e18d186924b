import t from 'tap'
import { FailedAttempts } from '../src/failed-attempts.js'

t.test('an address is refused once it has its failures, until its window ends', async (t) => {
  const attempts = new FailedAttempts(3, 10_000)
  const start = 1_000_000
  for (let i = 0; i < 3; i++) {
    t.equal(attempts.retryAfter('a', start), 0, `attempt ${i + 1} is allowed`)
    attempts.fail('a', start)
  }
  t.equal(attempts.retryAfter('a', start), 10, 'the fourth waits for the window to end')
  t.equal(attempts.retryAfter('a', start + 9_001), 1, 'Retry-After rounds up')
  t.equal(attempts.retryAfter('b', start), 0, 'other addresses are not concerned')
  t.equal(attempts.retryAfter('a', start + 10_000), 0, 'a new window starts afresh')
  attempts.fail('a', start + 10_000)
  t.equal(attempts.retryAfter('a', start + 10_000), 0, 'with its count at one')
})

t.test('memory is bounded: expired windows are swept, the oldest forgotten past the bound', async (t) => {
  const attempts = new FailedAttempts(1, 1000, 3)
  attempts.fail('a', 0)
  attempts.fail('b', 500)
  attempts.fail('c', 600)
  attempts.fail('d', 700)
  t.equal(attempts.size, 3)
  t.equal(attempts.retryAfter('a', 700), 0, 'the oldest was forgotten')
  t.equal(attempts.retryAfter('b', 700), 1)
  attempts.fail('e', 1550)
  t.equal(attempts.size, 3, 'the expired window of b was swept (c and d are in force)')
  attempts.fail('f', 5000)
  t.equal(attempts.size, 1, 'every expired window is swept')
})
