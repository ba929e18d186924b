import { randomBytes } from 'node:crypto'
import { readFile } from 'node:fs/promises'
import t from 'tap'
import { connect, errorBody, JWT_SECRET, openStream, publish, publishedWithSql, startGateway, type StreamClient, streamUrl, type TestGateway, waitFor, within } from './helper.js'
import { loggingGateway, rawExchange, stillServing } from './security-helper.js'

const bearer = (gateway: TestGateway, claims = { subscribe: ['*'], publish: ['*'] }): Record<string, string> =>
  ({ authorization: `Bearer ${gateway.token(claims)}` })

/** The status code of a raw HTTP answer, and its body. */
function parseAnswer (raw: string): { status: number, body: string } {
  const status = Number(/^HTTP\/1\.1 (\d{3})/.exec(raw)?.[1] ?? 0)
  return { status, body: raw.slice(raw.indexOf('\r\n\r\n') + 4) }
}

t.test('security headers on every answer, a CSP for the demo page', async (t) => {
  const gateway = await startGateway(t)
  for (const path of ['/', '/demo.js', '/healthz', '/nope']) {
    const res = await fetch(gateway.baseUrl + path)
    t.equal(res.headers.get('x-content-type-options'), 'nosniff', `nosniff on ${path}`)
    t.ok(res.headers.get('x-frame-options') !== null, `x-frame-options on ${path}`)
    await res.arrayBuffer()
  }
  const page = await fetch(`${gateway.baseUrl}/`)
  const csp = page.headers.get('content-security-policy') ?? ''
  for (const directive of ["default-src 'self'", "script-src 'self'", "style-src 'self'", "connect-src 'self'", "object-src 'none'", "frame-ancestors 'none'"]) {
    t.match(csp, directive, directive)
  }
  t.notMatch(csp, /unsafe-inline|unsafe-eval/, 'nothing inline')

  // The API's answers carry the headers that mean something outside a
  // document, and not the CSP and its kin.
  const token = gateway.token({ publish: ['*'], subscribe: ['*'] })
  const apiAnswers: Array<[string, Response]> = [
    ['GET /healthz', await fetch(`${gateway.baseUrl}/healthz`)],
    ['GET /readyz', await fetch(`${gateway.baseUrl}/readyz`)],
    ['POST /channels/:channel', await publish(gateway, 'headers', 'x')],
    ['POST /channels/:channel refused', await fetch(`${gateway.baseUrl}/channels/headers`, { method: 'POST', body: 'x' })],
    ['POST /events', await fetch(`${gateway.baseUrl}/events`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` }, body: JSON.stringify({ events: [{ channel: 'headers', data: 1 }] }) })],
    ['POST /tickets', await fetch(`${gateway.baseUrl}/tickets`, { method: 'POST', headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` }, body: JSON.stringify({ channels: ['headers'] }) })],
    ['GET /status', await fetch(`${gateway.baseUrl}/status`)]
  ]
  for (const [route, res] of apiAnswers) {
    t.equal(res.headers.get('x-content-type-options'), 'nosniff', `nosniff on ${route} (${res.status})`)
    t.equal(res.headers.get('strict-transport-security'), 'max-age=31536000; includeSubDomains', `HSTS on ${route}`)
    t.equal(res.headers.get('cross-origin-resource-policy'), 'same-origin', `CORP on ${route}`)
    t.equal(res.headers.get('x-frame-options'), 'SAMEORIGIN', `x-frame-options on ${route}`)
    t.equal(res.headers.get('content-security-policy'), null, `no CSP on ${route}`)
    await res.arrayBuffer()
  }
  const html = await page.text()
  t.notMatch(html, /<script(?![^>]*\bsrc=)[^>]*>|\sstyle=|\son[a-z]+=/i, 'the page has no inline script, style or handler the CSP would block')
})

t.test('streams are never compressed, carry X-Accel-Buffering: no and the security headers', async (t) => {
  const gateway = await startGateway(t)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['plain']), { ...bearer(gateway), 'accept-encoding': 'gzip, deflate, br' })
  t.equal(stream.response.status, 200)
  t.equal(stream.response.headers.get('content-encoding'), null, 'no content encoding')
  t.equal(stream.response.headers.get('x-accel-buffering'), 'no')
  t.equal(stream.response.headers.get('x-content-type-options'), 'nosniff')
})

