// Nothing a stream holds (its slot, its hub entry and LISTENs, its place
// among the app's streams) outlives its connection, whatever the client
// does on the socket: pipelining, closing during set-up, sending requests
// behind a stream. Raw sockets, since no well-behaved client does these.
import { connect as netConnect, type Socket } from 'node:net'
import t from 'tap'
import { connect, startGateway, subscriber, type Test, type TestGateway, waitFor } from './helper.js'
import { rawExchange, stillServing } from './security-helper.js'

/** Waits until the gateway holds no stream, slot, hub channel or LISTEN. */
async function nothingHeld (gateway: TestGateway): Promise<void> {
  const { app } = gateway
  await waitFor(() => app.streamLimits.total === 0 && app.streams.size === 0 && app.hub.channelCount === 0 && app.listener.channels.size === 0,
    `nothing held (slots ${app.streamLimits.total}, streams ${app.streams.size}, hub channels ${app.hub.channelCount}, LISTENs ${app.listener.channels.size})`)
}

function streamRequest (channel: string, authorization?: string): string {
  return `GET /events?channel=${channel} HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n${authorization === undefined ? '' : `Authorization: ${authorization}\r\n`}\r\n`
}

/** A raw connection to the gateway, destroyed when the test ends; `received` gathers what it answers. */
async function rawSocket (t: Test, gateway: TestGateway): Promise<{ socket: Socket, received: () => string, closed: Promise<void> }> {
  const { hostname, port } = new URL(gateway.baseUrl)
  const socket = netConnect({ host: hostname, port: Number(port) })
  t.teardown(() => { socket.destroy() })
  const chunks: Buffer[] = []
  socket.on('data', (chunk) => chunks.push(chunk))
  socket.on('error', () => {})
  const closed = new Promise<void>((resolve) => socket.once('close', () => resolve()))
  await new Promise<void>((resolve) => socket.once('connect', () => resolve()))
  return { socket, received: () => Buffer.concat(chunks).toString('latin1'), closed }
}

t.test('300 stream requests pipelined on one connection take nothing, and the address is served after', async (t) => {
  const gateway = await startGateway(t)
  const { authorization } = subscriber(gateway)
  const requests = Array.from({ length: 300 }, (_, i) => streamRequest(`x.leak.${i}`, authorization)).join('')
  // The gateway closes a connection that pipelines behind a stream.
  await rawExchange(gateway.baseUrl, requests, 10_000)
  await nothingHeld(gateway)
  t.equal(gateway.app.streamLimits.count('127.0.0.1'), 0, 'the address has its whole share')
  await stillServing(t, gateway)
})

t.test('pipelined stream requests without a token take no slot', async (t) => {
  const gateway = await startGateway(t)
  // Each burst is dropped by the client after a few milliseconds, some of
  // its requests answered, some not yet.
  for (let burst = 0; burst < 6; burst++) {
    await rawExchange(gateway.baseUrl, Array.from({ length: 100 }, (_, i) => streamRequest(`anon.${i}`)).join(''), 1 + burst * 5)
  }
  await nothingHeld(gateway)
  await stillServing(t, gateway)
})

t.test('a request sent behind a live stream closes the connection, and the stream gives back all it held', async (t) => {
  const gateway = await startGateway(t)
  const { authorization } = subscriber(gateway)
  const { socket, received, closed } = await rawSocket(t, gateway)
  socket.write(streamRequest('behind', authorization))
  await waitFor(() => received().includes('gateway/open'), 'the stream to open')
  t.equal(gateway.app.streams.size, 1)
  socket.write(streamRequest('behind.too', authorization))
  await closed
  await nothingHeld(gateway)
})

t.test('a stream request pipelined behind another answer is refused once that answer is sent', async (t) => {
  const gateway = await startGateway(t)
  const { authorization } = subscriber(gateway)
  const queued = streamRequest('queued', authorization).replace('\r\n\r\n', '\r\nConnection: close\r\n\r\n')
  const answer = await rawExchange(gateway.baseUrl, `GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n${queued}`)
  const statuses = [...answer.matchAll(/HTTP\/1\.1 (\d{3})/g)].map((m) => Number(m[1]))
  t.same(statuses, [200, 400], '/healthz answered, then the stream refused')
  t.match(answer, /open it on a connection of its own/)
  await nothingHeld(gateway)
})

t.test('a client that leaves during set-up leaves nothing behind', async (t) => {
  const gateway = await startGateway(t)
  const { authorization } = subscriber(gateway)
  // Hold the set-up between its LISTEN and its read of the log's bounds.
  const db = await connect(t, gateway.databaseUrl)
  await db.query('BEGIN')
  await db.query('LOCK TABLE sse_gateway.log_head IN ACCESS EXCLUSIVE MODE')
  const { socket } = await rawSocket(t, gateway)
  socket.write(streamRequest('setup.leaver', authorization))
  await waitFor(() => gateway.app.listener.channels.has('setup.leaver'), 'the set-up to have LISTENed')
  t.equal(gateway.app.streamLimits.total, 1, 'the set-up holds a slot')
  socket.destroy()
  await waitFor(() => gateway.app.streamLimits.total === 0, 'the slot to be given back while the set-up waits')
  await db.query('COMMIT')
  await nothingHeld(gateway)
  await stillServing(t, gateway)
})

t.test('any request sent behind a live stream closes the connection, so that the client leaving is seen', async (t) => {
  const gateway = await startGateway(t)
  const { authorization } = subscriber(gateway)
  for (const together of [false, true]) {
    const { socket, received, closed } = await rawSocket(t, gateway)
    // Answers queued behind a stream pile up, and Node stops reading a
    // connection whose queued answers pass 16 KiB: it would not see the
    // client leave until a heartbeat failed.
    const behind = 'GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n'.repeat(200)
    if (together) {
      socket.write(streamRequest('behind.all', authorization) + behind)
    } else {
      socket.write(streamRequest('behind.all', authorization))
      await waitFor(() => received().includes('gateway/open'), 'the stream to open')
      socket.write(behind)
    }
    await closed
    await nothingHeld(gateway)
  }
})
