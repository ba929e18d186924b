// A TCP proxy for fault tests: it forwards to a PostgreSQL server (or any
// TCP service) and can go silent on chosen connections, as a partitioned
// network does, without a FIN or a RST.
import { once } from 'node:events'
import { type AddressInfo, createServer, type Server, type Socket, connect as connectTcp } from 'node:net'
import type { Teardown } from './helper.js'

export interface Pair {
  client: Socket
  upstream: Socket
  frozen: boolean
  /** Bytes swallowed since the pair was frozen. */
  dropped: number
}

/**
 * A TCP proxy that can go silent on chosen connections: frozen, a pair
 * forwards nothing and closes nothing, in either direction, like a network
 * that drops packets. Connections opened later are forwarded normally.
 */
export class FreezableProxy {
  readonly pairs: Pair[] = []
  /**
   * While true, a new connection is answered as a PostgreSQL server that is
   * starting up answers: FATAL, SQLSTATE 57P03, and closed.
   */
  startingUp = false
  readonly #server: Server
  #target: { host: string, port: number }

  constructor (target: { host: string, port: number }) {
    this.#target = target
    this.#server = createServer((client) => this.#accept(client))
  }

  /** Listens on `port` (one from the OS by default: 0); resolves with it. */
  async listen (port = 0): Promise<number> {
    this.#server.listen(port, '127.0.0.1')
    await once(this.#server, 'listening')
    return (this.#server.address() as AddressInfo).port
  }

  /** While true, new connections are closed at once, as a server that is down. */
  refuseNew = false

  /** Stops listening at once: new connections are refused (ECONNREFUSED); open ones go on. */
  stopListening (): void {
    // close()'s callback would wait for the open connections to end.
    this.#server.close()
  }

  /** Closes every connection open now at both ends, as a server that restarts does. */
  cutAll (): void {
    for (const { client, upstream } of this.pairs) {
      client.destroy()
      upstream.destroy()
    }
  }

  #accept (client: Socket): void {
    if (this.refuseNew) {
      client.destroy()
      return
    }
    if (this.startingUp) {
      client.on('error', () => {})
      client.once('data', () => client.end(startingUpError()))
      return
    }
    const upstream = connectTcp(this.#target.port, this.#target.host)
    const pair: Pair = { client, upstream, frozen: false, dropped: 0 }
    this.pairs.push(pair)
    const forward = (from: Socket, to: Socket): void => {
      from.on('data', (chunk: Buffer) => {
        if (pair.frozen) pair.dropped += chunk.length
        else to.write(chunk)
      })
      from.on('error', () => {})
      from.on('close', () => {
        if (!pair.frozen) to.destroy()
      })
    }
    forward(client, upstream)
    forward(upstream, client)
  }

  /** Freezes the pair whose upstream socket has this local port. */
  freezeByUpstreamPort (port: number): Pair {
    const pair = this.pairs.find((p) => p.upstream.localPort === port)
    if (pair === undefined) throw new Error(`no proxied connection from port ${port}`)
    pair.frozen = true
    return pair
  }

  /**
   * Points connections opened from now on at `target`, and cuts every
   * current pair (both sockets destroyed), as a virtual IP or a DNS name
   * moved to a new primary does: clients reconnect and reach the new target.
   */
  retarget (target: { host: string, port: number }): void {
    this.#target = target
    for (const { client, upstream } of this.pairs) {
      client.destroy()
      upstream.destroy()
    }
  }

  async close (): Promise<void> {
    this.cutAll()
    await new Promise<void>((resolve) => this.#server.close(() => resolve()))
  }
}

// An ErrorResponse message of the PostgreSQL protocol, as a server still
// starting up sends in answer to a startup message.
function startingUpError (): Buffer {
  const fields = Buffer.from('SFATAL\0VFATAL\0C57P03\0Mthe database system is starting up\0\0')
  const header = Buffer.alloc(5)
  header.write('E')
  header.writeInt32BE(4 + fields.length, 1)
  return Buffer.concat([header, fields])
}

export async function startProxy (t: Teardown, target: string): Promise<{ proxy: FreezableProxy, url: string }> {
  const url = new URL(target)
  const proxy = new FreezableProxy({ host: url.hostname, port: Number(url.port === '' ? 5432 : url.port) })
  const port = await proxy.listen()
  t.teardown(() => proxy.close())
  url.host = `127.0.0.1:${port}`
  return { proxy, url: url.toString() }
}
