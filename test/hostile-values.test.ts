import t from 'tap'
import { errorBody, openStream, startGateway, streamUrl, type TestGateway, within } from './helper.js'
import { loggingGateway, rawExchange, stillServing } from './security-helper.js'

const postJson = async (gateway: TestGateway, path: string, body: string, token = gateway.token({ publish: ['*'] })): Promise<Response> =>
  await fetch(gateway.baseUrl + path, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` }, body })

t.test('a claim or PUBLIC_CHANNELS pattern built to backtrack is answered at once', async (t) => {
  const adversarial = `${'*a'.repeat(30)}*b`
  const gateway = await startGateway(t, { PUBLIC_CHANNELS: adversarial })
  const name = 'a'.repeat(63)
  // A backtracking matcher blocks the event loop here for longer than the test may run.
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, [name])), 401)
  const token = gateway.token({ subscribe: Array.from({ length: 50 }, () => adversarial) })
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, [name]), { headers: { authorization: `Bearer ${token}` } }), 403)
  t.equal((await fetch(`${gateway.baseUrl}/healthz`)).status, 200)
  await stillServing(t, gateway)
})

t.test('batch data and JSON bodies arrive as the client wrote them, never through a float', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['numbers', 'verbatim']), { authorization: `Bearer ${gateway.token({ subscribe: ['*'] })}` })
  const batch = '{"events":[{"channel":"numbers","data":{"big":12345678901234567890,"n":1e400}},' +
    '{"channel":"numbers","data": [ 1.0 , -0, 1E+2, 0.1000000000000000055511151231257827 ]},' +
    '{"channel":"numbers","data":{ "text" : "spaces  inside, \\"quoted\\" \\\\" ,"e":"\\u00e9"}},' +
    '{"channel":"numbers","data":"a string is sent verbatim"},' +
    '{"channel":"numbers","data":1,"data":123456789012345678901234567890},' +
    '{"channel":"numbers","d\\u0061ta":98765432109876543210}]}'
  const res = await postJson(gateway, '/events', batch)
  t.equal(res.status, 201, 'the batch is published')
  const single = await postJson(gateway, '/channels/verbatim', '{"big": 12345678901234567890, "n": 1e400}')
  t.equal(single.status, 201, 'a JSON body is published')
  const events = await within(stream.take(7), '7 events')
  t.same(events.map((e) => e.data), [
    '{"big":12345678901234567890,"n":1e400}',
    '[1.0,-0,1E+2,0.1000000000000000055511151231257827]',
    '{"text":"spaces  inside, \\"quoted\\" \\\\","e":"\\u00e9"}',
    'a string is sent verbatim',
    '123456789012345678901234567890',
    '98765432109876543210',
    '{"big": 12345678901234567890, "n": 1e400}'
  ], 'numbers as written; whitespace between tokens compacted in a batch; the last of repeated keys, as JSON.parse')
  await stillServing(t, gateway)
})

t.test('JSON nested too deep is a 400, not a stack overflow', async (t) => {
  const gateway = await startGateway(t)
  const deep = (n: number): string => '['.repeat(n) + ']'.repeat(n)
  await errorBody(t, await postJson(gateway, '/events', `{"events":[{"channel":"deep","data":${deep(5000)}}]}`), 400)
  await errorBody(t, await postJson(gateway, '/channels/deep', deep(5000)), 400)
  await errorBody(t, await postJson(gateway, '/events', `{"events":[{"channel":"deep","data":${deep(126)}}]}`), 400)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['deep']), { authorization: `Bearer ${gateway.token({ subscribe: ['*'] })}` })
  t.equal((await postJson(gateway, '/events', `{"events":[{"channel":"deep","data":${deep(125)}}]}`)).status, 201, '128 levels in all are fine')
  t.equal((await postJson(gateway, '/channels/deep', deep(128))).status, 201)
  const events = await within(stream.take(2), 'the deep events')
  t.same(events.map((e) => e.data), [deep(125), deep(128)])
  await stillServing(t, gateway)
})

t.test('a __proto__ or constructor.prototype key is a 400 on both publishing routes', async (t) => {
  const gateway = await startGateway(t)
  for (const data of ['{"__proto__":{"x":1}}', '{"a":[{"__pr\\u006fto__":1}]}', '{"constructor":{"prototype":{"x":1}}}']) {
    await errorBody(t, await postJson(gateway, '/channels/proto', data), 400)
    await errorBody(t, await postJson(gateway, '/events', `{"events":[{"channel":"proto","data":${data}}]}`), 400)
  }
  t.equal((await postJson(gateway, '/channels/proto', '{"constructor":1,"prototype":2,"proto":3}')).status, 201, 'the words alone are fine')
  await stillServing(t, gateway)
})

t.test('a token under an encoded access_token name, or in a URL the router refuses, never reaches a log or an answer', async (t) => {
  const { gateway, lines } = await loggingGateway(t)
  const { baseUrl } = gateway
  const token = gateway.token({ subscribe: ['elsewhere'] })

  // The query parser decodes names: these reach the route as access_token,
  // and the token is read (403: it does not cover the channel).
  for (const name of ['access%5Ftoken', '%61ccess_token', '%61ccess%5ftoken', 'access_token']) {
    await errorBody(t, await fetch(`${baseUrl}/events?channel=a&${name}=${token}`), 403)
  }
  await errorBody(t, await fetch(`${baseUrl}/events?channel=a&access%5Ftoken=${token}x&%zz=1`), 401)

  // The router cannot decode the path: before, Fastify's own 400 repeated
  // the URL, token and all, without the API's headers.
  const raw = await rawExchange(baseUrl, `GET /events%zz?channel=a&access_token=${token} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`)
  const [head = '', body = ''] = raw.split('\r\n\r\n')
  t.match(head, /^HTTP\/1\.1 400 /, 'a 400')
  t.match(head, /\r\nx-content-type-options: nosniff\r\n/i, 'with the API\'s headers')
  t.match(head, /\r\nstrict-transport-security: /i)
  t.match(head, /\r\ncontent-type: application\/json/i)
  const answer = JSON.parse(body) as Record<string, unknown>
  t.same(Object.keys(answer).sort(), ['error', 'message', 'statusCode'], 'in the API\'s error format')
  t.match(answer, { statusCode: 400, error: 'Bad Request', message: /URL/ })
  t.notMatch(body, /eyJ|events%zz|%zz/, 'repeating nothing of the URL')

  // A token under a name or separator the query parser does not read as
  // access_token: an answer that quotes a channel name masks it, as the log does.
  const misspelled = await fetch(`${baseUrl}/events?channel=a;access_token=${token}&access_token[]=${token}`)
  t.notMatch(JSON.stringify(await errorBody(t, misspelled, 400)), /eyJ/, 'a quoted channel name carries no token')

  // What Node refuses before Fastify (not HTTP at all) is answered in the
  // API's format and headers too.
  const junk = await rawExchange(baseUrl, `\u0001\u0002 ${token}\r\n\r\n`)
  const [junkHead = '', junkBody = ''] = junk.split('\r\n\r\n')
  t.match(junkHead, /^HTTP\/1\.1 400 /, 'bytes that are not HTTP: a 400')
  t.match(junkHead, /\r\nx-content-type-options: nosniff\r\n/i, 'with the API\'s headers')
  t.same(Object.keys(JSON.parse(junkBody) as Record<string, unknown>).sort(), ['error', 'message', 'statusCode'], 'in the API\'s error format')
  t.notMatch(junkBody, /eyJ/)

  // Fastify's parser errors quoted the body; ours say what is wrong.
  const notJson = await fetch(`${baseUrl}/events`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${gateway.token({ publish: ['*'] })}` }, body: token })
  t.notMatch(JSON.stringify(await errorBody(t, notJson, 400)), /eyJ/, 'a body that is not JSON is not quoted')
  const empty = await fetch(`${baseUrl}/events`, { method: 'POST', headers: { 'content-type': 'application/json' }, body: '' })
  await errorBody(t, empty, 400)

  const log = lines.join('')
  t.match(log, /\[redacted\]/, 'the parameters were logged, redacted')
  t.notMatch(log, token.slice(0, 40), 'no token in the logs')
  t.notMatch(log, token.split('.')[2] as string, 'nor its signature')
  await stillServing(t, gateway)
})
