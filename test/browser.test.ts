import { existsSync } from 'node:fs'
import { mkdir } from 'node:fs/promises'
import { join, resolve } from 'node:path'
import type { AddressInfo } from 'node:net'
import { chromium, type Browser } from 'playwright-core'
import t from 'tap'
import { build } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import { JWT_SECRET, connect, createDatabase, openStream, publish, published, startGateway, streamUrl, subscriber, within } from './helper.js'

// The demo page in a real browser: Debian's chromium, driven by playwright-core.
const CHROMIUM = '/usr/bin/chromium'
// .ci/run installs it: in CI a missing browser fails the run instead of skipping.
const skip = existsSync(CHROMIUM) || process.env.CI === 'true' ? false : `${CHROMIUM} is not installed (.ci/run installs it)`

async function launch (t: { teardown (fn: () => unknown): void }): Promise<Browser> {
  const browser = await chromium.launch({
    executablePath: CHROMIUM,
    // Without the background-networking flags chromium keeps dialling out, and this machine has no network.
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync']
  })
  t.teardown(() => browser.close())
  return browser
}

t.test('the demo page subscribes, shows live events and publishes from its form', { skip }, async (t) => {
  const gateway = await startGateway(t, { RETRY_MS: '200' })
  const token = gateway.token({ subscribe: ['*'], publish: ['*'] })
  const browser = await launch(t)
  const page = await browser.newPage()
  const streamUrls: string[] = []
  page.on('request', (request) => { if (new URL(request.url()).pathname === '/events') streamUrls.push(request.url()) })
  await page.goto(`${gateway.baseUrl}/?channel=demo&access_token=${token}`)
  await page.waitForSelector('#state[data-state=open]')
  t.notMatch(page.url(), token, 'the token is gone from the address bar')
  t.equal(streamUrls.length, 1)
  t.match(new URL(streamUrls[0] as string).searchParams.get('access_token'), /^tkt_/, 'the stream URL carries a single-use ticket')
  t.notOk(streamUrls.some((url) => url.includes(token)), 'never the token')

  const response = await publish(gateway, 'demo', '{"hello":"browser"}', { contentType: 'application/json' })
  const { id } = await response.json() as { id: string }
  const row = page.locator('#events tr', { hasText: '"hello": "browser"' })
  await row.waitFor()
  t.equal(await row.locator('td').nth(1).textContent(), 'demo', 'the channel is shown')
  t.equal(await row.locator('td').nth(2).textContent(), id, 'the id is shown')
  t.match(await row.locator('pre').textContent(), /^\{\n {2}"hello": "browser"\n\}$/, 'JSON is pretty-printed')

  await page.fill('#payload', 'typed in the form')
  await page.click('#publish-form button')
  await page.locator('#events tr', { hasText: 'typed in the form' }).waitFor()
  t.match(await page.textContent('#publish-result'), /^published id \d+$/)
})

t.test('after the gateway restarts the page reconnects and gets what it missed', { skip }, async (t) => {
  const database = await createDatabase(t)
  const config = { ...loadConfig({ JWT_SECRET, LOG_LEVEL: 'silent', RETRY_MS: '100' }, false), DATABASE_URL: database, JWT_SECRET }
  const first = await build(config)
  await first.listen({ host: '127.0.0.1', port: 0 })
  const { port } = first.server.address() as AddressInfo
  const baseUrl = `http://127.0.0.1:${port}`
  const token = first.jwt.sign({ subscribe: ['*'] })

  const browser = await launch(t)
  const page = await browser.newPage()
  await page.goto(`${baseUrl}/?channel=demo&access_token=${token}`)
  await page.waitForSelector('#state[data-state=open]')
  const sql = await connect(t, database)
  await sql.query("SELECT sse_gateway.publish('demo', 'before the restart')")
  await page.locator('#events tr', { hasText: 'before the restart' }).waitFor()

  await first.close()
  await page.waitForSelector('#state[data-state=reconnecting]')
  // Committed while no gateway runs: only the log has it.
  await sql.query("SELECT sse_gateway.publish('demo', 'while it was down')")

  const second = await build(config)
  t.teardown(() => second.close())
  await second.listen({ host: '127.0.0.1', port })
  await page.locator('#events tr', { hasText: 'while it was down' }).waitFor()
  await page.waitForSelector('#state[data-state=open]')
  t.equal(await page.textContent('#stream-start'), '· resumed after id 1', 'the page shows it resumed')
  await sql.query("SELECT sse_gateway.publish('demo', 'after the restart')")
  await page.locator('#events tr', { hasText: 'after the restart' }).waitFor()
  t.equal(await page.locator('#events tr').count(), 3, 'each event once')
})

t.test('the operator view shows live figures that move with the traffic, and never puts the token in a URL', { skip }, async (t) => {
  const gateway = await startGateway(t)
  const token = gateway.token({ sub: 'ops', admin: true })
  const browser = await launch(t)
  const page = await browser.newPage({ viewport: { width: 1200, height: 900 } })
  const urls: string[] = []
  page.on('request', (request) => { urls.push(request.url()) })
  await page.goto(`${gateway.baseUrl}/status.html#access_token=${token}`)
  await page.waitForSelector('#state[data-state=open]')
  await page.waitForFunction(() => document.getElementById('streams')?.textContent !== '–')
  t.notMatch(page.url(), token, 'the token is gone from the address bar')
  const streams = urls.filter((url) => new URL(url).pathname === '/status/stream')
  t.equal(streams.length, 1)
  t.match(new URL(streams[0] as string).searchParams.get('access_token'), /^tkt_/, 'the stream URL carries a single-use ticket')
  t.notOk(urls.slice(1).some((url) => url.includes(token)), 'no request URL carries the token')
  t.equal(await page.textContent('#streams'), '0')

  const subscribers = [
    await openStream(t, streamUrl(gateway.baseUrl, ['orders']), subscriber(gateway)),
    await openStream(t, streamUrl(gateway.baseUrl, ['orders', 'chat']), subscriber(gateway))
  ]
  await page.waitForFunction(() => document.getElementById('streams')?.textContent === '2')
  // Three bursts, each seen by the page before the next: the charts get a shape.
  let sent = 0
  for (const burst of [5, 20, 10]) {
    for (let i = 0; i < burst; i++) await published(gateway, 'orders', `event ${sent + i}`)
    sent += burst
    await page.waitForFunction((n) => document.getElementById('published-total')?.textContent === String(n), sent)
  }
  await within(Promise.all(subscribers.map(async (s) => await s.take(sent))), 'the events')
  await page.waitForFunction((n) => document.getElementById('delivered-total')?.textContent === String(n), 2 * sent)
  t.equal(await page.textContent('#channel-rows tr:first-child td:first-child'), 'orders', 'the most subscribed channel first')
  t.equal(await page.textContent('#channel-rows tr:first-child td:last-child'), '2')
  t.equal(await page.textContent('#listener-state'), 'live')
  t.match(await page.textContent('#lag'), /^[\d.]+ ms$/)
  const drawn = Number(await page.getAttribute('#chart-rates path.published', 'data-points'))
  t.ok(drawn >= 3, `the rate chart has ${drawn} points`)
  t.match(await page.getAttribute('#chart-streams path.streams', 'd'), /^M[\d.]+,[\d.]+(L[\d.]+,[\d.]+)+$/, 'the streams chart is a line')

  const screenshot = join('test-output', 'status-dashboard.png')
  await mkdir('test-output', { recursive: true })
  await page.screenshot({ path: screenshot, fullPage: true })
  t.comment(`screenshot of the operator view: ${resolve(screenshot)}`)
})
