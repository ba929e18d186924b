import { createHmac, generateKeyPairSync } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import { createSigner } from 'fast-jwt'
import Fastify from 'fastify'
import fp from 'fastify-plugin'
import t from 'tap'
import { ChannelPatterns } from '../../src/channel.js'
import authPlugin from '../../src/plugins/auth.js'
import { errorBody, JWT_SECRET, openStream, startGateway, streamUrl, type Test, type TestGateway, within } from '../helper.js'
import { epoch, stillServing, unsignedToken } from '../security-helper.js'

const ALL = { publish: ['*'], subscribe: ['*'] }
const bearerAll = (gateway: TestGateway): Record<string, string> => ({ authorization: `Bearer ${gateway.token(ALL)}` })

/** A GET /events and a POST /channels/:channel with `token`, both expected to answer `status`. */
async function refused (t: Test, gateway: TestGateway, token: string, status: number, message?: RegExp): Promise<void> {
  const stream = await fetch(streamUrl(gateway.baseUrl, ['secret']), { headers: { authorization: `Bearer ${token}` } })
  const body = await errorBody(t, stream, status)
  if (message !== undefined) t.match(body.message, message)
  t.notMatch(JSON.stringify(body), token.slice(0, 20), 'the answer does not echo the token')
  const post = await fetch(`${gateway.baseUrl}/channels/secret`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', authorization: `Bearer ${token}` },
    body: 'x'
  })
  await errorBody(t, post, status)
}

async function accepted (t: Test, gateway: TestGateway, token: string): Promise<void> {
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['secret']), { authorization: `Bearer ${token}` })
  t.equal(stream.response.status, 200, 'the stream opens')
  const post = await fetch(`${gateway.baseUrl}/channels/secret`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', authorization: `Bearer ${token}` },
    body: 'accepted'
  })
  t.equal(post.status, 201, 'the publish is accepted')
  const [event] = await within(stream.take(1), 'the event')
  t.equal(event?.data, 'accepted')
  stream.close()
  await stream.done
}

async function keyFile (t: Test, pem: string): Promise<string> {
  const dir = await mkdtemp(path.join(tmpdir(), 'pgsse-key-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const file = path.join(dir, 'public.pem')
  await writeFile(file, pem)
  return file
}

t.test('HS256: only tokens signed with JWT_SECRET by HS256, with an exp in force, pass', async (t) => {
  const gateway = await startGateway(t)
  const hs256 = createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 60_000 })

  await t.test('alg none', async (t) => {
    await refused(t, gateway, unsignedToken({ ...ALL, exp: epoch(60) }), 401)
    await refused(t, gateway, unsignedToken({ ...ALL, exp: epoch(60) }).slice(0, -1), 401)
  })
  await t.test('another secret', async (t) =>
    refused(t, gateway, createSigner({ key: 'another-secret-that-is-at-least-32-bytes', expiresIn: 60_000 })(ALL), 401))
  await t.test('another HMAC algorithm with the right secret', async (t) =>
    refused(t, gateway, createSigner({ key: JWT_SECRET, algorithm: 'HS512', expiresIn: 60_000 })(ALL), 401))
  await t.test('RS256', async (t) => {
    const { privateKey } = generateKeyPairSync('rsa', { modulusLength: 2048 })
    await refused(t, gateway, createSigner({ key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, algorithm: 'RS256', expiresIn: 60_000 })(ALL), 401)
  })
  await t.test('expired', async (t) =>
    refused(t, gateway, createSigner({ key: JWT_SECRET, algorithm: 'HS256' })({ ...ALL, exp: epoch(-5) }), 401, /expired/))
  await t.test('not valid before a later time', async (t) =>
    refused(t, gateway, createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 60_000, notBefore: 30_000 })(ALL), 401, /not valid yet/))
  await t.test('no exp', async (t) =>
    refused(t, gateway, createSigner({ key: JWT_SECRET, algorithm: 'HS256' })(ALL), 401, /exp/))
  await t.test('a tampered payload', async (t) => {
    const [header, , signature] = hs256({ subscribe: ['public'] }).split('.')
    const forged = `${header}.${Buffer.from(JSON.stringify({ ...ALL, exp: epoch(60) })).toString('base64url')}.${signature}`
    await refused(t, gateway, forged, 401)
  })
  await t.test('the right token', async (t) => accepted(t, gateway, hs256(ALL)))
  await stillServing(t, gateway)
})

