// Under overload the gateway sheds new requests with a 503 instead of
// falling over; /healthz still answers, and open streams go on.
import t from 'tap'
import { openStream, publish, startGateway, streamUrl, subscriber, waitFor, waitForData } from './helper.js'

/** Holds the event loop, as a burst of work would. */
function busy (ms: number): void {
  const until = Date.now() + ms
  while (Date.now() < until) { /* spin */ }
}

/** Makes a request until it is not shed, waiting for a calm loop in between. */
async function untilServed<T extends { response: Response, close (): void }> (request: () => Promise<T>, lag: () => number, limit: number): Promise<T> {
  for (let attempt = 1; ; attempt++) {
    await waitFor(() => lag() < limit, 'a calm event loop')
    const result = await request()
    if (result.response.status !== 503 || attempt === 20) return result
    result.close()
  }
}

t.test('an event loop lagging past MAX_EVENT_LOOP_DELAY_MS sheds new requests but not /healthz', async (t) => {
  const LIMIT = 400
  const RETRY_MS = 700
  const gateway = await startGateway(t, { MAX_EVENT_LOOP_DELAY_MS: String(LIMIT), EVENT_LOOP_SAMPLE_MS: '20', RETRY_MS: String(RETRY_MS) })
  const lag = (): number => gateway.app.memoryUsage().eventLoopDelay
  // Other test files share the machine, and the loop lags as the app warms
  // up: like any client told 503, retry until it is calm.
  const stream = await untilServed(async () => await openStream(t, streamUrl(gateway.baseUrl, ['c']), subscriber(gateway)), lag, LIMIT)
  t.equal(stream.response.status, 200)

  // Lag the loop until the sampler has seen it.
  await waitFor(() => {
    busy(LIMIT * 1.5)
    return lag() > LIMIT
  }, 'the lag to be measured')

  const shed = await gateway.app.inject({ method: 'POST', url: '/channels/c', headers: { 'content-type': 'text/plain' }, payload: 'x' })
  t.equal(shed.statusCode, 503)
  t.ok(Number(shed.headers['retry-after']) > 0, 'with Retry-After')
  t.same(shed.json(), { statusCode: 503, error: 'Service Unavailable', message: 'the gateway is overloaded: retry shortly' })
  t.equal((await gateway.app.inject('/readyz')).statusCode, 503, 'not ready while overloaded')
  // A shed stream request: EventSource gives up on a 503 for good, so it
  // gets a 200 that advises retry, says why and ends; curl gets the 503.
  await waitFor(() => {
    busy(LIMIT * 1.5)
    return lag() > LIMIT
  }, 'the lag to be measured again')
  const shedStream = await gateway.app.inject({ url: '/events?channel=c', headers: { accept: 'text/event-stream', ...subscriber(gateway) } })
  t.equal(shedStream.statusCode, 200)
  t.match(shedStream.headers['content-type'], /^text\/event-stream/)
  t.equal(shedStream.headers['x-content-type-options'], 'nosniff', 'with the API\'s security headers')
  const retry = Number(/^retry: (\d+)\n\n/.exec(shedStream.body)?.[1])
  t.ok(retry >= 2 * RETRY_MS && retry < 4 * RETRY_MS, `retry ${retry} in [2 × RETRY_MS, 4 × RETRY_MS)`)
  t.equal(Number(shedStream.headers['retry-after']), Math.ceil(retry / 1000))
  t.match(shedStream.body, /\nevent: gateway\/unavailable\ndata: \{"status":503,"reason":"the gateway is overloaded: retry shortly","retry":\d+\}\n\n$/)
  t.equal(gateway.app.streamLimits.total, 1, 'it took no slot')
  const shedCurl = await gateway.app.inject({ url: '/events?channel=c', headers: subscriber(gateway) })
  t.equal(shedCurl.statusCode, 503, 'without Accept: text/event-stream, the 503')
  t.ok(Number(shedCurl.headers['retry-after']) > 0, 'with Retry-After')
  t.equal((await gateway.app.inject('/healthz')).statusCode, 200, '/healthz still answers: the process is up')

  // Once the loop is calm again, everything is served, and the stream lived on.
  const after = await untilServed(async () => {
    const response = await publish(gateway, 'c', 'after the burst')
    return { response, close: () => { response.body?.cancel().catch(() => {}) } }
  }, lag, LIMIT)
  t.equal(after.response.status, 201)
  await waitForData(stream, 'after the burst')
})
