// What a client that never reads costs the gateway before it is cut off,
// and after: kernel send buffers (from `ss`, Linux) and the gateway's own
// buffer, per stalled stream.
//
//   node --import tsx bench/stalled-reader.ts [--streams 8] [--event-kib 16] [--database URL]
//
// The gateway runs in this process (build() from src/app.ts) on a database
// of its own; the stalled clients are raw sockets that send their request
// and never read. Events are published until every stalled stream is cut
// off at STREAM_BUFFER_BYTES.
import { execFileSync } from 'node:child_process'
import { randomBytes } from 'node:crypto'
import { connect, type AddressInfo, type Socket } from 'node:net'
import { parseArgs } from 'node:util'
import pg from 'pg'
import { build } from '../src/app.js'
import { loadConfig } from '../src/config.js'
import type { EventStream } from '../src/event-stream.js'

const { values: args } = parseArgs({
  options: {
    streams: { type: 'string', default: '8' },
    'event-kib': { type: 'string', default: '16' },
    database: { type: 'string', default: process.env.DATABASE_URL ?? 'postgres://postgres@127.0.0.1:5432/postgres' }
  }
})
const STREAMS = Number(args.streams)
const EVENT_BYTES = Number(args['event-kib']) * 1024

interface SocketMemory {
  /** Bytes sent but not yet acknowledged, or not yet sent (Send-Q). */
  sendQueue: number
  /** Bytes received but not read by the application (Recv-Q). */
  receiveQueue: number
  /** Memory the kernel charges for the send queue (skmem `w`, wmem_queued). */
  wmemQueued: number
}

/** The kernel's view of the TCP sockets matching an `ss` filter, in one state. */
function sockets (state: string, filter: string): SocketMemory[] {
  const out = execFileSync('ss', ['-tnmH', 'state', state, filter], { encoding: 'utf8' })
  const lines = out.split('\n').filter((line) => line.trim() !== '')
  const found: SocketMemory[] = []
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i] as string
    if (line.includes('skmem:')) continue
    const [receiveQueue, sendQueue] = line.trim().split(/\s+/).map(Number)
    const skmem = /skmem:\([^)]*\bw(\d+)/.exec(lines[i + 1] ?? '')
    found.push({ sendQueue: sendQueue ?? 0, receiveQueue: receiveQueue ?? 0, wmemQueued: Number(skmem?.[1] ?? 0) })
  }
  return found
}

const mib = (bytes: number): string => `${(bytes / 1024 / 1024).toFixed(2)} MiB`
const max = (values: number[]): number => values.reduce((a, b) => Math.max(a, b), 0)

async function main (): Promise<void> {
  const name = `pgsse_stall_${process.pid}_${randomBytes(3).toString('hex')}`
  const admin = new pg.Client({ connectionString: args.database })
  await admin.connect()
  await admin.query(`CREATE DATABASE ${name}`)
  const url = new URL(args.database)
  url.pathname = `/${name}`
  const databaseUrl = url.toString()
  const secret = randomBytes(32).toString('base64url')
  const config = loadConfig({ JWT_SECRET: secret, LOG_LEVEL: 'silent', MAX_STREAMS_PER_IP: '100000', DATABASE_URL: databaseUrl }, false)
  const app = await build({ ...config, DATABASE_URL: databaseUrl, JWT_SECRET: secret })
  const clients: Socket[] = []
  const db = new pg.Client({ connectionString: databaseUrl })
  try {
    await app.listen({ host: '127.0.0.1', port: 0 })
    const { port } = app.server.address() as AddressInfo
    const token = app.jwt.sign({ subscribe: ['*'] })
    for (let i = 0; i < STREAMS; i++) {
      const socket = connect({ host: '127.0.0.1', port })
      socket.on('error', () => {})
      // Never read: whatever the gateway sends piles up in the kernels.
      socket.pause()
      socket.write(`GET /events?channel=stall HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${token}\r\n\r\n`)
      clients.push(socket)
    }
    while (app.streams.size < STREAMS) await new Promise((resolve) => setTimeout(resolve, 10))
    await db.connect()

    const serverSide = `( sport = :${port} )`
    const clientSide = `( dport = :${port} )`
    let peak = { sendQueue: 0, wmemQueued: 0, receiveQueue: 0, gatewayUnsent: 0 }
    const payload = 'x'.repeat(EVENT_BYTES)
    let published = 0
    // Publish until every stalled stream is cut off, sampling before each round.
    while (app.streams.size > 0 && published < 100_000) {
      const server = sockets('established', serverSide)
      const client = sockets('established', clientSide)
      const unsent = [...app.streams].map((stream) => (stream.writer as EventStream).unsentBytes)
      if (server.length === STREAMS) {
        peak = {
          sendQueue: Math.max(peak.sendQueue, max(server.map((s) => s.sendQueue))),
          wmemQueued: Math.max(peak.wmemQueued, max(server.map((s) => s.wmemQueued))),
          receiveQueue: Math.max(peak.receiveQueue, max(client.map((s) => s.receiveQueue))),
          gatewayUnsent: Math.max(peak.gatewayUnsent, max(unsent))
        }
      }
      await db.query('SELECT sse_gateway.publish_batch(array_fill($1::text, ARRAY[16]), array_fill($2::text, ARRAY[16]))', ['stall', payload])
      published += 16
      await new Promise((resolve) => setTimeout(resolve, 20))
    }
    const finWait = [...sockets('fin-wait-1', serverSide), ...sockets('closing', serverSide)]
    const perStream = peak.wmemQueued + peak.gatewayUnsent
    console.log(`stalled streams: ${STREAMS}, events published: ${published} x ${EVENT_BYTES} bytes, cut off: ${app.streams.size === 0 ? 'all' : `${STREAMS - app.streams.size}`}`)
    console.log(`STREAM_BUFFER_BYTES: ${mib(config.STREAM_BUFFER_BYTES)}`)
    console.log('before the cut-off, per stalled stream (peak):')
    console.log(`  gateway kernel send queue (Send-Q): ${mib(peak.sendQueue)}, charged (skmem w): ${mib(peak.wmemQueued)}`)
    console.log(`  gateway's own buffer (unsent bytes): ${mib(peak.gatewayUnsent)}`)
    console.log(`  gateway total: ${mib(perStream)}; x 256 streams per address: ${mib(perStream * 256)}`)
    console.log(`  client kernel receive queue (Recv-Q, the client's own host): ${mib(peak.receiveQueue)}`)
    console.log(`after the cut-off: ${finWait.length} gateway sockets in FIN-WAIT-1/CLOSING holding ${mib(finWait.reduce((n, s) => n + s.wmemQueued, 0))}`)
    const sysctl = (key: string): string => execFileSync('sysctl', ['-n', key], { encoding: 'utf8' }).trim().replace(/\s+/g, ' ')
    console.log(`net.ipv4.tcp_wmem = ${sysctl('net.ipv4.tcp_wmem')}; net.ipv4.tcp_rmem = ${sysctl('net.ipv4.tcp_rmem')}`)
  } finally {
    for (const socket of clients) socket.destroy()
    await db.end().catch(() => {})
    await app.close()
    await admin.query(`DROP DATABASE IF EXISTS ${name} WITH (FORCE)`)
    await admin.end()
  }
}

await main()