t.test('CORS: only listed origins get CORS headers, with credentials', async (t) => {
  const gateway = await startGateway(t, { CORS_ORIGINS: 'https://app.example.com, http://localhost:5173' })
  const listed = await fetch(`${gateway.baseUrl}/healthz`, { headers: { origin: 'https://app.example.com' } })
  t.equal(listed.headers.get('access-control-allow-origin'), 'https://app.example.com')
  t.equal(listed.headers.get('access-control-allow-credentials'), 'true')
  t.match(listed.headers.get('vary'), /origin/i)
  const other = await fetch(`${gateway.baseUrl}/healthz`, { headers: { origin: 'https://evil.example.com' } })
  t.equal(other.headers.get('access-control-allow-origin'), null, 'no allow-origin for another origin')
  t.equal(other.headers.get('access-control-allow-credentials'), null, 'nor credentials')

  const preflight = await fetch(`${gateway.baseUrl}/channels/x`, {
    method: 'OPTIONS',
    headers: { origin: 'http://localhost:5173', 'access-control-request-method': 'POST', 'access-control-request-headers': 'authorization, content-type' }
  })
  t.equal(preflight.status, 204)
  t.equal(preflight.headers.get('access-control-allow-origin'), 'http://localhost:5173')
  t.match(preflight.headers.get('access-control-allow-headers'), /authorization/)
  t.match(preflight.headers.get('access-control-allow-methods'), /POST/)
  const refused = await fetch(`${gateway.baseUrl}/channels/x`, {
    method: 'OPTIONS',
    headers: { origin: 'https://evil.example.com', 'access-control-request-method': 'POST' }
  })
  t.equal(refused.headers.get('access-control-allow-origin'), null, 'no preflight for another origin')
  await refused.arrayBuffer()

  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['cors']), { ...bearer(gateway), origin: 'https://app.example.com' })
  t.equal(stream.response.headers.get('access-control-allow-origin'), 'https://app.example.com', 'the stream carries them too')

  const none = await startGateway(t)
  const res = await fetch(`${none.baseUrl}/healthz`, { headers: { origin: 'https://app.example.com' } })
  t.equal(res.headers.get('access-control-allow-origin'), null, 'no origin is allowed by default')
})

t.test('body size limits answer 413', async (t) => {
  const gateway = await startGateway(t, { MAX_PAYLOAD_BYTES: '100', MAX_BATCH_BYTES: '1024' })
  const headers = { ...bearer(gateway), 'content-type': 'text/plain' }
  await errorBody(t, await fetch(`${gateway.baseUrl}/channels/x`, { method: 'POST', headers, body: 'x'.repeat(101) }), 413)
  t.equal((await fetch(`${gateway.baseUrl}/channels/x`, { method: 'POST', headers, body: 'x'.repeat(100) })).status, 201)
  const batch = JSON.stringify({ events: [{ channel: 'x', data: 'y'.repeat(1100) }] })
  await errorBody(t, await fetch(`${gateway.baseUrl}/events`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: batch }), 413)
  const ticket = JSON.stringify({ channels: Array.from({ length: 2000 }, (_, i) => `channel.${i}`) })
  await errorBody(t, await fetch(`${gateway.baseUrl}/tickets`, { method: 'POST', headers: { ...headers, 'content-type': 'application/json' }, body: ticket }), 413)
  await stillServing(t, gateway)
})

t.test('channels per stream (default 32) and events per batch answer 400', async (t) => {
  const gateway = await startGateway(t, { MAX_BATCH_EVENTS: '3' })
  const channels = Array.from({ length: 33 }, (_, i) => `c${i}`)
  const body = await errorBody(t, await fetch(streamUrl(gateway.baseUrl, channels), { headers: bearer(gateway) }), 400)
  t.match(body.message, /at most 32 channels/)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, channels.slice(0, 32)), bearer(gateway))
  t.equal(stream.response.status, 200, '32 channels are fine')
  stream.close()
  const batch = async (n: number): Promise<Response> => await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { ...bearer(gateway), 'content-type': 'application/json' },
    body: JSON.stringify({ events: Array.from({ length: n }, () => ({ channel: 'b', data: 'x' })) })
  })
  t.match((await errorBody(t, await batch(4), 400)).message, /at most 3 events/)
  t.equal((await batch(3)).status, 201)
})