/** An HS256 token over this exact claims text: numbers such as 1e400 that JSON.stringify cannot write. */
function signedText (claimsText: string): string {
  const input = `${Buffer.from('{"alg":"HS256","typ":"JWT"}').toString('base64url')}.${Buffer.from(claimsText).toString('base64url')}`
  return `${input}.${createHmac('sha256', JWT_SECRET).update(input).digest('base64url')}`
}

t.test('fractional and absurd exp, nbf and iat: whole seconds, a longest lifetime, a clock tolerance', async (t) => {
  const gateway = await startGateway(t)
  const sign = (claims: Record<string, unknown>): string => createSigner({ key: JWT_SECRET })({ ...ALL, ...claims })
  const ticket = async (token: string): Promise<Response> => await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ channels: ['secret'] })
  })
  await t.test('a fractional exp is honoured, to the second', async (t) => {
    const token = signedText(`{"publish":["*"],"subscribe":["*"],"exp":${epoch(600)}.5,"iat":${epoch()}.25,"nbf":${epoch(-10)}.75}`)
    await accepted(t, gateway, token)
    const res = await ticket(token)
    t.equal(res.status, 201, 'a ticket is issued for it')
    const { ticket: issued } = await res.json() as { ticket: string }
    const stream = await openStream(t, streamUrl(gateway.baseUrl, ['secret'], { access_token: issued }))
    t.equal(stream.response.status, 200, 'and opens a stream')
  })
  for (const [what, token] of [
    ['exp 1e300', sign({ exp: 1e300 })],
    ['exp 1e400 (Infinity)', signedText(`{"publish":["*"],"subscribe":["*"],"exp":1e400,"iat":${epoch()}}`)],
    ['exp beyond MAX_TOKEN_LIFETIME_SECONDS (90 days)', sign({ exp: epoch(91 * 86400) })]
  ] as const) {
    await t.test(what, async (t) => {
      await refused(t, gateway, token, 401, /lives too long/)
      await errorBody(t, await ticket(token), 401)
    })
  }
  await t.test('exp -1e400 (-Infinity)', async (t) => refused(t, gateway, signedText('{"subscribe":["*"],"exp":-1e400}'), 401))
  await t.test('nbf 1e400', async (t) => refused(t, gateway, signedText(`{"subscribe":["*"],"exp":${epoch(60)},"nbf":1e400}`), 401))
  await t.test('iat in the future', async (t) => refused(t, gateway, sign({ exp: epoch(60), iat: epoch(3600) }), 401, /iat/))
  await t.test('iat not a number', async (t) => refused(t, gateway, sign({ exp: epoch(60), iat: 'yesterday' }), 401, /iat/))
  await stillServing(t, gateway)
})

t.test('MAX_TOKEN_LIFETIME_SECONDS and CLOCK_TOLERANCE_SECONDS are configurable', async (t) => {
  const gateway = await startGateway(t, { MAX_TOKEN_LIFETIME_SECONDS: '120', CLOCK_TOLERANCE_SECONDS: '60' })
  const sign = (claims: Record<string, unknown>): string => createSigner({ key: JWT_SECRET })({ ...ALL, ...claims })
  await t.test('exp within the lifetime', async (t) => accepted(t, gateway, sign({ exp: epoch(100) })))
  await t.test('exp beyond it', async (t) => refused(t, gateway, sign({ exp: epoch(200) }), 401, /at most 120 seconds/))
  await t.test('expired within the tolerance', async (t) => accepted(t, gateway, sign({ exp: epoch(-30) })))
  await t.test('expired beyond it', async (t) => refused(t, gateway, sign({ exp: epoch(-90) }), 401, /expired/))
  await t.test('nbf within the tolerance', async (t) => accepted(t, gateway, sign({ exp: epoch(100), nbf: epoch(30) })))
  await t.test('iat within the tolerance', async (t) => accepted(t, gateway, sign({ exp: epoch(100), iat: epoch(30) })))
})

