import t from 'tap'
import { reconnectDelay, watchLiveness } from '../src/liveness.js'
import { waitFor } from './helper.js'

t.test('reconnectDelay: full jitter under a doubling ceiling, capped', async (t) => {
  t.equal(reconnectDelay(0, 100, 10_000, () => 0), 0, 'as low as nothing')
  t.equal(reconnectDelay(0, 100, 10_000, () => 0.5), 50)
  t.equal(reconnectDelay(3, 100, 10_000, () => 0.5), 400, 'the ceiling doubles with each failure')
  t.equal(reconnectDelay(20, 100, 10_000, () => 0.999), 9990, 'and stops at the cap')
})

t.test('watchLiveness: a check that fails or hangs calls onDead; checks never overlap; stop stops', async (t) => {
  let running = 0
  let most = 0
  let calls = 0
  const dead: Error[] = []
  // The listener stops watching a connection it deemed dead, as here.
  const stop: () => void = watchLiveness(async () => {
    calls++
    running++
    most = Math.max(most, running)
    // The third check never answers, as a query on a silent connection.
    if (calls === 3) await new Promise<void>(() => {})
    running--
  }, { intervalMs: 5, timeoutMs: 50 }, (err) => { dead.push(err); stop() })
  t.teardown(stop)
  await waitFor(() => dead.length === 1, 'the hanging check to be deemed dead')
  t.match(dead[0]?.message, /took over 50 ms/)
  t.equal(most, 1, 'one check at a time, though the interval is shorter than the timeout')
  const after = calls
  await new Promise((resolve) => setTimeout(resolve, 30))
  t.equal(calls, after, 'no check after stop')
})

t.test('watchLiveness: a check that throws is reported as it threw', async (t) => {
  const dead: Error[] = []
  // The listener stops watching a connection it deemed dead, as here.
  const stop: () => void = watchLiveness(async () => { throw new Error('standby') }, { intervalMs: 5, timeoutMs: 1000 }, (err) => dead.push(err))
  t.teardown(stop)
  await waitFor(() => dead.length > 0, 'the failure')
  t.equal(dead[0]?.message, 'standby')
})