t.test('streams per client address (429) and in total (503) on this instance', async (t) => {
  const gateway = await startGateway(t, { MAX_STREAMS_PER_IP: '2', MAX_STREAMS: '3', TRUST_PROXY: 'true' })
  const from = (ip: string): Record<string, string> => ({ ...bearer(gateway), 'x-forwarded-for': ip })
  const url = streamUrl(gateway.baseUrl, ['limited'])
  const a1 = await openStream(t, url, from('10.0.0.1'))
  await openStream(t, url, from('10.0.0.1'))
  t.equal(a1.response.status, 200)
  await errorBody(t, await fetch(url, { headers: from('10.0.0.1') }), 429)
  const b1 = await openStream(t, url, from('10.0.0.2'))
  t.equal(b1.response.status, 200, 'another address has its own share')
  await errorBody(t, await fetch(url, { headers: from('10.0.0.3') }), 503)
  t.equal(gateway.app.streamLimits.total, 3)

  // Refused requests hold no slot.
  await errorBody(t, await fetch(url, { headers: { 'x-forwarded-for': '10.0.0.1' } }), 429)
  a1.close()
  await waitFor(() => gateway.app.streamLimits.total === 2, 'the closed stream to free its slot')
  await errorBody(t, await fetch(url, { headers: { 'x-forwarded-for': '10.0.0.3' } }), 401)
  t.equal(gateway.app.streamLimits.total, 2, 'a refused token gives its slot back')
  const c1 = await openStream(t, url, from('10.0.0.3'))
  t.equal(c1.response.status, 200, 'the freed slot is usable')
})

t.test('publish rate per token, or per address without one: 429', async (t) => {
  const gateway = await startGateway(t, { PUBLISH_RATE_MAX: '3', PUBLISH_RATE_WINDOW_MS: '60000' })
  const token = gateway.token({ publish: ['*'] })
  for (let i = 0; i < 3; i++) t.equal((await publish(gateway, 'rate', `ok ${i}`, { token })).status, 201)
  const limited = await publish(gateway, 'rate', 'too many', { token })
  const body = await errorBody(t, limited, 429)
  t.match(body.message, /at most 3/)
  t.ok(limited.headers.get('retry-after') !== null, 'Retry-After says when')
  const batch = await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { authorization: `Bearer ${token}`, 'content-type': 'application/json' },
    body: JSON.stringify({ events: [{ channel: 'rate', data: 'batch' }] })
  })
  await errorBody(t, batch, 429)
  t.pass('both publish routes share one budget')
  const other = gateway.token({ publish: ['*'], sub: 'other' })
  t.equal((await publish(gateway, 'rate', 'another token', { token: other })).status, 201, 'another token has its own budget')
  const ticket = await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { authorization: `Bearer ${gateway.token({ subscribe: ['*'] })}`, 'content-type': 'application/json' },
    body: JSON.stringify({ channels: ['rate'] })
  })
  t.equal(ticket.status, 201, 'tickets have a budget of their own')
  const anonymous = async (): Promise<Response> => await fetch(`${gateway.baseUrl}/channels/rate`, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'x' })
  for (let i = 0; i < 3; i++) t.equal((await anonymous()).status, 401)
  await errorBody(t, await anonymous(), 429)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['rate']), bearer(gateway))
  t.equal(stream.response.status, 200, 'streams are not rate-limited by publishing')
})

t.test('header and URL sizes', async (t) => {
  const gateway = await startGateway(t, { MAX_HEADER_BYTES: '4096', MAX_URL_BYTES: '1024' })
  const big = await rawExchange(gateway.baseUrl, `GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: ${'a'.repeat(5000)}\r\n\r\n`)
  const bigAnswer = parseAnswer(big)
  t.equal(bigAnswer.status, 431)
  t.match(JSON.parse(bigAnswer.body), { statusCode: 431, error: /./, message: /./ })
  const longUrl = await fetch(`${gateway.baseUrl}/healthz?pad=${'p'.repeat(2000)}`)
  await errorBody(t, longUrl, 414)
  t.equal(longUrl.headers.get('x-content-type-options'), 'nosniff', 'refused before its route\'s hooks, an API answer keeps its security headers')
  t.equal(longUrl.headers.get('strict-transport-security'), 'max-age=31536000; includeSubDomains')
  const channels = Array.from({ length: 200 }, (_, i) => `channel${i}`)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, channels), { headers: bearer(gateway) }), 414)
  await stillServing(t, gateway)
})