t.test('aud and iss are enforced when configured', async (t) => {
  const gateway = await startGateway(t, { JWT_AUDIENCE: 'pg-sse-gateway', JWT_ISSUER: 'https://auth.example.com' })
  const sign = (claims: Record<string, unknown>): string => createSigner({ key: JWT_SECRET, expiresIn: 60_000 })({ ...ALL, ...claims })
  await t.test('no aud', async (t) => refused(t, gateway, sign({ iss: 'https://auth.example.com' }), 401, /claims exp, aud, iss/))
  await t.test('another aud', async (t) => refused(t, gateway, sign({ aud: 'another-service', iss: 'https://auth.example.com' }), 401, /aud or iss/))
  await t.test('no iss', async (t) => refused(t, gateway, sign({ aud: 'pg-sse-gateway' }), 401))
  await t.test('another iss', async (t) => refused(t, gateway, sign({ aud: 'pg-sse-gateway', iss: 'https://evil.example.com' }), 401))
  await t.test('both right', async (t) => accepted(t, gateway, sign({ aud: 'pg-sse-gateway', iss: 'https://auth.example.com' })))
  await t.test('an audience among several', async (t) => accepted(t, gateway, sign({ aud: ['other', 'pg-sse-gateway'], iss: 'https://auth.example.com' })))
  await t.test('tokens the gateway mints carry them', async (t) => accepted(t, gateway, gateway.token(ALL)))
})

for (const [algorithm, pair] of [
  ['RS256', () => generateKeyPairSync('rsa', { modulusLength: 2048 })],
  ['ES256', () => generateKeyPairSync('ec', { namedCurve: 'P-256' })]
] as const) {
  t.test(`${algorithm} with a public key file: tokens minted elsewhere pass, confusion does not`, async (t) => {
    const { privateKey, publicKey } = pair()
    const publicPem = publicKey.export({ type: 'spki', format: 'pem' }) as string
    const gateway = await startGateway(t, { JWT_ALGORITHM: algorithm, JWT_PUBLIC_KEY_FILE: await keyFile(t, publicPem) })
    const sign = createSigner({ key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, algorithm, expiresIn: 60_000 })

    await t.test('HS256 signed with the public key as secret', async (t) =>
      refused(t, gateway, createSigner({ key: publicPem, algorithm: 'HS256', expiresIn: 60_000 })(ALL), 401))
    await t.test('HS256 signed with JWT_SECRET', async (t) =>
      refused(t, gateway, createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 60_000 })(ALL), 401))
    await t.test('alg none', async (t) => refused(t, gateway, unsignedToken({ ...ALL, exp: epoch(60) }), 401))
    await t.test('another key pair', async (t) => {
      const other = pair().privateKey.export({ type: 'pkcs8', format: 'pem' }) as string
      await refused(t, gateway, createSigner({ key: other, algorithm, expiresIn: 60_000 })(ALL), 401)
    })
    await t.test('expired', async (t) => refused(t, gateway, createSigner({ key: privateKey.export({ type: 'pkcs8', format: 'pem' }) as string, algorithm })({ ...ALL, exp: epoch(-5) }), 401, /expired/))
    await t.test('signed by the private key', async (t) => accepted(t, gateway, sign(ALL)))
    t.throws(() => gateway.app.jwt.sign(ALL), 'the gateway cannot mint tokens: it has no private key')
  })
}

t.test('the auth plugin refuses an HS256 secret shorter than 32 bytes, and RS256 without a key', async (t) => {
  // A stand-in for @fastify/postgres, which the plugin declares it needs:
  // the options are refused before any database is used.
  const postgres = fp(async () => {}, { name: '@fastify/postgres' })
  const app = Fastify()
  t.teardown(() => app.close())
  await app.register(postgres)
  await t.rejects(async () => {
    await app.register(authPlugin, { secret: 'x'.repeat(31), publicChannels: new ChannelPatterns([]) })
    await app.ready()
  }, /at least 32 bytes/)
  const rs = Fastify()
  t.teardown(() => rs.close())
  await rs.register(postgres)
  await t.rejects(async () => {
    await rs.register(authPlugin, { algorithm: 'RS256', secret: JWT_SECRET, publicChannels: new ChannelPatterns([]) })
    await rs.ready()
  }, /public key/)
})

