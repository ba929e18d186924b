import { createHash } from 'node:crypto'
import { createSigner } from 'fast-jwt'
import t from 'tap'
import { connect, errorBody, JWT_SECRET, openStream, publish, startGateway, streamUrl, type Test, type TestGateway, within } from '../helper.js'
import { epoch } from '../security-helper.js'

async function requestTicket (gateway: TestGateway, channels: unknown, token: string | null): Promise<Response> {
  const headers: Record<string, string> = { 'content-type': 'application/json' }
  if (token !== null) headers.authorization = `Bearer ${token}`
  return await fetch(`${gateway.baseUrl}/tickets`, { method: 'POST', headers, body: JSON.stringify({ channels }) })
}

async function ticketFor (t: Test, gateway: TestGateway, channels: string[], token = gateway.token({ subscribe: ['*'] })): Promise<string> {
  const res = await requestTicket(gateway, channels, token)
  const body = await res.json() as { ticket: string, expiresIn: number, channels: string[] }
  t.equal(res.status, 201, `a ticket for ${channels.join(', ')}`)
  return body.ticket
}

t.test('a ticket opens one stream, once, on the channels it names', async (t) => {
  const gateway = await startGateway(t, { TICKET_TTL_SECONDS: '20' })
  const token = gateway.token({ subscribe: ['orders.*'] })
  const res = await requestTicket(gateway, ['orders.eu', 'orders.us'], token)
  t.equal(res.status, 201)
  const body = await res.json() as { ticket: string, expiresIn: number, channels: string[] }
  t.match(body, { ticket: /^tkt_[A-Za-z0-9_-]{43}$/, expiresIn: 20, channels: ['orders.eu', 'orders.us'] })

  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders.eu'], { access_token: body.ticket }))
  t.equal(stream.response.status, 200, 'the ticket opens a stream on a subset of its channels')
  t.equal((await publish(gateway, 'orders.eu', 'via ticket')).status, 201)
  t.equal((await within(stream.take(1), 'the event'))[0]?.data, 'via ticket')

  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu'], { access_token: body.ticket })), 401)

  const narrow = await ticketFor(t, gateway, ['orders.eu'], token)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu', 'orders.fr'], { access_token: narrow })), 403)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu'], { access_token: narrow })), 401)
  t.pass('a refused attempt spends the ticket too')
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu'], { access_token: 'tkt_made-up' })), 401)
})

t.test('a ticket is issued only for channels the token may subscribe to', async (t) => {
  const gateway = await startGateway(t, { MAX_CHANNELS_PER_STREAM: '3' })
  const token = gateway.token({ subscribe: ['orders.*'] })
  await errorBody(t, await requestTicket(gateway, ['orders.eu'], null), 401)
  await errorBody(t, await requestTicket(gateway, ['orders.eu', 'chat'], token), 403)
  await errorBody(t, await requestTicket(gateway, ['orders.eu'], gateway.token({ publish: ['*'] })), 403)
  await errorBody(t, await requestTicket(gateway, ['bad name'], token), 400)
  await errorBody(t, await requestTicket(gateway, [], token), 400)
  await errorBody(t, await requestTicket(gateway, [{ name: 'orders.eu' }], token), 400)
  await errorBody(t, await requestTicket(gateway, ['orders.a', 'orders.b', 'orders.c', 'orders.d'], token), 400)
  const expired = createSigner({ key: JWT_SECRET })({ subscribe: ['*'], exp: epoch(-5) })
  await errorBody(t, await requestTicket(gateway, ['orders.eu'], expired), 401)
  const ticket = await ticketFor(t, gateway, ['orders.eu'])
  await errorBody(t, await requestTicket(gateway, ['orders.eu'], ticket), 401)
  t.pass('a ticket does not buy another ticket')
})

t.test('a ticket never publishes', async (t) => {
  const gateway = await startGateway(t)
  const ticket = await ticketFor(t, gateway, ['chat'])
  await errorBody(t, await publish(gateway, 'chat', 'x', { token: ticket }), 401)
  await errorBody(t, await fetch(`${gateway.baseUrl}/channels/chat?access_token=${ticket}`, { method: 'POST', headers: { 'content-type': 'text/plain' }, body: 'x' }), 401)
})

t.test('an expired ticket is refused', async (t) => {
  const gateway = await startGateway(t)
  const ticket = await ticketFor(t, gateway, ['chat'])
  const db = await connect(t, gateway.databaseUrl)
  const { rowCount } = await db.query("UPDATE sse_gateway.tickets SET expires_at = now() - interval '1 second'")
  t.equal(rowCount, 1)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['chat'], { access_token: ticket })), 401)
  const { rows } = await db.query('SELECT count(*)::int AS n FROM sse_gateway.tickets')
  t.equal(rows[0].n, 0, 'the expired ticket is gone')
})

t.test('only a hash of a ticket is stored; expired ones are swept', async (t) => {
  const gateway = await startGateway(t)
  const db = await connect(t, gateway.databaseUrl)
  const first = await ticketFor(t, gateway, ['chat'])
  await db.query("UPDATE sse_gateway.tickets SET expires_at = now() - interval '1 second'")
  const second = await ticketFor(t, gateway, ['chat'])
  const { rows } = await db.query<{ hash: string }>('SELECT hash FROM sse_gateway.tickets')
  t.equal(rows.length, 1, 'issuing swept the expired ticket')
  // As src/tickets.ts hashes a ticket: the stored hash is the live ticket's.
  t.equal(rows[0]?.hash, createHash('sha256').update(second).digest('base64url'), 'the row holds the hash of the ticket issued')
  t.notOk(rows.some((r) => r.hash.includes(first.slice(4)) || r.hash.includes(second.slice(4))), 'no ticket in clear')
})

t.test('a ticket issued by one instance is redeemed once, by any instance', async (t) => {
  const first = await startGateway(t)
  const second = await startGateway(t, {}, first.databaseUrl)
  for (let round = 0; round < 5; round++) {
    const ticket = await ticketFor(t, first, ['shared'])
    const abort = new AbortController()
    t.teardown(() => abort.abort())
    const answers = await Promise.all([first, second].map(async (g) =>
      await fetch(streamUrl(g.baseUrl, ['shared'], { access_token: ticket }), { signal: abort.signal })))
    t.same(answers.map((r) => r.status).sort(), [200, 401], 'one stream opened, the other refused')
    abort.abort()
  }
})

t.test('the stream of a ticket ends when the token it was issued for expires', async (t) => {
  const gateway = await startGateway(t)
  const token = createSigner({ key: JWT_SECRET })({ subscribe: ['*'], exp: epoch(3) })
  const ticket = await ticketFor(t, gateway, ['brief'], token)
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['brief'], { access_token: ticket }))
  t.equal(stream.response.status, 200)
  await within(stream.until(() => stream.ended, 'the end'), 'the stream to end', 10_000)
  t.ok(stream.control.some((e) => e.event === 'gateway/expired'))
})