t.test('errors are terse: no token, path, stack or SQL in them', async (t) => {
  const gateway = await startGateway(t)
  const token = gateway.token({ subscribe: ['*'] })
  const missing = await fetch(`${gateway.baseUrl}/no/such/path?access_token=${token}`)
  const body = await errorBody(t, missing, 404)
  t.notMatch(JSON.stringify(body), token)
  t.notMatch(JSON.stringify(body), /no\/such/)
  const bad = await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a'], { access_token: `${token}x` })), 401)
  t.notMatch(JSON.stringify(bad), token.slice(0, 30))
  for (const res of [
    await fetch(`${gateway.baseUrl}/events`, { method: 'POST', headers: { ...bearer(gateway), 'content-type': 'application/json' }, body: '{"events": [' }),
    await fetch(`${gateway.baseUrl}/channels/a'b`, { method: 'POST', headers: { ...bearer(gateway), 'content-type': 'text/plain' }, body: 'x' })
  ]) {
    const text = await res.text()
    t.ok(res.status >= 400 && res.status < 500, `a 4xx (${res.status})`)
    t.notMatch(text, /at .*\.(ts|js):\d+|SELECT|INSERT|sse_gateway|pg_notify/i, 'no stack trace nor SQL')
  }
})

t.test('resuming from the id of an event on a channel the client may not read reveals nothing', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const secretId = await publishedWithSql(db, 'secret', 'hidden')
  const mineId = await publishedWithSql(db, 'mine', 'visible')
  const headers = { authorization: `Bearer ${gateway.token({ subscribe: ['mine'] })}` }
  const opened = async (lastEventId: string): Promise<StreamClient> => {
    const stream = await openStream(t, streamUrl(gateway.baseUrl, ['mine']), { ...headers, 'last-event-id': lastEventId })
    t.equal(stream.response.status, 200)
    await within(stream.until(() => stream.control.length > 0 && stream.events.length > 0, 'open and one event'), 'the replay')
    return stream
  }
  const fromSecret = await opened(secretId)
  const fromZero = await opened('0')
  t.same(fromSecret.events, [{ id: mineId, event: 'mine', data: 'visible' }], 'only the readable event')
  t.same(fromZero.events, fromSecret.events, 'as from any other id')
  t.same(fromSecret.control.map((e) => e.event), ['gateway/open'], 'no error and no gateway/missed')
  t.notOk([...fromSecret.events, ...fromSecret.control].some((e) => e.data.includes('hidden') || e.event === 'secret'))
})