t.test('every channel of a stream and of a batch is checked', async (t) => {
  const gateway = await startGateway(t, { PUBLIC_CHANNELS: 'public.*' })
  const subscribeOrders = gateway.token({ subscribe: ['orders.*'] })
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu', 'ordersX']), { headers: { authorization: `Bearer ${subscribeOrders}` } }), 403)
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['public.a', 'orders.eu', 'chat']), { headers: { authorization: `Bearer ${subscribeOrders}` } }), 403)
  const ok = await openStream(t, streamUrl(gateway.baseUrl, ['public.a', 'orders.eu']), { authorization: `Bearer ${subscribeOrders}` })
  t.equal(ok.response.status, 200, 'a public channel and a covered one')

  const batch = async (token: string, channels: string[]): Promise<Response> => await fetch(`${gateway.baseUrl}/events`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', authorization: `Bearer ${token}` },
    body: JSON.stringify({ events: channels.map((channel) => ({ channel, data: 'x' })) })
  })
  await errorBody(t, await batch(subscribeOrders, ['orders.eu']), 403)
  await errorBody(t, await batch(gateway.token({ publish: ['orders.*'] }), ['orders.eu', 'orders.us', 'public.a']), 403)
  await errorBody(t, await batch(gateway.token({ publish: ['orders.eu'] }), ['orders.eu', 'orders.eu2']), 403)
  t.equal((await batch(gateway.token({ publish: ['orders.*'] }), ['orders.eu', 'orders.us'])).status, 201)
})

t.test('a stream ends when its token expires, with a gateway/expired event', async (t) => {
  const gateway = await startGateway(t)
  const token = createSigner({ key: JWT_SECRET })({ subscribe: ['*'], exp: epoch(3) })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['short']), { authorization: `Bearer ${token}` })
  t.equal(stream.response.status, 200)
  // Streams whose tokens expire in the same second share a timer: one that
  // leaves early must not take the others' expiry with it.
  const leaving = await openStream(t, streamUrl(gateway.baseUrl, ['short']), { authorization: `Bearer ${token}` })
  const sibling = await openStream(t, streamUrl(gateway.baseUrl, ['other']), { authorization: `Bearer ${token}` })
  leaving.close()
  await leaving.done
  const post = await fetch(`${gateway.baseUrl}/channels/short`, { method: 'POST', headers: { 'content-type': 'text/plain', ...bearerAll(gateway) }, body: 'while valid' })
  t.equal(post.status, 201)
  await within(stream.until(() => stream.ended, 'the end of the stream'), 'the stream to end at expiry', 10_000)
  t.same(stream.events.map((e) => e.data), ['while valid'], 'the stream was live until then')
  t.same(stream.control.map((e) => e.event), ['gateway/open', 'gateway/expired'], 'the client is told why')
  await within(sibling.until(() => sibling.ended, 'the end of the stream'), 'the other stream on the token to end too')
  t.same(sibling.control.map((e) => e.event), ['gateway/open', 'gateway/expired'])
  const again = await fetch(streamUrl(gateway.baseUrl, ['short']), { headers: { authorization: `Bearer ${token}` } })
  await errorBody(t, again, 401)

  const long = await openStream(t, streamUrl(gateway.baseUrl, ['long']), { authorization: `Bearer ${gateway.token({ subscribe: ['*'] }, { expiresIn: '30d' })}` })
  t.equal(long.response.status, 200, 'an expiry beyond the longest timer (24.8 days) is fine')
  await stillServing(t, gateway)
  t.notOk(long.ended, 'and that stream is still open')
})

