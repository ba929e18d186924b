// A request must arrive whole within REQUEST_TIMEOUT_MS: a body sent a byte
// at a time is answered 408 and its connection closed. Streams are
// responses, and live on past it.
import { connect as netConnect } from 'node:net'
import t from 'tap'
import { openStream, published, startGateway, streamUrl, subscriber, type TestGateway, waitForData, within } from './helper.js'

/**
 * Starts a POST whose body announces 60000 bytes and sends one every
 * `everyMs` ms; resolves with what the gateway answered once it closes the
 * connection.
 */
async function slowBody (gateway: TestGateway, everyMs: number): Promise<string> {
  const { hostname, port } = new URL(gateway.baseUrl)
  const socket = netConnect({ host: hostname, port: Number(port) })
  const chunks: Buffer[] = []
  socket.on('data', (chunk) => chunks.push(chunk))
  socket.on('error', () => {})
  const authorization = `Bearer ${gateway.token({ publish: ['*'] })}`
  socket.write(`POST /channels/slow HTTP/1.1\r\nHost: x\r\nAuthorization: ${authorization}\r\nContent-Type: text/plain\r\nContent-Length: 60000\r\n\r\n`)
  // The client's pace, not a wait for the gateway.
  const drip = setInterval(() => socket.write('x'), everyMs)
  await new Promise<void>((resolve) => socket.once('close', () => resolve()))
  clearInterval(drip)
  return Buffer.concat(chunks).toString('latin1')
}

t.test('a request body that trickles in is cut off at REQUEST_TIMEOUT_MS; a stream lives on', async (t) => {
  const gateway = await startGateway(t, { REQUEST_TIMEOUT_MS: '300' })
  const stream = await openStream(t, streamUrl(gateway.baseUrl, ['slow', 'after']), subscriber(gateway))

  const answers = await within(Promise.all(Array.from({ length: 10 }, async () => await slowBody(gateway, 50))), 'the slow requests to be cut off', 10_000)
  for (const answer of answers) t.match(answer, /^HTTP\/1\.1 408 /, 'answered 408, connection closed')
  await published(gateway, 'slow', 'sentinel')
  await waitForData(stream, 'sentinel')
  t.notOk(stream.events.some((e) => e.data.startsWith('x')), 'nothing of the slow bodies was published')

  // The stream's request was received long before the bound passed: it is not cut off.
  t.notOk(stream.ended, 'the stream is open past REQUEST_TIMEOUT_MS')
  await published(gateway, 'after', 'still streaming')
  await waitForData(stream, 'still streaming')
})