t.test('hostile input is refused cleanly and never stops delivery', async (t) => {
  const gateway = await startGateway(t)
  // A stream open through it all must get every event published meanwhile.
  const witness = await openStream(t, streamUrl(gateway.baseUrl, ['witness']), bearer(gateway))
  const auth = bearer(gateway)
  const post = async (path: string, contentType: string | undefined, body: string | Buffer): Promise<Response> => {
    const headers: Record<string, string> = { ...auth }
    if (contentType !== undefined) headers['content-type'] = contentType
    return await fetch(gateway.baseUrl + path, { method: 'POST', headers, body: typeof body === 'string' ? body : new Uint8Array(body) })
  }
  let sent = 0
  const mark = async (): Promise<void> => {
    t.equal((await publish(gateway, 'witness', `mark ${sent++}`)).status, 201)
  }

  await t.test('malformed JSON', async (t) => {
    for (const body of ['{', '{"events": [}', 'nul', '\u0000', '{"events": [{"channel": "a", "data": 1}]']) {
      await errorBody(t, await post('/channels/a', 'application/json', body), 400)
      await errorBody(t, await post('/events', 'application/json', body), 400)
    }
    await errorBody(t, await post('/events', 'application/json', '{"events": [{"channel": "a", "data": 1}], "__proto__": {"x": 1}}'), 400)
    await errorBody(t, await post('/events', 'application/json', '{"events": "not a list"}'), 400)
    await errorBody(t, await post('/events', 'application/json', '{"events": [{"channel": "a"}]}'), 400)
    await mark()
  })
  await t.test('wrong content types and charsets', async (t) => {
    await errorBody(t, await post('/channels/a', 'application/xml', '<x/>'), 415)
    await errorBody(t, await post('/channels/a', 'multipart/form-data; boundary=x', '--x--'), 415)
    await errorBody(t, await post('/events', 'text/plain', '{"events": []}'), 415)
    await errorBody(t, await post('/channels/a', 'text/plain; charset=iso-8859-1', 'caf\u00e9'), 415)
    await errorBody(t, await post('/channels/a', 'application/json; charset=utf-16', '"x"'), 415)
    t.equal((await post('/channels/witness', 'text/plain; charset=UTF-8', `mark ${sent++}`)).status, 201, 'charset=utf-8 is fine')
    await mark()
  })
  await t.test('invalid UTF-8 and unpaired surrogates', async (t) => {
    const invalid = [Buffer.from([0xff, 0xfe, 0x41]), Buffer.from([0x61, 0xc3]), Buffer.from([0xed, 0xa0, 0x80]), Buffer.from([0xc0, 0xaf])]
    for (const bytes of invalid) {
      await errorBody(t, await post('/channels/a', 'text/plain', bytes), 400)
      await errorBody(t, await post('/channels/a', 'application/json', Buffer.concat([Buffer.from('"'), bytes, Buffer.from('"')])), 400)
      await errorBody(t, await post('/events', 'application/json', Buffer.concat([Buffer.from('{"events":[{"channel":"a","data":"'), bytes, Buffer.from('"}]}')])), 400)
    }
    await errorBody(t, await post('/events', 'application/json', '{"events":[{"channel":"a","data":"x\\udfff"}]}'), 400)
    await mark()
  })
  await t.test('weird headers', async (t) => {
    for (const id of ['-1', '1e3', '0x10', ' ', '9'.repeat(30)]) {
      await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['a']), { headers: { ...auth, 'last-event-id': id } }), 400)
    }
    const answers = await Promise.all([
      'Authorization: Bearer \xff\xfe\x80\r\n',
      'Authorization: Bearer a.b.c\r\nAuthorization: Bearer d.e.f\r\n',
      'Last-Event-ID: 1\r\nLast-Event-ID: 2\r\n',
      'Cookie: pgsse_token=\xff; pgsse_token=%zz\r\n',
      `X-Many: ${'x,'.repeat(1000)}\r\n`
    ].map(async (header) => parseAnswer(await rawExchange(gateway.baseUrl, Buffer.from(`GET /events?channel=a HTTP/1.1\r\nHost: x\r\n${header}Connection: close\r\n\r\n`, 'latin1')))))
    for (const answer of answers) t.ok(answer.status >= 400 && answer.status < 500, `a clean 4xx (${answer.status})`)
    await mark()
  })
  await t.test('junk bytes on the socket', async (t) => {
    for (const junk of [
      Buffer.from([0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc]),
      'GARBAGE\r\n\r\n',
      'GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n',
      'POST /channels/a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\nzz\r\nnope\r\n',
      'POST /channels/a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n',
      'GET /events HTTP/1.1\r\nHost: x\r\nX\u0000Bad: 1\r\n\r\n'
    ]) {
      const answer = parseAnswer(await rawExchange(gateway.baseUrl, junk))
      t.equal(answer.status, 400, `400 for ${JSON.stringify(String(junk).slice(0, 24))}`)
    }
    await mark()
  })
  await t.test('clients that open a stream and vanish', async (t) => {
    const request = `GET /events?channel=vanish&channel=witness HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth.authorization}\r\n\r\n`
    const half = `POST /channels/witness HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth.authorization}\r\nContent-Type: text/plain\r\nContent-Length: 100\r\n\r\nonly part`
    await Promise.all(Array.from({ length: 20 }, async (_, i) => await rawExchange(gateway.baseUrl, i % 2 === 0 ? request : half, 1 + (i % 5) * 10)))
    await waitFor(() => gateway.app.streamLimits.total === 1 && gateway.app.streams.size === 1, 'the vanished streams to be gone')
    await waitFor(() => !gateway.app.listener.channels.has('vanish'), 'the channel to be UNLISTENed')
    t.pass('only the witness stream is left, and its channels')
    await mark()
  })
  await t.test('HEAD on a stream opens none', async (t) => {
    const answer = parseAnswer(await rawExchange(gateway.baseUrl, `HEAD /events?channel=witness HTTP/1.1\r\nHost: x\r\nAuthorization: ${auth.authorization}\r\nConnection: close\r\n\r\n`))
    t.equal(answer.status, 404)
    t.equal(gateway.app.streamLimits.total, 1, 'only the witness stream is open')
    await mark()
  })
  await t.test('path traversal on static files', async (t) => {
    const pkg = await readFile(new URL('../package.json', import.meta.url), 'utf8')
    for (const path of ['/../package.json', '/%2e%2e/package.json', '/..%2fpackage.json', '/%2e%2e%2f%2e%2e%2fetc%2fpasswd', '/public/../../package.json', '/..\\package.json', '/%c0%ae%c0%ae/package.json', '/demo.js%00.html', '//etc/passwd']) {
      const answer = parseAnswer(await rawExchange(gateway.baseUrl, `GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n`))
      t.ok(answer.status >= 400 && answer.status < 500, `${path}: ${answer.status}`)
      t.notOk(answer.body.includes('"name": "pg-sse-gateway"') || answer.body.includes(pkg.slice(0, 40)) || answer.body.includes('root:'), `${path}: no file outside public/`)
    }
    await mark()
  })

  const marks = Array.from({ length: sent }, (_, i) => `mark ${i}`)
  const events = await within(witness.take(sent), `${sent} marks`)
  t.same(events.map((e) => e.data), marks, 'the witness stream got every event, in order')
  t.notOk(witness.ended, 'and is still open')
  await stillServing(t, gateway)
})

