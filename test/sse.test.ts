import { createParser, type EventSourceMessage } from 'eventsource-parser'
import t from 'tap'
import { encodeComment, encodeEvent, encodeRetry } from '../src/sse.js'
import { FRAMING_CASES } from './helper.js'

// What a spec-following client makes of a stream.
function parse (stream: string): { events: EventSourceMessage[], retry: number | undefined, comments: string[] } {
  const events: EventSourceMessage[] = []
  const comments: string[] = []
  let retry: number | undefined
  const parser = createParser({ onEvent: (e) => events.push(e), onRetry: (r) => { retry = r }, onComment: (c) => comments.push(c) })
  parser.feed(stream)
  return { events, retry, comments }
}

t.test('a payload arrives exactly, line breaks as LF', async (t) => {
  for (const [payload, expected] of FRAMING_CASES) {
    const { events } = parse(encodeEvent({ id: '7', event: 'orders.eu', data: payload }))
    t.equal(events.length, 1, `one event for ${JSON.stringify(payload)}`)
    t.equal(events[0]?.data, expected, `data of ${JSON.stringify(payload)}`)
    t.equal(events[0]?.id, '7')
    t.equal(events[0]?.event, 'orders.eu')
  }
})

t.test('fields are written in the documented order', async (t) => {
  t.equal(encodeEvent({ id: '42', event: 'chat', data: 'a\r\nb' }), 'id: 42\nevent: chat\ndata: a\ndata: b\n\n')
  t.equal(encodeEvent({ data: '' }), 'data: \n\n', 'an event without id or name still has a data line')
})

t.test('an event without an id leaves the last event id alone', async (t) => {
  const { events } = parse(encodeEvent({ id: '1', event: 'c', data: 'x' }) + encodeEvent({ event: 'c', data: 'y' }))
  t.equal(events[1]?.id, undefined)
})

t.test('retry and comments', async (t) => {
  const { retry, comments, events } = parse(encodeRetry(2500) + encodeComment('heartbeat') + encodeComment('a\r\nb'))
  t.equal(retry, 2500)
  t.same(comments, ['heartbeat', 'a b'], 'one line each, line breaks folded')
  t.equal(events.length, 0, 'comments dispatch no event')
})
