import t from 'tap'
import { BATCH_DATA, MAX_JSON_DEPTH, checkPayload, parseJsonBody, toPayload } from '../src/payload.js'

t.test('parseJsonBody: 400 for what is not JSON, nests too deep or has prototype keys, never quoting the body', async (t) => {
  t.same(parseJsonBody('{"a":[1,"x"]}'), { a: [1, 'x'] })
  for (const [text, message] of [
    ['{"secret": ', /not valid JSON/],
    ['['.repeat(MAX_JSON_DEPTH + 1) + ']'.repeat(MAX_JSON_DEPTH + 1), /deeper than 128/],
    ['{"__proto__":{"x":1}}', /__proto__/],
    ['{"constructor":{"prototype":{}}}', /constructor\.prototype/]
  ] as const) {
    t.throws(() => parseJsonBody(text), { code: 'GW_BAD_REQUEST', statusCode: 400, message }, text.slice(0, 30))
  }
  const refused = t.throws(() => parseJsonBody('{"secret": nope}')) as Error
  t.notMatch(refused.message, /secret|nope/, 'the message does not echo the body')
  t.doesNotThrow(() => parseJsonBody('['.repeat(MAX_JSON_DEPTH) + ']'.repeat(MAX_JSON_DEPTH)), '128 levels are fine')
})

t.test('toPayload: a string verbatim, any other value as the JSON text sent, compacted', async (t) => {
  const body = parseJsonBody('{"events": [{"data": "as is"}, {"data": { "big": 12345678901234567890, "n": 1e400, "e": "\\u00e9" }}]}', BATCH_DATA) as { events: Array<{ data: unknown }> }
  const [first, second] = body.events as [{ data: unknown }, { data: unknown }]
  t.equal(toPayload(first, 100, 'events[0].data'), 'as is')
  t.equal(toPayload(second, 100, 'events[1].data'), '{"big":12345678901234567890,"n":1e400,"e":"\\u00e9"}', 'never through a float')
  t.equal(toPayload({ data: { n: 1 } }, 100, 'data'), '{"n":1}', 'a value not parsed by parseJsonBody is serialised')
  const uncaptured = parseJsonBody('{"events": [{"data": 1.0}]}') as { events: Array<{ data: unknown }> }
  t.equal(toPayload(uncaptured.events[0] as { data: unknown }, 100, 'data'), '1', 'without a capture, the value is all there is')
  t.throws(() => toPayload({ data: 'x'.repeat(11) }, 10, 'events[2].data'), { statusCode: 413, message: 'events[2].data is larger than 10 bytes' }, 'and checked')
})

t.test('checkPayload: at most maxBytes UTF-8 bytes, no NUL, no lone surrogate', async (t) => {
  t.doesNotThrow(() => checkPayload('é'.repeat(5), 10, 'the payload'), '10 bytes in 5 characters')
  t.throws(() => checkPayload('é'.repeat(6), 10, 'the payload'), { code: 'GW_PAYLOAD_TOO_LARGE', statusCode: 413, message: 'the payload is larger than 10 bytes' })
  t.throws(() => checkPayload('a\u0000b', 10, 'the payload'), { code: 'GW_BAD_REQUEST', message: /NUL/ })
  t.throws(() => checkPayload('a\ud800', 10, 'the payload'), { code: 'GW_BAD_REQUEST', message: /lone surrogate/ })
  t.doesNotThrow(() => checkPayload('😀', 10, 'the payload'), 'a surrogate pair is fine')
})