t.test('tokens and tickets never reach the logs, whatever the answer', async (t) => {
  const { gateway: { app }, lines } = await loggingGateway(t)
  const token = app.jwt.sign({ subscribe: ['*'], publish: ['*'] })
  const ticketAnswer = await app.inject({ method: 'POST', url: '/tickets', headers: { authorization: `Bearer ${token}` }, payload: { channels: ['a'] } })
  const { ticket } = ticketAnswer.json<{ ticket: string }>()
  t.equal(ticketAnswer.statusCode, 201)
  t.notMatch(ticketAnswer.body, token, 'the ticket answer does not repeat the token')
  const answers = [
    await app.inject(`/nowhere?access_token=${token}`),
    await app.inject(`/events?channel=b&access_token=${ticket}`),
    await app.inject(`/events?channel=a&access_token=${ticket}`),
    await app.inject(`/events?channel=a&access_token=${token}x`),
    await app.inject({ url: '/channels/a', method: 'POST', headers: { cookie: `pgsse_token=${token}`, 'content-type': 'text/plain' }, payload: 'x' }),
    await app.inject({ url: `/channels/a?access_token=${token}`, method: 'POST', headers: { 'content-type': 'text/plain' }, payload: 'x'.repeat(70_000) })
  ]
  t.same(answers.map((a) => a.statusCode), [404, 403, 401, 401, 403, 413])
  const log = lines.join('')
  t.ok(log.length > 0, 'something was logged')
  t.notMatch(log, token.slice(0, 40), 'no token in the logs')
  t.notMatch(log, ticket.slice(4), 'no ticket in the logs')
  t.notMatch(log, JWT_SECRET, 'no secret in the logs')
  for (const answer of answers) t.notMatch(answer.body, /tkt_|eyJ/, 'no token nor ticket in an answer')
})

/** The same token written other ways that verify alike: the scheme's case, the whitespace, the signature's last base64url character. */
function respellings (token: string): string[] {
  const dot = token.lastIndexOf('.')
  const signature = token.slice(dot + 1)
  const alphabet = 'ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_'
  // A 32-byte signature is 43 characters: the last carries 4 bits and 2
  // unused ones, which decoders ignore.
  const last = alphabet.indexOf(signature.slice(-1))
  const endings = [1, 2, 3].map((bits) => alphabet[(last & ~3) | bits] as string)
  return [
    `Bearer ${token}`,
    `bearer ${token}`,
    `BEARER ${token}`,
    `Bearer    ${token}`,
    `Bearer\t${token}`,
    ...endings.map((ending) => `Bearer ${token.slice(0, -1)}${ending}`)
  ]
}

async function publishAs (gateway: TestGateway, authorization: string, channel = 'rate', headers: Record<string, string> = {}): Promise<Response> {
  return await fetch(`${gateway.baseUrl}/channels/${channel}`, { method: 'POST', headers: { 'content-type': 'text/plain', authorization, ...headers }, body: 'x' })
}

