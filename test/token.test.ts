import { execFile } from 'node:child_process'
import { fileURLToPath } from 'node:url'
import { promisify } from 'node:util'
import { createDecoder } from 'fast-jwt'
import t from 'tap'
import { loadConfig } from '../src/config.js'
import { mintToken } from '../src/token.js'
import { errorBody, JWT_SECRET, openStream, startGateway, streamUrl, within } from './helper.js'

const decode = createDecoder()
const ROOT = fileURLToPath(new URL('..', import.meta.url))

t.test('a minted token carries the patterns, an exp, and aud and iss when configured', async (t) => {
  const config = loadConfig({ JWT_SECRET, JWT_AUDIENCE: 'gw', JWT_ISSUER: 'ops' }, false)
  const claims = decode(mintToken(config, { publish: ['orders.*'], subscribe: ['*'], sub: 'alice', ttl: '2h' }))
  t.match(claims, { publish: ['orders.*'], subscribe: ['*'], sub: 'alice', aud: 'gw', iss: 'ops' })
  t.equal(claims.exp - claims.iat, 7200, 'expires after the ttl')
  const other = decode(mintToken(config, { subscribe: ['a'], aud: 'other', iss: 'elsewhere' }))
  t.match(other, { aud: 'other', iss: 'elsewhere', publish: [] })
  t.equal(other.exp - other.iat, 3600, 'one hour by default')
})

t.test('minting refuses what would not work', async (t) => {
  const config = loadConfig({ JWT_SECRET }, false)
  t.throws(() => mintToken(config, {}), /at least one --publish or --subscribe pattern, or --admin/)
  t.throws(() => mintToken(config, { publish: ['bad pattern'] }), /invalid channel pattern/)
  t.throws(() => mintToken(loadConfig({}, false), { publish: ['*'] }), /JWT_SECRET is not set/)
})

t.test('the gateway accepts what the command mints, with aud and iss', async (t) => {
  const env = { JWT_AUDIENCE: 'pg-sse-gateway', JWT_ISSUER: 'ops' }
  const gateway = await startGateway(t, env)
  const config = loadConfig({ JWT_SECRET, ...env }, false)
  const token = mintToken(config, { subscribe: ['orders.*'], publish: ['orders.eu'] })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['orders.eu']), { authorization: `Bearer ${token}` })
  t.equal(stream.response.status, 200)
  const res = await fetch(`${gateway.baseUrl}/channels/orders.eu`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body: 'minted' })
  t.equal(res.status, 201)
  t.equal((await within(stream.take(1), 'the event'))[0]?.data, 'minted')
  await errorBody(t, await fetch(`${gateway.baseUrl}/channels/orders.us`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body: 'x' }), 403)
  const wrongAudience = mintToken(config, { subscribe: ['*'], aud: 'another' })
  await errorBody(t, await fetch(streamUrl(gateway.baseUrl, ['orders.eu']), { headers: { authorization: `Bearer ${wrongAudience}` } }), 401)
})

t.test('npm run token: the command prints a token, or a message and exit code 1', async (t) => {
  const run = promisify(execFile)
  const tsx = `${ROOT}node_modules/.bin/tsx`
  const env = { PATH: process.env.PATH ?? '', JWT_SECRET }
  const { stdout } = await run(tsx, ['src/token.ts', '--subscribe', 'chat', '--ttl', '90', '--sub', 'ops'], { cwd: ROOT, env })
  const claims = decode(stdout.trim())
  t.match(claims, { subscribe: ['chat'], sub: 'ops' })
  t.equal(claims.exp - claims.iat, 90, 'a bare number is seconds')
  const failed = await run(tsx, ['src/token.ts'], { cwd: ROOT, env }).catch((err: { code: number, stderr: string }) => err)
  t.match(failed, { code: 1, stderr: /at least one --publish or --subscribe/ })
})

t.test('--admin mints an operator token that reads GET /status and may do nothing else', async (t) => {
  const gateway = await startGateway(t)
  const token = mintToken(loadConfig({ JWT_SECRET }, false), { admin: true })
  t.match(decode(token), { admin: true, publish: [], subscribe: [] })
  const status = await fetch(`${gateway.baseUrl}/status`, { headers: { authorization: `Bearer ${token}` } })
  t.equal(status.status, 200)
  const publish = await fetch(`${gateway.baseUrl}/channels/c`, { method: 'POST', headers: { authorization: `Bearer ${token}`, 'content-type': 'text/plain' }, body: 'x' })
  t.equal(publish.status, 403)
})
