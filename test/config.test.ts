import { generateKeyPairSync } from 'node:crypto'
import { mkdtemp, rm, writeFile } from 'node:fs/promises'
import { tmpdir } from 'node:os'
import path from 'node:path'
import t from 'tap'
import { ConfigError, loadConfig } from '../src/config.js'

t.test('defaults', async (t) => {
  const config = loadConfig({}, false)
  t.equal(config.HOST, '127.0.0.1')
  t.equal(config.PORT, 3000)
  t.equal(config.HEARTBEAT_MS, 15000)
  t.equal(config.MAX_PAYLOAD_BYTES, 65536)
  t.equal(config.LOG_LEVEL, 'info')
  t.equal(config.DATABASE_URL, undefined)
  t.equal(config.JWT_SECRET, undefined)
  t.notOk(config.publicChannels.matches('anything'), 'no channel is public by default')
  t.ok(Object.isFrozen(config))
})

t.test('values are read and converted', async (t) => {
  const config = loadConfig({ PORT: '8080', HEARTBEAT_MS: '500', PUBLIC_CHANNELS: 'news,public.*', DATABASE_URL: 'postgres://x@h/db' }, false)
  t.equal(config.PORT, 8080)
  t.equal(config.HEARTBEAT_MS, 500)
  t.ok(config.publicChannels.matches('public.weather'))
  t.equal(config.DATABASE_URL, 'postgres://x@h/db')
})

t.test('a wrong value stops the start with a message naming the variable', async (t) => {
  const cases: Array<[Record<string, string>, RegExp]> = [
    [{ PORT: 'abc' }, /PORT must be integer/],
    [{ PORT: '70000' }, /PORT must be <= 65535/],
    [{ HEARTBEAT_MS: '-1' }, /HEARTBEAT_MS/],
    [{ LOG_LEVEL: 'loud' }, /LOG_LEVEL must be equal to one of the allowed values/],
    [{ JWT_SECRET: 'too-short' }, /JWT_SECRET must NOT have fewer than 32 characters/],
    [{ MAX_PAYLOAD_BYTES: '0' }, /MAX_PAYLOAD_BYTES/],
    [{ PUBLIC_CHANNELS: 'a b' }, /PUBLIC_CHANNELS: invalid channel pattern "a b"/]
  ]
  for (const [env, message] of cases) {
    t.throws(() => loadConfig(env, false), { name: 'ConfigError', message }, JSON.stringify(env))
  }
  t.throws(() => loadConfig({ PORT: 'x' }, false), ConfigError)
})

t.test('an optional .env file is read; the environment wins over it', async (t) => {
  const dir = await mkdtemp(path.join(tmpdir(), 'pgsse-config-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const cwd = process.cwd()
  process.chdir(dir)
  t.teardown(() => process.chdir(cwd))
  await writeFile(path.join(dir, '.env'), 'PORT=4000\nHEARTBEAT_MS=777\n')
  const config = loadConfig({ PORT: '5000' })
  t.equal(config.PORT, 5000)
  t.equal(config.HEARTBEAT_MS, 777)
})

t.test('security settings: defaults', async (t) => {
  const config = loadConfig({}, false)
  t.equal(config.JWT_ALGORITHM, 'HS256')
  t.equal(config.jwtPublicKey, undefined)
  t.equal(config.TOKEN_COOKIE, 'pgsse_token')
  t.same(config.corsOrigins, [], 'no origin is allowed')
  t.equal(config.trustProxy, false, 'no proxy is trusted')
  t.equal(config.TICKET_TTL_SECONDS, 30)
  t.equal(config.MAX_CHANNELS_PER_STREAM, 32)
  t.equal(config.MAX_STREAMS_PER_IP, 256)
  t.equal(config.MAX_STREAMS, 10000)
  t.equal(config.PUBLISH_RATE_MAX, 10000)
  t.equal(config.PUBLISH_RATE_WINDOW_MS, 60000)
  t.equal(config.MAX_HEADER_BYTES, 16384)
  t.equal(config.MAX_URL_BYTES, 8192)
})

t.test('security settings are read and checked', async (t) => {
  const config = loadConfig({ CORS_ORIGINS: 'https://app.example.com, http://localhost:5173', TRUST_PROXY: '10.0.0.0/8, 127.0.0.1' }, false)
  t.same(config.corsOrigins, ['https://app.example.com', 'http://localhost:5173'])
  t.same(config.trustProxy, ['10.0.0.0/8', '127.0.0.1'])
  t.equal(loadConfig({ TRUST_PROXY: 'true' }, false).trustProxy, true)

  const dir = await mkdtemp(path.join(tmpdir(), 'pgsse-keys-'))
  t.teardown(() => rm(dir, { recursive: true, force: true }))
  const { publicKey, privateKey } = generateKeyPairSync('ec', { namedCurve: 'P-256' })
  const publicFile = path.join(dir, 'public.pem')
  const privateFile = path.join(dir, 'private.pem')
  await writeFile(publicFile, publicKey.export({ type: 'spki', format: 'pem' }))
  await writeFile(privateFile, privateKey.export({ type: 'pkcs8', format: 'pem' }))
  const es = loadConfig({ JWT_ALGORITHM: 'ES256', JWT_PUBLIC_KEY_FILE: publicFile }, false)
  t.match(es.jwtPublicKey, /^-----BEGIN PUBLIC KEY-----/)

  const cases: Array<[Record<string, string>, RegExp]> = [
    [{ JWT_SECRET: 'é'.repeat(15) + 'x' }, /JWT_SECRET must NOT have fewer than 32 characters/],
    [{ JWT_ALGORITHM: 'none' }, /JWT_ALGORITHM must be equal to one of the allowed values/],
    [{ JWT_ALGORITHM: 'HS512' }, /JWT_ALGORITHM must be equal to one of the allowed values/],
    [{ JWT_ALGORITHM: 'RS256' }, /JWT_PUBLIC_KEY_FILE is needed with JWT_ALGORITHM=RS256/],
    [{ JWT_ALGORITHM: 'RS256', JWT_PUBLIC_KEY_FILE: path.join(dir, 'missing.pem') }, /JWT_PUBLIC_KEY_FILE cannot be read: ENOENT/],
    [{ JWT_ALGORITHM: 'ES256', JWT_PUBLIC_KEY_FILE: privateFile }, /holds a private key/],
    [{ JWT_PUBLIC_KEY_FILE: publicFile }, /JWT_PUBLIC_KEY_FILE is for RS256 and ES256/],
    [{ CORS_ORIGINS: 'app.example.com' }, /CORS_ORIGINS: "app.example.com" is not an origin/],
    [{ CORS_ORIGINS: 'https://app.example.com/' }, /CORS_ORIGINS/],
    [{ CORS_ORIGINS: '*' }, /CORS_ORIGINS/],
    [{ TOKEN_COOKIE: 'a b' }, /TOKEN_COOKIE must match pattern/],
    [{ TICKET_TTL_SECONDS: '0' }, /TICKET_TTL_SECONDS/],
    [{ TICKET_TTL_SECONDS: '3600' }, /TICKET_TTL_SECONDS/],
    [{ MAX_STREAMS_PER_IP: '0' }, /MAX_STREAMS_PER_IP/],
    [{ PUBLISH_RATE_WINDOW_MS: '10' }, /PUBLISH_RATE_WINDOW_MS/],
    [{ MAX_HEADER_BYTES: '100' }, /MAX_HEADER_BYTES/]
  ]
  for (const [env, message] of cases) {
    t.throws(() => loadConfig(env, false), { name: 'ConfigError', message }, JSON.stringify(env))
  }
})