t.test('rate limits count the client, not the spelling of its token', async (t) => {
  const budget = respellings('header.claims.signature').length
  const gateway = await startGateway(t, { PUBLISH_RATE_MAX: String(budget), AUTH_FAILURE_MAX: '1000' })
  // Without sub: the token is the client.
  const spellings = respellings(gateway.token({ publish: ['*'], subscribe: ['spelled'] }))
  for (const spelling of spellings) t.equal((await publishAs(gateway, spelling)).status, 201, `${JSON.stringify(spelling.slice(0, 12))}…${spelling.slice(-3)} is a valid token`)
  for (const spelling of spellings) await errorBody(t, await publishAs(gateway, spelling), 429)
  t.pass('every spelling spent the one budget')

  // Tokens of one subject are one client; tokens that do not verify count as their address.
  const alice = { sub: 'alice', publish: ['*'] }
  const first = gateway.token(alice)
  for (let i = 0; i < budget; i++) t.equal((await publishAs(gateway, `Bearer ${first}`)).status, 201)
  await errorBody(t, await publishAs(gateway, `Bearer ${gateway.token(alice, { expiresIn: '2h' })}`), 429)
  t.pass('another token of the same subject shares its budget')
  const forged = (i: number): string => `Bearer ${first.slice(0, first.lastIndexOf('.') + 1)}${'A'.repeat(42)}${'BCDEFGHIJKLMNOP'[i % 15] as string}`
  for (let i = 0; i < budget; i++) await errorBody(t, await publishAs(gateway, forged(i)), 401)
  await errorBody(t, await publishAs(gateway, forged(budget)), 429)
  t.pass('forged tokens share their address\'s budget')
  await stillServing(t, gateway)
})

t.test('publishing and tickets have budgets of their own, for one token', async (t) => {
  const gateway = await startGateway(t, { PUBLISH_RATE_MAX: '2' })
  const authorization = `Bearer ${gateway.token({ publish: ['*'], subscribe: ['*'] })}`
  const ticket = async (): Promise<Response> => await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { authorization, 'content-type': 'application/json' },
    body: JSON.stringify({ channels: ['rate'] })
  })
  for (let i = 0; i < 2; i++) t.equal((await publishAs(gateway, authorization)).status, 201)
  await errorBody(t, await publishAs(gateway, authorization), 429)
  for (let i = 0; i < 2; i++) t.equal((await ticket()).status, 201, 'tickets are not spent by publishing')
  await errorBody(t, await ticket(), 429)
})

t.test('Idempotency-Keys are the client\'s own: tokens without sub never share them', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const once = async (authorization: string, key: string): Promise<{ status: number, id: string }> => {
    const res = await publishAs(gateway, authorization, 'once', { 'idempotency-key': key })
    return { status: res.status, id: ((await res.json()) as { id: string }).id }
  }
  const a = gateway.token({ publish: ['*'] })
  const b = gateway.token({ publish: ['*'] }, { expiresIn: '2h' })
  const first = await once(`Bearer ${a}`, 'k1')
  t.equal(first.status, 201)
  const other = await once(`Bearer ${b}`, 'k1')
  t.equal(other.status, 201)
  t.not(other.id, first.id, 'another token without sub publishes its own event')
  for (const spelling of respellings(a)) t.same(await once(spelling, 'k1'), first, 'the same token, however spelled, gets its first id back')

  const alice = await once(`Bearer ${gateway.token({ sub: 'alice', publish: ['*'] })}`, 'k2')
  t.same(await once(`Bearer ${gateway.token({ sub: 'alice', publish: ['*'] }, { expiresIn: '2h' })}`, 'k2'), alice, 'tokens of one subject are one client')
  const elsewhere = await once(`Bearer ${gateway.token({ sub: 'alice', iss: 'https://other.example.com', publish: ['*'] } as Parameters<TestGateway['token']>[0])}`, 'k2')
  t.not(elsewhere.id, alice.id, 'the same sub from another issuer is another client')
  const blank = await once(`Bearer ${gateway.token({ sub: '', publish: ['*'] })}`, 'k3')
  const blankToo = await once(`Bearer ${gateway.token({ sub: '', publish: ['*'] }, { expiresIn: '2h' })}`, 'k3')
  t.not(blankToo.id, blank.id, 'an empty sub names nobody: two such tokens are two clients')
  const { rows } = await db.query<{ n: number }>("SELECT count(*)::int AS n FROM sse_gateway.events WHERE channel = 'once'")
  t.equal(rows[0]?.n, 6, 'six clients, six events')
})

