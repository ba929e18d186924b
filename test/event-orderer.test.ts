// The orderer alone, without PostgreSQL: its reader is a plain function the
// test answers when it chooses.
import t from 'tap'
import type { LoggedEvent } from '../src/event-log.js'
import { type ChannelEvent, EventOrderer } from '../src/event-orderer.js'
import { waitFor } from './helper.js'

interface Read {
  ids: readonly string[]
  answer (rows: LoggedEvent[]): void
  fail (err: Error): void
}

function harness (): { orderer: EventOrderer, emitted: ChannelEvent[], reads: Read[], failures: Error[] } {
  const emitted: ChannelEvent[] = []
  const reads: Read[] = []
  const failures: Error[] = []
  const orderer = new EventOrderer({
    read: async (ids) => await new Promise<LoggedEvent[]>((resolve, reject) => { reads.push({ ids, answer: resolve, fail: reject }) }),
    emit: (event) => emitted.push(event),
    onReadFailed: (err) => failures.push(err)
  })
  return { orderer, emitted, reads, failures }
}

const row = (id: number, channel: string, payload: string): LoggedEvent => ({ id: String(id), channel, payload })

t.test('plain and inline events go out at once, in arrival order', async (t) => {
  const { orderer, emitted, reads } = harness()
  orderer.push('a', undefined, 'plain')
  orderer.push('a', 1, 'one')
  orderer.push('b', 2, 'two')
  await waitFor(() => emitted.length === 3, 'three events')
  t.same(emitted, [{ channel: 'a', id: undefined, data: 'plain' }, { channel: 'a', id: '1', data: 'one' }, { channel: 'b', id: '2', data: 'two' }])
  t.equal(orderer.position, 2)
  t.equal(reads.length, 0, 'nothing read')
})

t.test('a reference holds back what arrived after it until its payload is read', async (t) => {
  const { orderer, emitted, reads } = harness()
  orderer.push('a', 1, undefined)
  await waitFor(() => reads.length === 1, 'the read')
  orderer.push('a', 2, 'inline')
  orderer.push('a', undefined, 'plain')
  // A reference that arrives during the read waits for the next round, and
  // with it what arrived meanwhile.
  orderer.push('a', 3, undefined)
  orderer.push('a', 4, 'after')
  t.same(reads[0]?.ids, ['1'])
  t.same(emitted, [], 'nothing goes out before the read')
  reads[0]?.answer([row(1, 'a', 'large')])
  await waitFor(() => reads.length === 2, 'the second read')
  t.same(reads[1]?.ids, ['3'], 'the late reference is read, not dropped')
  reads[1]?.answer([row(3, 'a', 'large 3')])
  await waitFor(() => emitted.length === 5, 'five events')
  t.same(emitted.map((e) => e.data), ['large', 'inline', 'plain', 'large 3', 'after'], 'in arrival order')
})

t.test('a reference whose row is missing or of another channel is not emitted', async (t) => {
  const { orderer, emitted, reads } = harness()
  orderer.push('a', 1, undefined)
  orderer.push('a', 2, undefined)
  orderer.push('a', 3, 'three')
  await waitFor(() => reads.length === 1, 'the first read')
  reads[0]?.answer([])
  await waitFor(() => reads.length === 2, 'the second read')
  reads[1]?.answer([row(2, 'b', 'not a\'s')])
  await waitFor(() => emitted.length === 1, 'the inline event')
  t.same(emitted, [{ channel: 'a', id: '3', data: 'three' }])
})

t.test('a logged event at or below the position is dropped; plain ones never are', async (t) => {
  const { orderer, emitted } = harness()
  orderer.position = 5
  orderer.push('a', 4, 'old')
  orderer.push('a', 5, 'seen')
  orderer.push('a', undefined, 'plain')
  orderer.push('a', 6, 'new')
  orderer.push('a', 6, 'twice')
  await waitFor(() => emitted.length === 2, 'two events')
  t.same(emitted.map((e) => e.data), ['plain', 'new'])
})

t.test('held during a catch-up: notifications wait, and those the catch-up emitted are dropped', async (t) => {
  const { orderer, emitted } = harness()
  orderer.hold()
  orderer.push('a', 1, 'one')
  orderer.push('a', 2, 'two')
  await new Promise((resolve) => setImmediate(resolve))
  t.same(emitted, [], 'nothing while held')
  orderer.emitLogged(row(1, 'a', 'one'))
  t.equal(orderer.position, 1)
  orderer.release()
  await waitFor(() => emitted.length === 2, 'two events')
  t.same(emitted.map((e) => e.id), ['1', '2'], 'each once')
})

t.test('a failed read drops everything pending and says so; the position stays', async (t) => {
  const { orderer, emitted, reads, failures } = harness()
  orderer.position = 10
  orderer.push('a', 11, undefined)
  orderer.push('a', 12, 'twelve')
  await waitFor(() => reads.length === 1, 'the read')
  reads[0]?.fail(new Error('connection lost'))
  await waitFor(() => failures.length === 1, 'the failure')
  t.equal(failures[0]?.message, 'connection lost')
  t.same(emitted, [])
  t.equal(orderer.position, 10, 'a catch-up from here reads them again')
  orderer.push('a', 13, 'thirteen')
  await waitFor(() => emitted.length === 1, 'the next event')
  t.same(emitted, [{ channel: 'a', id: '13', data: 'thirteen' }], 'the orderer goes on')
})

t.test('a catch-up cut short: what waited is dropped, not emitted past what the catch-up had not read', async (t) => {
  const { orderer, emitted } = harness()
  orderer.position = 10
  orderer.hold()
  orderer.push('a', 13, 'live, after events the catch-up never read')
  orderer.push('a', undefined, 'plain')
  orderer.dropPending()
  orderer.release()
  await new Promise((resolve) => setImmediate(resolve))
  t.same(emitted, [], 'nothing emitted')
  t.equal(orderer.position, 10, 'the next catch-up starts where this one did')
})
