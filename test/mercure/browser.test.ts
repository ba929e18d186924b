import { existsSync } from 'node:fs'
import { createSigner } from 'fast-jwt'
import { chromium } from 'playwright-core'
import t from 'tap'
import { JWT_SECRET, startGateway } from '../helper.js'

// A browser's EventSource on the Mercure hub: Debian's chromium, driven by playwright-core.
const CHROMIUM = '/usr/bin/chromium'
const skip = existsSync(CHROMIUM) || process.env.CI === 'true' ? false : `${CHROMIUM} is not installed (.ci/run installs it)`

t.test('an EventSource gets public updates anonymously and private ones with the mercureAuthorization cookie', { skip }, async (t) => {
  const gateway = await startGateway(t, { MERCURE_ANONYMOUS: 'true' })
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']
  })
  t.teardown(() => browser.close())
  const sign = createSigner({ key: JWT_SECRET, algorithm: 'HS256', expiresIn: 3600_000 })
  const publisher = sign({ mercure: { publish: ['*'] } })
  const reader = sign({ mercure: { subscribe: ['https://example.com/books/{id}'] } })

  const page = await browser.newPage()
  await page.goto(`${gateway.baseUrl}/`)
  // Subscribes, publishes a private then a public update, and says what onmessage saw.
  const run = async (): Promise<Array<{ id: string, data: string }>> => await page.evaluate(async (publisher) => {
    const url = new URL('/.well-known/mercure', location.origin)
    url.searchParams.append('topic', 'https://example.com/books/{id}')
    const source = new EventSource(url)
    const seen: Array<{ id: string, data: string }> = []
    const opened = new Promise((resolve) => { source.onopen = resolve })
    const publicArrived = new Promise<void>((resolve) => {
      source.onmessage = (e) => {
        seen.push({ id: e.lastEventId, data: e.data })
        if (e.data === 'public\nupdate') resolve()
      }
    })
    await opened
    for (const fields of [[['topic', 'https://example.com/books/1'], ['data', 'private'], ['private', 'on']], [['topic', 'https://example.com/books/1'], ['data', 'public\r\nupdate'], ['id', 'public-1']]]) {
      const res = await fetch('/.well-known/mercure', { method: 'POST', headers: { authorization: `Bearer ${publisher}` }, body: new URLSearchParams(fields) })
      if (res.status !== 200) throw new Error(`publish answered ${res.status}`)
    }
    await publicArrived
    source.close()
    return seen
  }, publisher)

  t.same(await run(), [{ id: 'public-1', data: 'public\nupdate' }], 'anonymous: the public update only, with its id, line breaks as LF')
  await page.context().addCookies([{ name: 'mercureAuthorization', value: reader, url: gateway.baseUrl, httpOnly: true, sameSite: 'Strict' }])
  const withCookie = await run()
  t.equal(withCookie.length, 2, 'with the cookie: the private update too')
  t.equal(withCookie[0]?.data, 'private')
})