t.test('a token in an HttpOnly cookie: streams, and publishes from allowed origins only', async (t) => {
  const gateway = await startGateway(t, { TOKEN_COOKIE: 'gw_session', CORS_ORIGINS: 'https://app.example.com' })
  const cookie = `gw_session=${gateway.token(ALL)}`
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['cookied']), { cookie })
  t.equal(stream.response.status, 200, 'a stream opens with the cookie')
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['cookied']), { headers: { cookie: 'other=1' } }), 401)

  const post = async (headers: Record<string, string>, body: string): Promise<Response> =>
    await fetch(`${gateway.baseUrl}/channels/cookied`, { method: 'POST', headers: { 'content-type': 'text/plain', cookie, ...headers }, body })
  await errorBody(t, await post({}, 'no origin'), 403)
  await errorBody(t, await post({ origin: 'https://evil.example.com' }, 'cross-site'), 403)
  await errorBody(t, await post({ origin: 'null' }, 'opaque origin'), 403)
  await errorBody(t, await post({ origin: 'https://app.example.com.evil.com' }, 'look-alike'), 403)
  await errorBody(t, await post({ origin: gateway.baseUrl.replace('http:', 'https:') }, 'another scheme'), 403)
  await errorBody(t, await post({ origin: `${gateway.baseUrl.replace(/:\d+$/, '')}:1` }, 'another port'), 403)
  const ticket = await fetch(`${gateway.baseUrl}/tickets`, {
    method: 'POST',
    headers: { 'content-type': 'application/json', cookie, origin: 'https://evil.example.com' },
    body: JSON.stringify({ channels: ['cookied'] })
  })
  await errorBody(t, ticket, 403)
  t.equal((await post({ origin: 'https://app.example.com' }, 'listed origin')).status, 201)
  t.equal((await post({ origin: gateway.baseUrl }, 'same origin')).status, 201)
  t.equal((await post({ origin: 'https://evil.example.com', authorization: `Bearer ${gateway.token(ALL)}` }, 'bearer')).status, 201,
    'a bearer token is no CSRF risk: a page cannot make a browser send it')
  const events = await within(stream.take(3), '3 events')
  t.same(events.map((e) => e.data), ['listed origin', 'same origin', 'bearer'], 'only the allowed publishes were published')
})

t.test('behind a trusted TLS proxy the gateway\'s own origin is https', async (t) => {
  const gateway = await startGateway(t, { TRUST_PROXY: 'true' })
  const host = new URL(gateway.baseUrl).host
  const post = async (origin: string, body: string): Promise<Response> => await fetch(`${gateway.baseUrl}/channels/proxied`, {
    method: 'POST',
    headers: { 'content-type': 'text/plain', cookie: `pgsse_token=${gateway.token(ALL)}`, 'x-forwarded-proto': 'https', origin },
    body
  })
  t.equal((await post(`https://${host}`, 'own origin')).status, 201)
  await errorBody(t, await post(`http://${host}`, 'plain http'), 403)
})

t.test('an operator token is verified as a channel token is: its times checked, its failures counted', async (t) => {
  const gateway = await startGateway(t, { AUTH_FAILURE_MAX: '3' })
  const sign = (claims: Record<string, unknown>): string => createSigner({ key: JWT_SECRET })({ admin: true, ...claims })
  const status = async (token: string): Promise<Response> => await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: `Bearer ${token}` } })
  const good = sign({ exp: epoch(600) })
  t.equal((await status(good)).status, 200, 'an operator token in force reads the status')
  t.match((await errorBody(t, await status(sign({ exp: epoch(91 * 86400) })), 401)).message, /lives too long/, 'an exp beyond MAX_TOKEN_LIFETIME_SECONDS')
  t.match((await errorBody(t, await status(sign({ exp: epoch(60), iat: epoch(3600) })), 401)).message, /iat/, 'an iat in the future')
  await errorBody(t, await status('not.a.token'), 401)
  await errorBody(t, await status(good), 429)
  await errorBody(t, await fetch(`${gateway.baseUrl}/metrics`, { headers: { authorization: `Bearer ${good}` } }), 429)
})
