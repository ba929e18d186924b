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
