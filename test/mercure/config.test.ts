import t from 'tap'
import { ConfigError, loadConfig } from '../../src/config.js'

// The MERCURE_* settings and JWT_REQUIRE_EXP (src/config.ts).

t.test('Mercure settings: defaults, and values refused naming their variable', async (t) => {
  const defaults = loadConfig({}, false)
  t.match(defaults, { MERCURE_ANONYMOUS: false, JWT_REQUIRE_EXP: true, MERCURE_SUBSCRIPTIONS: false, MERCURE_HUB_URL: 'https://localhost/.well-known/mercure' })
  t.equal(defaults.MERCURE_PUBLISHER_JWT_KEY, undefined, 'the gateway\'s key by default')
  t.match(loadConfig({ MERCURE_ANONYMOUS: 'true', JWT_REQUIRE_EXP: 'false', MERCURE_SUBSCRIPTIONS: 'true', MERCURE_HUB_URL: 'https://hub.example.com/.well-known/mercure' }, false), {
    MERCURE_ANONYMOUS: true, JWT_REQUIRE_EXP: false, MERCURE_SUBSCRIPTIONS: true, MERCURE_HUB_URL: 'https://hub.example.com/.well-known/mercure'
  })
  const refused: Array<[Record<string, string>, RegExp]> = [
    [{ MERCURE_HUB_URL: 'not a url' }, /MERCURE_HUB_URL/],
    [{ MERCURE_HUB_URL: 'https://hub.example.com/' }, /MERCURE_HUB_URL/],
    [{ MERCURE_ANONYMOUS: 'maybe' }, /MERCURE_ANONYMOUS/],
    [{ MERCURE_PUBLISHER_JWT_KEY: 'short' }, /MERCURE_PUBLISHER_JWT_KEY/],
    [{ MERCURE_COOKIE_NAME: 'a b' }, /MERCURE_COOKIE_NAME/]
  ]
  for (const [env, message] of refused) t.throws(() => loadConfig(env, false), { name: ConfigError.name, message }, JSON.stringify(env))
})