t.test('an address that keeps failing is refused before its attempts cost anything', async (t) => {
  const gateway = await startGateway(t, { AUTH_FAILURE_MAX: '5', TRUST_PROXY: 'true' })
  const from = (address: string): Record<string, string> => ({ 'x-forwarded-for': address })
  const issued = await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { ...bearer(gateway), 'content-type': 'application/json' },
    body: JSON.stringify({ channels: ['guarded'] })
  })
  const { ticket } = await issued.json() as { ticket: string }
  const guess = (address: string, accessToken: string): Promise<Response> =>
    fetch(streamUrl(gateway.baseUrl, ['guarded'], { access_token: accessToken }), { headers: from(address) })

  for (let i = 0; i < 5; i++) await errorBody(t, await guess('10.9.9.9', `tkt_${randomBytes(32).toString('base64url')}`), 401)
  const refused = await guess('10.9.9.9', `tkt_${randomBytes(32).toString('base64url')}`)
  const body = await errorBody(t, refused, 429)
  t.match(body.message, /too many failed/)
  t.match(refused.headers.get('retry-after'), /^[1-9][0-9]*$/, 'with Retry-After')
  await errorBody(t, await guess('10.9.9.9', ticket), 429)
  await errorBody(t, await publishAs(gateway, bearer(gateway).authorization as string, 'guarded', from('10.9.9.9')), 429)
  t.pass('every token or ticket of that address is refused, unchecked')
  const elsewhere = await openStream(t, streamUrl(gateway.baseUrl, ['guarded'], { access_token: ticket }), from('10.9.9.10'))
  t.equal(elsewhere.response.status, 200, 'the refused attempt did not spend the ticket, and other addresses go on')

  // Tokens that do not verify count alike, on every route that checks one.
  const forged = `Bearer ${gateway.token({ publish: ['*'] }).slice(0, -4)}AAAA`
  for (let i = 0; i < 3; i++) await errorBody(t, await publishAs(gateway, forged, 'guarded', from('10.9.9.11')), 401)
  await errorBody(t, await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: forged, ...from('10.9.9.11') } }), 401)
  await errorBody(t, await fetch(`${gateway.baseUrl}/metrics`, { headers: { authorization: forged, ...from('10.9.9.11') } }), 401)
  await errorBody(t, await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: `Bearer ${gateway.token({ admin: true })}`, ...from('10.9.9.11') } }), 429)

  // The operator's status stream and its tickets too.
  for (let i = 0; i < 5; i++) {
    await errorBody(t, await fetch(`${gateway.baseUrl}/status/stream?access_token=tkt_${randomBytes(32).toString('base64url')}`, { headers: from('10.9.9.12') }), 401)
  }
  await errorBody(t, await fetch(`${gateway.baseUrl}/status/tickets`, { method: 'POST', headers: { authorization: `Bearer ${gateway.token({ admin: true })}`, ...from('10.9.9.12') } }), 429)
  await stillServing(t, gateway)
})

t.test('a CORS preflight allows the headers EventSource polyfills send, for listed origins only', async (t) => {
  const gateway = await startGateway(t, { CORS_ORIGINS: 'https://app.example.com' })
  const preflight = async (origin: string): Promise<Response> => await fetch(streamUrl(gateway.baseUrl, ['cors']), {
    method: 'OPTIONS',
    headers: { origin, 'access-control-request-method': 'GET', 'access-control-request-headers': 'accept,cache-control,last-event-id,x-requested-with' }
  })
  const allowed = await preflight('https://app.example.com')
  t.equal(allowed.status, 204)
  t.equal(allowed.headers.get('access-control-allow-origin'), 'https://app.example.com')
  const headers = (allowed.headers.get('access-control-allow-headers') ?? '').toLowerCase().split(/\s*,\s*/)
  for (const header of ['accept', 'cache-control', 'last-event-id', 'x-requested-with']) t.ok(headers.includes(header), `${header} is allowed`)
  const other = await preflight('https://evil.example.com')
  t.equal(other.headers.get('access-control-allow-origin'), null, 'another origin gets no preflight')
  t.equal(other.headers.get('access-control-allow-headers'), null, 'nor allowed headers')
  await other.arrayBuffer()
  // What a polyfill then sends: the stream opens, for the listed origin.
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['cors']), { ...bearer(gateway), origin: 'https://app.example.com', accept: 'text/event-stream', 'cache-control': 'no-cache', 'x-requested-with': 'XMLHttpRequest' })
  t.equal(stream.response.status, 200)
  t.equal(stream.response.headers.get('access-control-allow-origin'), 'https://app.example.com')
})
